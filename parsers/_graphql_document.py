"""The GraphQL document itself, read with graphql-core's parser.

Imported on the first GraphQL call (from L{parsers.graphql}): graphql-core
adds ~5 MB to the process, which a proxy that never sees GraphQL does not
need to carry. That first call pays the import (tens of milliseconds, in a
parse thread).
"""

from __future__ import annotations

from typing import Any

from graphql.error import GraphQLError
from graphql.language import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    SelectionSetNode,
    VariableNode,
    parse,
)

from ._draft import UsageDraft, as_count

__all__ = ["describe"]

_PAGE_ARGS = ("first", "last", "limit", "top", "pageSize", "per_page")
_MAX_QUERY = 256 * 1024
_MAX_TOKENS = 50_000
_MAX_SCORE = 10**12


def describe(
    query: str, name: str | None, variables: dict[str, Any], info: dict[str, Any], draft: UsageDraft
) -> None:
    """Operation type and name, depth, field count and complexity of C{query}, into C{info}."""
    info.update(operation_type=None, operation_name=name, depth=0, field_count=0, complexity=0)
    if len(query) > _MAX_QUERY:
        draft.error("GraphQL query too large to parse")
        return
    try:
        document = parse(query, no_location=True, max_tokens=_MAX_TOKENS)
    except GraphQLError as exc:
        draft.error(f"GraphQL syntax error: {exc.message[:120]}")
        return
    except RecursionError:
        draft.error("GraphQL query nested too deeply")
        return
    operation = _pick_operation(document, name)
    if operation is None:
        draft.error("GraphQL document has no matching operation")
        return
    info["operation_type"] = operation.operation.value
    if operation.name is not None:
        info["operation_name"] = operation.name.value
    fragments = {
        d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
    }
    walker = _Walker(fragments, variables)
    try:
        score = walker.cost(operation.selection_set, 1, frozenset())
    except RecursionError:
        draft.error("GraphQL query nested too deeply")
        return
    info.update(depth=walker.depth, field_count=walker.fields, complexity=min(score, _MAX_SCORE))


def _pick_operation(document: DocumentNode, name: str | None) -> OperationDefinitionNode | None:
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if name:
        for op in operations:
            if op.name is not None and op.name.value == name:
                return op
        return None
    return operations[0] if len(operations) == 1 else None


class _Walker:
    """Counts fields, depth and the complexity score over one operation."""

    def __init__(self, fragments: dict[str, FragmentDefinitionNode], variables: dict[str, Any]):
        self.fragments = fragments
        self.variables = variables
        self.fields = 0
        self.depth = 0
        self._budget = 100_000  # selections visited, so fragment fan-out stays bounded

    def cost(self, selections: SelectionSetNode | None, level: int, seen: frozenset[str]) -> int:
        if selections is None:
            return 0
        total = 0
        for node in selections.selections:
            self._budget -= 1
            if self._budget < 0:
                break
            if isinstance(node, FieldNode):
                self.fields += 1
                self.depth = max(self.depth, level)
                child = self.cost(node.selection_set, level + 1, seen)
                total += 1 + self._page_size(node) * child
            elif isinstance(node, InlineFragmentNode):
                total += self.cost(node.selection_set, level, seen)
            elif isinstance(node, FragmentSpreadNode):
                frag_name = node.name.value
                fragment = self.fragments.get(frag_name)
                if fragment is not None and frag_name not in seen:
                    total += self.cost(fragment.selection_set, level, seen | {frag_name})
            total = min(total, _MAX_SCORE)
        return total

    def _page_size(self, node: FieldNode) -> int:
        for arg in node.arguments or ():
            if arg.name.value not in _PAGE_ARGS:
                continue
            value = arg.value
            if isinstance(value, IntValueNode):
                size = as_count(value.value) if len(value.value) < 10 else None
            elif isinstance(value, VariableNode):
                size = as_count(self.variables.get(value.name.value))
            else:
                size = None
            if size is not None:
                return max(1, min(size, 100_000))
        return 1
