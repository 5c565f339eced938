"""Installing the HTTP-library hooks, now or when the library is first imported.

C{observe()} hooks the libraries already imported at once; for the others a
small import finder hooks each one right after its first import, so calling
C{observe()} before C{import openai} and after it both work, and the SDK
never imports a library the application does not use.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from llmobserve.sdk import _hook_aiohttp, _hook_httpx, _hook_urllib3, _hook_urllib_request

__all__ = ["LIBRARIES", "install_hooks", "uninstall_hooks"]

Installer = Callable[[ModuleType], bool]

#: Library module name -> (install, uninstall).
LIBRARIES: dict[str, tuple[Installer, Callable[[ModuleType], None]]] = {
    "httpx2": (_hook_httpx.install, _hook_httpx.uninstall),
    "httpx": (_hook_httpx.install, _hook_httpx.uninstall),
    "urllib3": (_hook_urllib3.install, _hook_urllib3.uninstall),
    "aiohttp": (_hook_aiohttp.install, _hook_aiohttp.uninstall),
    "urllib.request": (_hook_urllib_request.install, _hook_urllib_request.uninstall),
}

_lock = threading.RLock()


def _hook(module: ModuleType) -> None:
    entry = LIBRARIES.get(module.__name__)
    if entry is not None:
        entry[0](module)


class _HookingLoader(importlib.abc.Loader):
    """Runs the real loader, then hooks the freshly imported library."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        result: ModuleType | None = self._inner.create_module(spec)
        return result

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        if _finder in sys.meta_path:
            with _lock:
                _hook(module)


class _HookOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader other finders return for our libraries."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in LIBRARIES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookingLoader(spec.loader)
                return spec
        return None


_finder = _HookOnImport()


def install_hooks() -> list[str]:
    """Hook every library already imported, and the others on import. Returns those hooked now."""
    hooked = []
    with _lock:
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
        for name, (install, _) in LIBRARIES.items():
            module = sys.modules.get(name)
            if module is not None and module.__name__ == name:
                install(module)
                hooked.append(name)
    return hooked


def uninstall_hooks() -> None:
    """Remove every hook and the import finder."""
    with _lock:
        if _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        for name, (_, uninstall) in LIBRARIES.items():
            module = sys.modules.get(name)
            if module is not None and module.__name__ == name:
                uninstall(module)
