"""How --workers derives its siblings' command line and address."""

from llmobserve.proxy._workers import child_arguments, tcp_address


def test_tcp_address_reads_plain_tcp_endpoints_only() -> None:
    assert tcp_address("tcp:9000:interface=127.0.0.1") == ("127.0.0.1", 9000)
    assert tcp_address("tcp:port=9000:interface=\\:\\:1") == ("::1", 9000)
    assert tcp_address("tcp:9000") == ("0.0.0.0", 9000)
    assert tcp_address("unix:/tmp/x") is None
    assert tcp_address("ssl:443:privateKey=k") is None


def test_siblings_get_the_same_options_on_the_bound_port() -> None:
    argv = [
        "twistd", "-n", "--pidfile=", "--logfile=/tmp/x.log", "llmobserve",
        "--port", "tcp:0:interface=127.0.0.1", "--workers", "3",
        "--allow-cidr", "127.0.0.1/32", "--db=/tmp/e.db",
    ]  # fmt: skip
    args = child_arguments(argv, "tcp:41234:interface=127.0.0.1", 4242)
    assert args[:2] == ["-n", "--pidfile="]
    assert "--logfile=/tmp/x.log" not in args
    assert args.count("llmobserve") == 1
    assert "--workers" not in args and "3" not in args
    assert args[-4:] == ["--port", "tcp:41234:interface=127.0.0.1", "--worker-of", "4242"]
    assert ["--allow-cidr", "127.0.0.1/32"] == args[args.index("--allow-cidr") :][:2]
    assert "--db=/tmp/e.db" in args
