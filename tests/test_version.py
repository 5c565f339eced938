"""C{llmobserve.__version__} is the installed distribution's version."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import llmobserve


def test_the_version_is_the_distributions() -> None:
    """One place states the version: pyproject.toml, read through importlib.metadata."""
    assert llmobserve.__version__ == version("llmobserve")
    from llmobserve import __version__

    assert __version__ == version("llmobserve")


def test_importing_the_sdk_does_not_read_the_metadata() -> None:
    """C{import llmobserve} leaves C{importlib.metadata} unloaded until the version is asked."""
    code = (
        "import sys, llmobserve\n"
        "assert 'importlib.metadata' not in sys.modules\n"
        "print(llmobserve.__version__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == version("llmobserve")
