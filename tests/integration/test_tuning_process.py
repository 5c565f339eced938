"""C{twistd llmobserve --no-tuning}: the same proxy, the process left alone.

The proxy logs which process-wide changes it made once it listens; with
C{--no-tuning} it says none, and forwards, records and stops as usual.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from support.clients import chat_calls
from support.proxy import LOOPBACK_ARGS, ProxyProcess
from support.upstreams import RecordingUpstream

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("flags", "logged"),
    [
        ((), r"process tuning: poll, (malloc_arenas, )?gc_freeze"),
        (("--no-tuning",), r"process tuning: off \(--no-tuning\)"),
    ],
)
def test_the_tuning_switch_in_a_real_process(
    tmp_path: Path, flags: tuple[str, ...], logged: str
) -> None:
    """Both ways the proxy forwards calls and exits 0 on SIGTERM; its log says
    which process-wide changes it made (the malloc arena cap is skipped when
    C{MALLOC_ARENA_MAX} is set)."""
    with RecordingUpstream() as upstream:
        args = [*LOOPBACK_ARGS, "--provider-host", f"127.0.0.1:{upstream.port}=openai", *flags]
        with ProxyProcess(args, workdir=tmp_path / "proxy") as proxy:
            chat_calls(proxy.port, upstream.url, 2)
            assert len(upstream.requests) == 2
            proxy.send_signal(signal.SIGTERM)
            assert proxy.wait(15) == 0
            assert re.search(logged, proxy.log_text()), proxy.log_tail()
