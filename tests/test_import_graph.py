"""The seams between packages, checked on the import graph.

Two kinds of check: what a fresh interpreter loads when one package is
imported (the events package must not load the relay, the SDK must not load
Twisted), and a static read of every module's imports (a C{_}-prefixed
module is private to its package: other packages use the package's face).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The trees whose modules the static check reads.
SOURCES = ("llmobserve", "parsers")


def loaded_after(statement: str) -> list[str]:
    """The module names a fresh interpreter holds after running C{statement}."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    names: list[str] = json.loads(done.stdout.splitlines()[-1])
    return names


@pytest.mark.parametrize("module", ["llmobserve.events", "llmobserve.events.pipeline"])
def test_the_events_package_loads_nothing_of_the_proxy(module: str) -> None:
    """C{import llmobserve.events} (and its pipeline) loads no C{llmobserve.proxy}
    module and no collector module: the records they share live in the leaf
    module C{llmobserve.transaction}, and the embedded store is passed in."""
    names = loaded_after(f"import {module}")
    assert "llmobserve.transaction" in names or module == "llmobserve.events"
    assert [n for n in names if n.startswith("llmobserve.proxy")] == []
    assert [n for n in names if n.startswith("llmobserve.collector")] == []


def test_the_leaf_module_imports_nothing_of_the_project() -> None:
    """C{llmobserve.transaction} loads no other package of the project."""
    names = loaded_after("import llmobserve.transaction")
    package = set(loaded_after("import llmobserve"))  # the SDK face, loaded with any submodule
    ours = [n for n in names if n.startswith(("llmobserve.", "parsers")) and n not in package]
    assert ours == ["llmobserve.transaction"]


def test_the_sdk_loads_no_twisted() -> None:
    """C{import llmobserve} (the SDK face) loads no Twisted at all."""
    names = loaded_after("import llmobserve")
    assert [n for n in names if n == "twisted" or n.startswith("twisted.")] == []


@pytest.mark.parametrize("module", ["llmobserve.collector", "llmobserve.cli"])
def test_the_store_and_the_cli_load_no_twisted(module: str) -> None:
    """The collector's face serves its Twisted parts on first use: the CLI,
    which reads a store file through it, loads no Twisted and no pipeline."""
    names = loaded_after(f"import {module}")
    assert [n for n in names if n == "twisted" or n.startswith("twisted.")] == []
    assert "llmobserve.events.pipeline" not in names


@pytest.mark.parametrize(
    "package", ["llmobserve", "llmobserve.events", "llmobserve.collector", "parsers"]
)
def test_every_name_a_package_exports_resolves(package: str) -> None:
    """Each name in a package's C{__all__} is there (the lazy ones load on use)."""
    code = (
        f"import {package} as p\n"
        "missing = [n for n in p.__all__ if getattr(p, n, None) is None]\n"
        "assert not missing, missing"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def package_of(path: Path) -> str:
    """The dotted package a source file belongs to."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts if path.name == "__init__.py" else parts[:-1]).removesuffix(".__init__")


def imported_names(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """Every absolute module name C{path} imports (and the line), relative ones resolved."""
    tree = ast.parse(path.read_text() if text is None else text, str(path))
    package = package_of(path)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return found


def private_imports(path: Path, text: str | None = None) -> list[str]:
    """C{file:line imports name} for each import of another package's C{_}-module.

    A subpackage counts as part of its parent: C{parsers.pricing} may use
    C{parsers._records}. C{__init__} modules and dunder names are not private.
    Other projects' private names are the compat modules' business (see
    C{tests/test_compat.py}).
    """
    bad: list[str] = []
    own = package_of(path)
    for line, name in dict.fromkeys(imported_names(path, text)):
        parts = name.split(".")
        if parts[0] not in SOURCES:
            continue
        for i, part in enumerate(parts):
            if part.startswith("_") and not part.startswith("__"):
                owner = ".".join(parts[:i])
                if own != owner and not own.startswith(owner + "."):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {owner}.{part}")
                break
    return list(dict.fromkeys(bad))


def private_imports_across_packages() -> list[str]:
    """L{private_imports} over every module of L{SOURCES}."""
    found = (
        each
        for tree in SOURCES
        for path in sorted((ROOT / tree).rglob("*.py"))
        for each in private_imports(path)
    )
    return list(dict.fromkeys(found))


def test_no_module_imports_another_packages_private_module() -> None:
    """Outside its package, a C{_}-module is reached only through the package's
    C{__init__} (its C{__all__}), never by name."""
    assert private_imports_across_packages() == []


def test_the_static_check_sees_a_private_import() -> None:
    """The checker itself: another package's C{_}-module is reported in every
    spelling; a package's own, a parent's and a package face are not."""
    where = ROOT / "llmobserve" / "proxy" / "x.py"
    assert private_imports(where, "from llmobserve.events._codec import MAGIC\n") == [
        "llmobserve/proxy/x.py:1 imports llmobserve.events._codec"
    ]
    assert private_imports(where, "from llmobserve.events import _codec\n") != []
    assert private_imports(where, "import llmobserve.collector._store\n") != []
    assert private_imports(where, "from ..events._codec import MAGIC\n") != []
    assert private_imports(where, "from llmobserve.proxy._relay import Relay\n") == []
    assert private_imports(where, "from ._relay import Relay\n") == []
    assert private_imports(where, "from llmobserve.events import MAGIC\n") == []
    sub = ROOT / "parsers" / "pricing" / "x.py"
    assert private_imports(sub, "from parsers._records import UsageRecord\n") == []
