"""GraphQL depth and complexity limits per host, checked before forwarding.

C{--graphql-max-depth HOST=N} and C{--graphql-max-complexity HOST=N}: a
GraphQL request to HOST (or HOST:PORT) whose operation is deeper, or scores
higher, than N is refused with a 400 C{graphql_limit} naming the computed
figure, before any byte goes upstream. The figures are the events' own
(C{parsers.graphql_figures}: depth in fields, complexity as fields times
the page sizes of their C{first}/C{limit}/... arguments). A request to such
a host that is not GraphQL passes; a GraphQL request whose document cannot
be measured (too large, nested too deeply, a syntax error, a persisted
query sent as a hash only) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from parsers import graphql_figures

__all__ = ["GraphQLLimit", "GraphQLLimits"]


@attrs.frozen
class GraphQLLimit:
    """The most depth and complexity one host accepts (None: no limit)."""

    max_depth: int | None = None
    max_complexity: int | None = None


class GraphQLLimits:
    """Limits by host (C{host} or C{host:port}, lower case)."""

    def __init__(self, limits: Mapping[str, GraphQLLimit]) -> None:
        self._limits = {k.lower().rstrip("."): v for k, v in limits.items()}

    def __bool__(self) -> bool:
        return bool(self._limits)

    def for_target(self, host: str, port: int) -> GraphQLLimit | None:
        """The limit of this target, if any (a C{host:port} entry first)."""
        limits = self._limits
        return limits.get(f"{host}:{port}") or limits.get(host)

    @staticmethod
    def refusal(
        limit: GraphQLLimit,
        *,
        method: str,
        path: str,
        query: str,
        content_type: str,
        body: bytes | None,
    ) -> tuple[str, dict[str, object]] | None:
        """Why this request is over the limit (message and figures), or None."""
        if body is None:
            return "GraphQL request body too large to measure", {}
        figures = graphql_figures(method, path, query, content_type, body)
        if figures is None:
            return None
        if figures.get("error"):
            return f"GraphQL query cannot be measured: {figures['error']}", {}
        depth, complexity = figures.get("depth", 0), figures.get("complexity", 0)
        shown = {"depth": depth, "complexity": complexity}
        if limit.max_depth is not None and depth > limit.max_depth:
            return f"GraphQL query depth {depth} is over this host's limit of {limit.max_depth}", {
                **shown,
                "max_depth": limit.max_depth,
            }
        if limit.max_complexity is not None and complexity > limit.max_complexity:
            return (
                f"GraphQL query complexity {complexity} is over this host's limit"
                f" of {limit.max_complexity}",
                {**shown, "max_complexity": limit.max_complexity},
            )
        return None
