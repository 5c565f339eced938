"""A tiny tmpfs to fill up: a real ENOSPC for tests (Linux, as root).

    with small_tmpfs(tmp_path / "disk", kib=256) as disk:
        fill(disk)          # the next write that needs a page fails: ENOSPC
        ...
        unfill(disk)        # space again

The test is skipped where C{mount -t tmpfs} is not allowed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
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
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


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
