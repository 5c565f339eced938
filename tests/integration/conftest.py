"""Fixtures for the real-process forwarding tests: shared proxies per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.proxy import LOOPBACK_ARGS, ProxyProcess


def _start(tmp_path_factory: pytest.TempPathFactory, name: str, *args: str) -> ProxyProcess:
    return ProxyProcess(args, workdir=tmp_path_factory.mktemp(name)).start()


@pytest.fixture(scope="module")
def _loopback_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    proc = _start(tmp_path_factory, "loopback-proxy", *LOOPBACK_ARGS)
    try:
        yield proc
    finally:
        proc.terminate(5.0)


@pytest.fixture
def loopback_proxy(_loopback_proxy: ProxyProcess) -> ProxyProcess:
    """
    A proxy shared by the tests of one module, started with
    C{--allow-cidr 127.0.0.1/32} and short timeouts; fails the test at once
    if an earlier test killed it.
    """
    assert _loopback_proxy.running, "proxy died:\n" + _loopback_proxy.log_tail()
    return _loopback_proxy


@pytest.fixture(scope="module")
def _default_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    proc = _start(tmp_path_factory, "default-proxy", "--connect-timeout", "1")
    try:
        yield proc
    finally:
        proc.terminate(5.0)


@pytest.fixture
def default_proxy(_default_proxy: ProxyProcess) -> ProxyProcess:
    """A shared proxy with the default target policy (loopback refused)."""
    assert _default_proxy.running, "proxy died:\n" + _default_proxy.log_tail()
    return _default_proxy
