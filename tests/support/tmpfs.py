"""A tiny tmpfs to fill up: a real ENOSPC for tests (Linux, as root).

    with small_tmpfs(tmp_path / "disk", kib=256) as disk:
        fill(disk)          # the next write that needs a page fails: ENOSPC
        ...
        unfill(disk)        # space again

    with small_tmpfs(tmp_path / "disk", kib=1024) as disk:
        remount(disk, "ro")  # writes and opens for writing fail: EROFS
        remount(disk, "rw")

The test is skipped loudly where C{mount} is not allowed; under
C{CI=true}, as root on Linux (where it should work), that is a failure.
Linux refuses C{remount,ro} (EBUSY) while any file on the filesystem is
open for writing: a store must be closed (or not yet opened) to be made
read-only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

FILLER = "filler"


@contextlib.contextmanager
def small_tmpfs(where: Path, kib: int) -> Iterator[Path]:
    """Mount a tmpfs of C{kib} KiB on C{where} for the block (skip if impossible)."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kib}k,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        _cannot_mount(f"cannot mount a tmpfs: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def _cannot_mount(why: str) -> None:
    """Skip loudly; fail under C{CI=true} where mounting should work (root on Linux)."""
    if os.environ.get("CI") == "true" and sys.platform == "linux" and os.geteuid() == 0:
        pytest.fail(f"MOUNT TESTS CANNOT RUN under CI=true as root: {why}", pytrace=False)
    message = f"MOUNT TESTS SKIPPED: {why}"
    sys.stderr.write(f"\n{'!' * 72}\n{message}\n{'!' * 72}\n")
    pytest.skip(message)


def remount(disk: Path, mode: str) -> None:
    """Remount the tmpfs on C{disk} C{"ro"} or C{"rw"} (skip where not allowed).

    @raise AssertionError: Linux refused it (C{ro} while a file on it is open for writing).
    """
    done = subprocess.run(
        ["mount", "-o", f"remount,{mode}", str(disk)], capture_output=True, check=False
    )
    why = done.stderr.decode(errors="replace").strip()
    if done.returncode != 0 and ("permission denied" in why.lower() or "only root" in why):
        _cannot_mount(f"cannot remount {disk} {mode}: {why}")
    assert done.returncode == 0, f"remount,{mode} of {disk} failed: {why}"


def fill(disk: Path) -> int:
    """Take every free byte of C{disk} with one file; return its size."""
    size = 0
    with open(disk / FILLER, "ab", buffering=0) as f:
        chunk = b"\0" * 4096
        while True:
            try:
                written = f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
            if not written:
                break
            size += written
    return size


def unfill(disk: Path) -> None:
    """Give back what L{fill} took."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(disk / FILLER)
