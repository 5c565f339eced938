"""A real Chromium for the dashboard's tests, driven by Playwright.

The system's Chromium (Debian's C{chromium} package) is used, never a
browser that Playwright would download. Without one (or without Playwright)
the tests skip with a loud message; under C{CI=true} that is a failure.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

__all__ = ["chromium_path", "launched_chromium", "require_browser"]


def chromium_path() -> str | None:
    """The system Chromium: C{$LLMOBSERVE_CHROMIUM}, or C{chromium} on the PATH."""
    named = os.environ.get("LLMOBSERVE_CHROMIUM")
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_browser() -> str:
    """The Chromium to drive; skip (fail under C{CI=true}) when there is none."""
    missing = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "Playwright for Python is not installed (pip install -e '.[test]')"
    path = chromium_path()
    if missing is None and path is None:
        missing = "no Chromium on the PATH (apt-get install chromium, or set LLMOBSERVE_CHROMIUM)"
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"BROWSER TESTS CANNOT RUN under CI=true: {missing}", pytrace=False)
        message = f"BROWSER TESTS SKIPPED: {missing}"
        sys.stderr.write(f"\n{'!' * 72}\n{message}\n{'!' * 72}\n")
        pytest.skip(message)
    assert path is not None
    return path


@contextmanager
def launched_chromium(path: str) -> Iterator[Any]:
    """A headless Chromium (no sandbox: tests may run as root) for one module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=path,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            yield browser
        finally:
            browser.close()
