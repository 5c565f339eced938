"""Each HTTP-library hook against a recording server that plays the proxy.

Parametrised over httpx, httpx2 (sync and async), requests, urllib3,
urllib.request and aiohttp. What the "proxy" received is checked byte for byte: the request
line, C{X-LLMObserve-Target-URL}, C{Host}, the context headers, the body;
and what the application saw: status, headers, body and the original URL.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
from support.upstreams import RecordingUpstream, Response, closed_port, json_response

import llmobserve
from llmobserve.sdk._routing import ROUTER

pytestmark = pytest.mark.timeout(30)


def _ctx_headers(req: Any) -> dict[str, str]:
    return {
        n.decode().lower(): v.decode()
        for n, v in req.headers
        if n.lower().startswith(b"x-llmobserve-")
    }


def test_routed_call_is_rewritten_to_proxy(
    routed: Any, fake_proxy: RecordingUpstream, target: RecordingUpstream, caller: Any
) -> None:
    """A call to a routed host goes to C{/proxy} with the target, Host and context headers;
    the body and query arrive unchanged; the application sees the proxy's answer and
    its original URL."""
    fake_proxy.respond_with(json_response({"ok": 1}, headers=[("X-Upstream", "yes")]))
    path = "/v1/chat/completions?api-version=2024-06-01&x=a%2Fb&sp=a%20b"
    # What this library puts on the wire when it calls a server direct (unrouted).
    with RecordingUpstream() as other:
        caller(f"{other.url}{path}", body=b"{}", params={"extra": "1 2"})
        wire_target = other.wait_requests(1)[0].target.decode()
    url = f"{target.url}{path}"
    with llmobserve.customer("cust-1", tenant_id="t-9"), llmobserve.section("agent:researcher"):
        with llmobserve.section("tool:search"):
            reply = caller(
                url,
                body=b'{"model":"gpt-4o-mini"}',
                params={"extra": "1 2"},
                headers={"Authorization": "Bearer sk-test", "X-App": "a"},
            )
    assert reply.status == 200
    assert reply.body == b'{"ok":1}'
    assert reply.headers.get("x-upstream") == "yes"
    assert reply.url.startswith(f"{target.url}/v1/chat/completions?")
    [req] = fake_proxy.wait_requests(1)
    assert target.requests == []
    assert req.method == b"POST"
    assert req.target == b"/proxy"
    assert req.header("Host") == fake_proxy.authority.encode()
    assert req.body == b'{"model":"gpt-4o-mini"}'
    assert req.header("Authorization") == b"Bearer sk-test"
    assert req.header("X-App") == b"a"
    ctx = _ctx_headers(req)
    assert ctx["x-llmobserve-target-url"] == f"{target.url}{wire_target}"
    assert "extra=1" in wire_target  # params= merged by the library, kept in the target
    assert ctx["x-llmobserve-customer-id"] == "cust-1"
    assert ctx["x-llmobserve-tenant-id"] == "t-9"
    assert ctx["x-llmobserve-section"] == "tool:search"
    assert ctx["x-llmobserve-section-path"] == "agent:researcher/tool:search"
    assert len(ctx["x-llmobserve-span-id"]) == 16
    assert len(ctx["x-llmobserve-parent-span-id"]) == 16
    assert ctx["x-llmobserve-run-id"]


def test_streamed_upload_arrives_unchanged(
    routed: Any, fake_proxy: RecordingUpstream, target: RecordingUpstream, caller: Any
) -> None:
    """A generator body is streamed to the proxy chunk by chunk and arrives byte-identical."""
    chunks = [b"part-%d;" % i * 50 for i in range(20)]
    reply = caller(f"{target.url}/v1/files", body=chunks)
    assert reply.status == 200
    [req] = fake_proxy.wait_requests(1)
    assert req.body == b"".join(chunks)
    assert target.requests == []


def test_streamed_response_stays_streamed(
    routed: Any, fake_proxy: RecordingUpstream, target: RecordingUpstream, caller: Any
) -> None:
    """An SSE response from the proxy reaches a streaming reader exactly as sent."""
    events = [b'data: {"n":%d}\n\n' % i for i in range(5)] + [b"data: [DONE]\n\n"]
    fake_proxy.respond_with(
        Response(200, [("Content-Type", "text/event-stream")], events, chunk_interval=0.01)
    )
    reply = caller(f"{target.url}/v1/chat/completions", body=b"{}", stream=True)
    assert reply.status == 200
    assert reply.body == b"".join(events)


def test_upstream_error_reaches_application_unchanged(
    routed: Any, fake_proxy: RecordingUpstream, target: RecordingUpstream, caller: Any
) -> None:
    """A 429 relayed by the proxy is what the application gets, and nothing is re-sent."""
    fake_proxy.respond_with(
        json_response({"error": {"type": "rate_limit"}}, 429, [("Retry-After", "1")])
    )
    reply = caller(f"{target.url}/v1/chat/completions", body=b"{}")
    assert reply.status == 429
    assert reply.body == b'{"error":{"type":"rate_limit"}}'
    assert len(fake_proxy.requests) == 1
    assert target.requests == []


def test_unrouted_call_is_untouched(
    routed: Any, fake_proxy: RecordingUpstream, caller: Any
) -> None:
    """A loopback host not named in provider_hosts goes direct and carries none of our headers."""
    with RecordingUpstream() as other, llmobserve.section("s"):
        reply = caller(f"{other.url}/internal?q=1", body=b"abc")
        [req] = other.wait_requests(1)
    assert reply.status == 200
    assert req.target == b"/internal?q=1"
    assert req.body == b"abc"
    assert not any(n.lower().startswith(b"x-llmobserve") for n, _ in req.headers)
    assert fake_proxy.requests == []


def test_fail_open_when_proxy_refuses_connections(
    target: RecordingUpstream, caller: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """With the proxy down (connection refused), the call goes direct, once, with a warning."""
    port = closed_port()
    llmobserve.observe(
        proxy_url=f"http://127.0.0.1:{port}", provider_hosts={target.authority: "openai"}
    )
    with caplog.at_level("WARNING", logger="llmobserve"):
        reply = caller(f"{target.url}/v1/embeddings?x=1", body=b'{"input":"hi"}')
        reply2 = caller(f"{target.url}/v1/embeddings", body=b"2")
    assert reply.status == 200 and reply2.status == 200
    reqs = target.wait_requests(2)
    assert [r.body for r in reqs] == [b'{"input":"hi"}', b"2"]
    assert reqs[0].target == b"/v1/embeddings?x=1"
    assert not any(n.lower().startswith(b"x-llmobserve") for r in reqs for n, _ in r.headers)
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1


def test_fail_open_streamed_upload(target: RecordingUpstream, caller: Any) -> None:
    """A generator body survives the fail-open path: nothing was consumed by the failed connect."""
    llmobserve.observe(
        proxy_url=f"http://127.0.0.1:{closed_port()}", provider_hosts={target.authority: "openai"}
    )
    chunks = [b"abc", b"def", b"ghi"]
    reply = caller(f"{target.url}/upload", body=chunks)
    assert reply.status == 200
    [req] = target.wait_requests(1)
    assert req.body == b"abcdefghi"


_REFUSAL = json_response(
    {"error": {"type": "not_allowed", "message": "target not allowed"}},
    403,
    [("X-LLMObserve-Error", "not_allowed")],
)


@pytest.mark.parametrize(
    "body", [b"payload", [b"stream-", b"ed ", b"body"]], ids=["bytes", "generator"]
)
def test_policy_refusal_goes_direct_and_is_remembered(
    routed: Any,
    fake_proxy: RecordingUpstream,
    target: RecordingUpstream,
    caller: Any,
    body: Any,
) -> None:
    """A 403 policy refusal: the same call is sent direct (same bytes), and later calls to
    that host skip the proxy altogether."""
    fake_proxy.respond_with(_REFUSAL)
    first = caller(f"{target.url}/svc?a=1", body=body)
    second = caller(f"{target.url}/svc?a=2", body=body)
    assert first.status == 200 and second.status == 200
    assert len(fake_proxy.requests) == 1
    reqs = target.wait_requests(2)
    expected = body if isinstance(body, bytes) else b"".join(body)
    assert [r.body for r in reqs] == [expected, expected]
    assert [r.target for r in reqs] == [b"/svc?a=1", b"/svc?a=2"]
    assert not any(n.lower().startswith(b"x-llmobserve") for r in reqs for n, _ in r.headers)


def test_proxy_403_without_our_header_is_an_upstream_answer(
    routed: Any, fake_proxy: RecordingUpstream, target: RecordingUpstream, caller: Any
) -> None:
    """An upstream's own 403 (no X-LLMObserve-Error) is returned, never retried direct."""
    fake_proxy.respond_with(json_response({"error": "forbidden"}, 403))
    reply = caller(f"{target.url}/v1/models", method="GET")
    assert reply.status == 403
    assert target.requests == []


def test_no_double_send_after_bytes_left(
    routed: Any, target: RecordingUpstream, caller: Any
) -> None:
    """The proxy accepts the request and then drops the connection: the application gets
    an error and the target is never called direct (a byte had left)."""
    proxy_sock = ROUTER.config
    assert proxy_sock is not None
    seen = threading.Event()

    def serve(listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            seen.set()
            conn.close()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        llmobserve.observe(
            proxy_url=f"http://127.0.0.1:{port}", provider_hosts={target.authority: "openai"}
        )
        threading.Thread(target=serve, args=(listener,), daemon=True).start()
        with pytest.raises(Exception):  # noqa: B017 - each library has its own error type
            caller(f"{target.url}/v1/chat/completions", body=b"{}")
        assert seen.is_set()
        listener.close()
    assert target.requests == []


def test_websocket_upgrade_is_not_routed(
    routed: Any,
    fake_proxy: RecordingUpstream,
    target: RecordingUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request with an Upgrade header (WebSocket) goes direct: the proxy cannot relay 101.
    The first one per host says that it is not tracked."""
    import httpx

    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade"}
    with caplog.at_level("WARNING", logger="llmobserve"), httpx.Client() as client:
        client.get(f"{target.url}/ws", headers=upgrade)
        client.get(f"{target.url}/ws", headers=upgrade)
    assert len(target.wait_requests(2)) == 2
    assert fake_proxy.requests == []
    said = [r.getMessage() for r in caplog.records if "not tracked" in r.getMessage()]
    assert said == [
        f"llmobserve: calls to {target.authority} that upgrade the connection (WebSocket) "
        "are not tracked: the proxy cannot relay them; they go direct"
    ]


def test_excluded_host_goes_direct(
    fake_proxy: RecordingUpstream, target: RecordingUpstream, caller: Any
) -> None:
    """exclude_hosts wins over nothing else but provider_hosts: an excluded target is direct."""
    llmobserve.observe(proxy_url=fake_proxy.url, exclude_hosts=["127.0.0.1"])
    # 127.0.0.1 is direct anyway; exclusion of a public-looking name is checked in
    # test_routing; here the point is that configuring it does not break calls.
    reply = caller(f"{target.url}/x", body=b"1")
    assert reply.status == 200
    assert fake_proxy.requests == []


def test_shutdown_unhooks(
    routed: Any, fake_proxy: RecordingUpstream, target: RecordingUpstream, caller: Any
) -> None:
    """After shutdown() calls go direct again."""
    llmobserve.shutdown()
    caller(f"{target.url}/after", body=b"1")
    assert len(target.wait_requests(1)) == 1
    assert fake_proxy.requests == []


def test_urllib3_pool_redirect_is_followed_through_the_proxy(
    routed: Any, fake_proxy: RecordingUpstream, target: RecordingUpstream
) -> None:
    """urlopen(redirect=True) on a pool (not PoolManager): the redirect relayed by the proxy
    is followed, and the follow-up call is routed too."""
    import urllib3

    fake_proxy.queue(
        Response(302, [("Location", f"{target.url}/b?x=1"), ("Content-Length", "0")]),
        json_response({"final": True}),
    )
    host, port = target.authority.rsplit(":", 1)
    with urllib3.HTTPConnectionPool(host, int(port)) as pool:
        r = pool.urlopen("GET", "/a")
    assert r.status == 200 and r.data == b'{"final":true}'
    got = [req.header("X-LLMObserve-Target-URL") for req in fake_proxy.wait_requests(2)]
    assert got == [f"{target.url}/a".encode(), f"{target.url}/b?x=1".encode()]
    assert target.requests == []


def test_httpx_transport_behind_a_forward_proxy_reaches_ours_directly(
    routed: Any, fake_proxy: RecordingUpstream, target: RecordingUpstream
) -> None:
    """A client configured with an HTTP forward proxy (as HTTPS_PROXY would do): the
    routed call goes straight to the llmobserve proxy, not through the forward proxy."""
    import httpx2

    with RecordingUpstream() as forward, httpx2.Client(proxy=forward.url) as client:
        r = client.post(f"{target.url}/v1/chat/completions", content=b"{}")
        assert r.status_code == 200
        assert forward.requests == []
    [req] = fake_proxy.wait_requests(1)
    assert req.target == b"/proxy"
    assert target.requests == []


def test_urllib_redirect_is_followed_through_the_proxy(
    routed: Any, fake_proxy: RecordingUpstream, target: RecordingUpstream
) -> None:
    """urllib.request's opener follows a redirect the proxy relayed; the next
    hop is routed too, and geturl() names the final target."""
    import urllib.request

    fake_proxy.queue(
        Response(302, [("Location", f"{target.url}/b?x=1"), ("Content-Length", "0")]),
        json_response({"final": True}),
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{target.url}/a", timeout=20) as r:
        assert (r.status, r.read(), r.geturl()) == (200, b'{"final":true}', f"{target.url}/b?x=1")
    got = [req.header("X-LLMObserve-Target-URL") for req in fake_proxy.wait_requests(2)]
    assert got == [f"{target.url}/a".encode(), f"{target.url}/b?x=1".encode()]
    assert target.requests == []


def test_urllib_behind_a_forward_proxy_reaches_ours_directly(
    routed: Any, fake_proxy: RecordingUpstream, target: RecordingUpstream
) -> None:
    """An opener with a forward proxy (as HTTP_PROXY gives urlopen): the routed
    call goes straight to the llmobserve proxy, not through the forward proxy."""
    import urllib.request

    with RecordingUpstream() as forward:
        handler = urllib.request.ProxyHandler({"http": forward.url})
        opener = urllib.request.build_opener(handler)
        with opener.open(f"{target.url}/v1/chat/completions", data=b"{}", timeout=20) as r:
            assert r.status == 200
        assert forward.requests == []
    [req] = fake_proxy.wait_requests(1)
    assert req.target == b"/proxy"
    assert req.header("X-LLMObserve-Target-URL") == f"{target.url}/v1/chat/completions".encode()
    assert target.requests == []


def test_unrouted_local_call_says_once_that_it_is_not_tracked(
    routed: Any, fake_proxy: RecordingUpstream, caller: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A loopback host not named in provider_hosts goes direct with one warning per host
    naming it and the fix (issue 14, item 1): never silently untracked."""
    with RecordingUpstream() as other, caplog.at_level("WARNING", logger="llmobserve"):
        assert caller(f"{other.url}/v1/chat/completions", body=b"1").status == 200
        assert caller(f"{other.url}/v1/chat/completions", body=b"2").status == 200
        other.wait_requests(2)
    said = [r.getMessage() for r in caplog.records if "not tracked" in r.getMessage()]
    assert said == [
        f"llmobserve: calls to {other.authority} are not tracked (loopback); "
        f'pass provider_hosts={{"{other.authority}": "<provider>"}} to track them'
    ]
    assert fake_proxy.requests == []


def test_policy_refusal_says_once_why_the_calls_are_not_tracked(
    routed: Any,
    fake_proxy: RecordingUpstream,
    target: RecordingUpstream,
    caller: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A target the proxy refuses is sent direct with one warning giving the proxy's
    reason (issue 14, item 2): a refused call is never silently untracked."""
    fake_proxy.respond_with(_REFUSAL)
    with caplog.at_level("WARNING", logger="llmobserve"):
        assert caller(f"{target.url}/a", body=b"1").status == 200
        assert caller(f"{target.url}/b", body=b"2").status == 200
    said = [r.getMessage() for r in caplog.records if "NOT tracked" in r.getMessage()]
    assert len(said) == 1
    assert f"http://{target.authority}" in said[0]
    assert "not_allowed: target not allowed" in said[0]


def test_call_straight_to_the_proxy_carries_the_context(
    routed: Any, fake_proxy: RecordingUpstream, caller: Any
) -> None:
    """A client pointed at the proxy in base-URL mode gets the context headers too
    (issue 14, item 3), but no target header: the proxy routes it by its path."""
    url = f"{fake_proxy.url}/openai/v1/chat/completions"
    with llmobserve.customer("acme"), llmobserve.section("agent:baseurl"):
        reply = caller(url, body=b"{}")
    assert reply.status == 200
    [req] = fake_proxy.wait_requests(1)
    assert req.target == b"/openai/v1/chat/completions"
    ctx = _ctx_headers(req)
    assert ctx["x-llmobserve-customer-id"] == "acme"
    assert ctx["x-llmobserve-section-path"] == "agent:baseurl"
    assert "x-llmobserve-target-url" not in ctx
    assert req.body == b"{}"


def test_urllib_request_reused_in_base_url_mode_gets_each_calls_context(
    routed: Any, fake_proxy: RecordingUpstream
) -> None:
    """One urllib Request object sent twice straight to the proxy, in two
    customers' contexts: each call carries its own customer, not the first's."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{fake_proxy.url}/openai/v1/chat/completions", data=b"{}")
    for customer in ("first", "second"):
        with llmobserve.customer(customer), opener.open(request, timeout=20) as r:
            assert r.status == 200
    reqs = fake_proxy.wait_requests(2)
    assert [_ctx_headers(r)["x-llmobserve-customer-id"] for r in reqs] == ["first", "second"]
