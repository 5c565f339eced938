"""One state field per connection object, its legal moves in one table.

h11's habit: a connection's lifecycle is a single enum value, and every
change goes through a L{Transitions} table, so "what may happen now" is
read in one place and an impossible sequence of events is noticed where it
happens instead of as a hang or a wrong byte much later.

A move the table does not allow raises L{IllegalTransition} when L{strict}
is on (the test suite turns it on, also for the proxies it starts, through
C{LLMOBSERVE_STRICT_STATES=1}); in production it is logged and the move is
made anyway, so a modelling mistake never crashes the reactor nor changes
what is forwarded.

Moves happen a few times per request (connect, head, end), never per body
chunk: the check is one dict lookup and one set membership test.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Generic, TypeVar

from twisted.logger import Logger

__all__ = ["IllegalTransition", "StateEnum", "Transitions", "strict"]

_log = Logger()

#: Raise on an illegal move instead of logging it (tests).
strict: bool = os.environ.get("LLMOBSERVE_STRICT_STATES") == "1"


class StateEnum(Enum):
    """Base of the state enums: hashed by identity, in C.

    L{Enum} hashes a member by hashing its name in Python code, which made
    a table lookup cost as much as the rest of a move; a member is a
    singleton, so identity is the same equality, at C speed. (The members
    are also read through module-level names in the hot code: on Python
    3.11 C{Enum.MEMBER} is a descriptor call, ten times an attribute.)
    """

    __hash__ = object.__hash__


S = TypeVar("S", bound=StateEnum)


class IllegalTransition(Exception):
    """A state machine was asked for a move its table does not allow."""


class Transitions(Generic[S]):
    """The legal moves of one state machine, checked on every move."""

    def __init__(self, name: str, table: Mapping[S, Iterable[S]]) -> None:
        self.name = name
        self._table: dict[S, frozenset[S]] = {
            state: frozenset(targets) for state, targets in table.items()
        }
        #: When a set, every move made is added to it (tests check coverage).
        self.seen: set[tuple[S, S]] | None = None

    def edges(self) -> frozenset[tuple[S, S]]:
        """Every legal (from, to) pair."""
        return frozenset((a, b) for a, targets in self._table.items() for b in targets)

    def move(self, current: S, new: S) -> S:
        """Check the move from C{current} to C{new}; return C{new}."""
        if new not in self._table[current]:
            message = f"{self.name}: illegal transition {current.name} -> {new.name}"
            if strict:
                raise IllegalTransition(message)
            _log.error("{message}", message=message)
        elif self.seen is not None:
            self.seen.add((current, new))
        return new
