"""The parser tests' helpers (parsers_testkit) live beside them; put this folder on the path."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from parsers import _analyse, _records

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True)
def _records_built_as_their_constructor_builds_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every UsageRecord that analyse() builds through construct() is checked
    against the dataclass's own constructor: all fields named, same object."""
    checked_construct = checking_construct(_records.construct)
    monkeypatch.setattr(_analyse, "construct", checked_construct)


def checking_construct(construct: Callable[..., Any]) -> Callable[..., Any]:
    """construct(), asserting that it equals cls(**fields) field for field."""

    def check(cls: type[Any], /, **fields: Any) -> Any:
        fast, plain = construct(cls, **fields), cls(**fields)
        assert list(vars(fast)) == [f.name for f in dataclasses.fields(cls)]
        assert vars(fast) == vars(plain) and fast == plain and repr(fast) == repr(plain)
        return fast

    return check
