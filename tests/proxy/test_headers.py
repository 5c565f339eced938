"""Header hygiene: what the proxy forwards, consumes and regenerates."""

from llmobserve.proxy._headers import client_response_headers, split_request_headers


def test_hop_by_hop_and_connection_named_fields_are_dropped() -> None:
    """RFC 9110 §7.6.1 fields, and anything named in Connection, never go upstream."""
    head = split_request_headers(
        [
            (b"Connection", b"keep-alive, X-Foo"),
            (b"X-Foo", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"TE", b"trailers, deflate"),
            (b"Upgrade", b"h2c"),
            (b"Proxy-Authorization", b"Basic x"),
            (b"Trailer", b"X-T"),
            (b"OpenAI-Organization", b"org-1"),
            (b"anthropic-version", b"2023-06-01"),
        ]
    )
    assert head.forward == [
        (b"OpenAI-Organization", b"org-1"),
        (b"anthropic-version", b"2023-06-01"),
    ]


def test_framing_host_and_expect_are_regenerated_not_copied() -> None:
    """Content-Length, Transfer-Encoding, Host and Expect are the next hop's to write."""
    head = split_request_headers(
        [
            (b"Host", b"localhost:9000"),
            (b"Content-Length", b"5"),
            (b"Expect", b"100-continue"),
            (b"Authorization", b"Bearer sk-test"),
        ]
    )
    assert head.forward == [(b"Authorization", b"Bearer sk-test")]
    assert head.content_length == 5
    assert not head.chunked


def test_chunked_request_is_recognised() -> None:
    head = split_request_headers([(b"Transfer-Encoding", b"chunked")])
    assert head.chunked
    assert head.forward == []


def test_our_headers_are_consumed_in_any_case_and_spelling() -> None:
    """X-LLMObserve-*, x-llmobserve-* and X_LLMObserve_* never reach the upstream."""
    head = split_request_headers(
        [
            (b"X-LLMObserve-Target-URL", b"https://api.openai.com/v1/models"),
            (b"x-llmobserve-customer-id", b"cust-1"),
            (b"X_LLMObserve_Section", b"agent:researcher"),
            (b"X-Llmobserve-Section-Path", b"run/agent:researcher"),
            (b"X-LLMObserve-Property-Feature", b"summaries"),
            (b"x-api-key", b"sk-ant-test"),
        ]
    )
    assert head.forward == [(b"x-api-key", b"sk-ant-test")]
    assert head.target_url() == b"https://api.openai.com/v1/models"
    context = head.context()
    assert context.customer_id == "cust-1"
    assert context.section == "agent:researcher"
    assert context.section_path == "run/agent:researcher"
    assert context.properties == {"feature": "summaries"}


def test_context_labels_are_bounded_and_printable() -> None:
    """Control characters never reach events or logs; huge labels are cut."""
    head = split_request_headers([(b"X-LLMObserve-Customer-ID", b"a\x1b[31mb" + b"c" * 2000)])
    customer = head.context().customer_id
    assert customer is not None
    assert "\x1b" not in customer
    assert len(customer) <= 512


def test_via_with_our_pseudonym_marks_a_loop() -> None:
    assert split_request_headers([(b"Via", b"1.1 llmobserve")]).via_loop
    assert not split_request_headers([(b"Via", b"1.1 nginx")]).via_loop


def test_response_hop_by_hop_and_framing_are_dropped() -> None:
    """The client's framing is Twisted's to write; upstream hop-by-hop stays behind."""
    out, content_length = client_response_headers(
        [
            (b"Connection", b"X-Bar"),
            (b"X-Bar", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Content-Length", b"10"),
            (b"Content-Type", b"text/event-stream"),
            (b"x-request-id", b"req-1"),
        ]
    )
    assert out == [(b"Content-Type", b"text/event-stream"), (b"x-request-id", b"req-1")]
    assert content_length == b"10"


def test_fields_named_by_a_later_connection_header_are_dropped_too() -> None:
    """Connection may come last; what it names still stays behind, in either direction."""
    head = split_request_headers(
        [(b"X-Foo", b"1"), (b"Accept", b"*/*"), (b"connection", b"x-foo, , Upgrade")]
    )
    assert head.forward == [(b"Accept", b"*/*")]
    out, _ = client_response_headers([(b"X-Bar", b"1"), (b"Connection", b"x-bar")])
    assert out == []


def test_a_via_named_in_connection_is_dropped_and_not_a_loop() -> None:
    head = split_request_headers([(b"Via", b"1.1 llmobserve"), (b"Connection", b"via")])
    assert head.forward == []
    assert not head.via_loop


def test_remembered_name_kinds_give_the_same_split_and_stay_bounded() -> None:
    """Each name spelling is classified once and remembered (REQUEST_KINDS):
    the second request with the same names splits exactly as the first; a
    client inventing names cannot grow the memory past 512 names of at
    most 64 bytes."""
    from llmobserve.proxy import _headers

    pairs = [
        (b"x_LLMObserve_run_id", b"r1"),
        (b"Content-Length", b"3"),
        (b"Via", b"1.1 llmobserve"),
        (b"Host", b"127.0.0.1"),
        (b"Authorization", b"Bearer k"),
    ]
    first, second = split_request_headers(pairs), split_request_headers(pairs)
    for head in (first, second):
        assert head.ours == {b"run-id": b"r1"}
        assert head.content_length == 3 and head.via_loop
        assert head.forward == [(b"Via", b"1.1 llmobserve"), (b"Authorization", b"Bearer k")]
    for i in range(2000):
        split_request_headers([(b"X-Made-Up-%d" % i, b"v")])
    long_name = b"X-" + b"a" * 1000
    assert split_request_headers([(long_name, b"v")]).forward == [(long_name, b"v")]
    assert len(_headers.REQUEST_KINDS) <= 512
    assert all(len(name) <= 64 for name in _headers.REQUEST_KINDS)


def test_remembered_response_name_kinds_give_the_same_answer() -> None:
    """Response names are remembered too: the same upstream head, filtered
    twice, gives the same headers and Content-Length."""
    pairs = [
        (b"Content-Type", b"application/json"),
        (b"content-length", b"12"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"x-request-id", b"abc"),
    ]
    for _ in range(2):
        assert client_response_headers(pairs) == (
            [(b"Content-Type", b"application/json"), (b"x-request-id", b"abc")],
            b"12",
        )
