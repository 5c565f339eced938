"""Types for the part of pytest-twisted the tests use (it ships no py.typed).

Only what tests/ calls: both decorators keep the test's signature, as the
real ones do (ensureDeferred returns the coroutine function itself, marked;
inlineCallbacks wraps a generator as Twisted's own does).
"""

from collections.abc import Callable, Coroutine, Generator
from typing import Any, ParamSpec, TypeVar

from twisted.internet.defer import Deferred

_P = ParamSpec("_P")
_T = TypeVar("_T")

def ensureDeferred(
    f: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]: ...
def inlineCallbacks(
    f: Callable[_P, Generator[Any, Any, _T]],
) -> Callable[_P, Deferred[_T]]: ...
def blockon(d: Deferred[_T]) -> _T: ...
