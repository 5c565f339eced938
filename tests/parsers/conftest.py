"""The parser tests' helpers (parsers_testkit) live beside them; put this folder on the path."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
