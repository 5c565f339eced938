"""Shared helpers for llmobserve's tests: real processes, fake upstreams, raw clients.

Imported as C{from support.proxy import ...} (pytest puts C{tests/} on the path).

- L{support.proxy}: C{ProxyProcess(args)} / C{CollectorProcess(args, db=...)}
  run C{twistd -n llmobserve[-collector] --port tcp:0:interface=127.0.0.1}
  in a temp dir with C{LLMOBSERVE_HOME} set; C{.port .url .pid .rss_kib()
  .peak_rss_kib() .fd_count() .cpu_seconds() .log_text() .terminate()
  .kill()}; C{RSSSampler(proc)}; C{LOOPBACK_ARGS} admits 127.0.0.1 upstreams
  with short timeouts.
- L{support.upstreams}: C{RecordingUpstream}, C{SSEUpstream},
  C{BigBodyUpstream}, C{RawScriptUpstream} (steps C{ReadRequest}, C{Send},
  C{Sleep}, C{Stall}, C{Close}, C{Reset}, ...), C{FullBacklogListener},
  C{closed_port()}; each records raw bytes and h11-parsed requests.
- L{support.clients}: C{proxy_request()} / C{build_request()} build exact
  bytes; C{RawClient} sends them and parses replies with h11;
  C{StreamReader} timestamps every body piece and can abort (FIN/RST).

Fixtures (C{tests/conftest.py}): C{proxy_factory(*args)},
C{collector_factory(*args, db=None)}, C{upstream_factory(cls, ...)},
C{recording_upstream}, C{sse_upstream}, C{big_body_upstream},
C{raw_upstream}, C{down_port}.
"""
