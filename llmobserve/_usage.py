"""A mistyped option says so in two lines, not after the whole C{--help}.

twistd prints its own help, then the plugin's (67 lines), and only then
C{option --prot not recognized}. The plugins' C{Options.parseOptions} call
L{brief_usage_error} instead when twistd is their parent: the error first,
a one-line hint to C{--help}, exit status 2 (a usage error, as for the
C{llmobserve} command). Parsed on their own (tests, embedding) the options
raise C{UsageError} as usual.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from twisted.python import usage

__all__ = ["brief_usage_error"]


def brief_usage_error(command: str, error: usage.UsageError) -> NoReturn:
    """Write C{COMMAND: ERROR} and the C{--help} hint to stderr; exit 2."""
    sys.stderr.write(f"{command}: {error}\nRun '{command} --help' for every option.\n")
    sys.stderr.flush()
    raise SystemExit(2)
