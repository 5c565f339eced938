"""How the plugins' options behave under C{twistd}.

A mistyped option says so in two lines, not after the whole C{--help}:
twistd prints its own help, then the plugin's (67 lines), and only then
C{option --prot not recognized}. The plugins' C{Options.parseOptions} call
L{brief_usage_error} instead when twistd is their parent: the error first,
a one-line hint to C{--help}, exit status 2 (a usage error, as for the
C{llmobserve} command). Parsed on their own (tests, embedding) the options
raise C{UsageError} as usual.

In the foreground (C{-n}) no pid file is written unless C{--pidfile} names
one (L{foreground_without_pidfile}): twistd's default C{twistd.pid} in the
current directory made the README's second command (a proxy beside a
collector, from one directory) stop with "Another twistd server is
running". A daemon keeps twistd's default.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from twisted.python import usage

__all__ = ["brief_usage_error", "foreground_without_pidfile"]

_DEFAULT_PIDFILE = "twistd.pid"


def brief_usage_error(command: str, error: usage.UsageError) -> NoReturn:
    """Write C{COMMAND: ERROR} and the C{--help} hint to stderr; exit 2."""
    sys.stderr.write(f"{command}: {error}\nRun '{command} --help' for every option.\n")
    sys.stderr.flush()
    raise SystemExit(2)


def foreground_without_pidfile(twistd_options: Any) -> None:
    """Under C{twistd -n} with the default pid file, write none.

    @param twistd_options: the plugin options' C{parent} (twistd's own), or None.
    """
    if twistd_options is None:
        return
    if twistd_options.get("nodaemon") and twistd_options.get("pidfile") == _DEFAULT_PIDFILE:
        twistd_options["pidfile"] = ""
