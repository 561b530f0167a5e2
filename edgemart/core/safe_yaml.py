"""Bounded YAML for the hand-written files edgemart reads: chain files and model-card front matter.

yaml.safe_load has no limits: a few hundred bytes of nested aliases ("billion laughs") expand to
billions of nodes, deep nesting overflows the stack, and malformed tagged scalars leak ValueError,
KeyError or AttributeError. load_yaml checks size, depth and the alias-expanded size of the node
graph before building any Python object, and returns only JSON-compatible values."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from edgemart.core.errors import UsageError


@dataclass(frozen=True)
class YamlLimits:
    """Bounds checked before any Python object is built (safe defaults for hand-written files)."""

    max_chars: int = 1024 * 1024
    max_depth: int = 64  # nesting, counted through aliases as they expand
    # Nodes plus scalar characters once every alias is expanded: what a consumer walking the
    # value (json.dumps, repr) will touch. Plain documents cost at most about twice their length.
    max_expanded: int = 4 * 1024 * 1024
    max_int_chars: int = 100  # longer integers are refused (int() and repr are super-linear)


DEFAULT_YAML_LIMITS = YamlLimits()


def load_yaml(text: str, *, what: str, first_line: int = 1, limits: YamlLimits = DEFAULT_YAML_LIMITS) -> Any:
    """One YAML document as JSON-compatible values; UsageError ``"{what} at line L, column C: ..."``.

    ``first_line`` is the file line where ``text`` starts, so positions point into the whole file.
    Timestamps and !!binary stay the text as written and !!set becomes a list, so every result
    serializes with json.dumps."""
    if not isinstance(text, str):
        raise UsageError(f"{what}: expected text")
    if len(text) > limits.max_chars:
        raise UsageError(f"{what}: {len(text)} characters exceeds the limit of {limits.max_chars}")
    loader = None
    try:
        loader = _BoundedLoader(text, limits)  # the reader refuses non-printable characters here
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = "; ".join(p for p in (exc.context, exc.problem) if p) or "malformed"
        if mark is None:
            raise UsageError(f"{what}: {problem}") from None
        where = f"line {mark.line + first_line}, column {mark.column + 1}"
        raise UsageError(f"{what} at {where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{what}: {str(exc).splitlines()[0] if str(exc) else 'malformed'}") from None
    finally:
        if loader is not None:
            loader.dispose()


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, text: str, limits: YamlLimits) -> None:
        super().__init__(text)
        self._limits = limits
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        # The composer recurses once per nesting level: stop before Python's recursion limit does.
        self._depth += 1
        try:
            if self._depth > self._limits.max_depth:
                raise ComposerError(
                    None,
                    None,
                    f"nested more than {self._limits.max_depth} levels deep",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node, self._limits)
        return node


def _children(node: Node) -> Iterator[Node]:
    if isinstance(node, SequenceNode):
        yield from node.value
    elif isinstance(node, MappingNode):
        for key, value in node.value:
            yield key
            yield value


def _check_expansion(root: Node, limits: YamlLimits) -> None:
    """Expanded size and depth of the node graph (aliases share nodes), iteratively and memoized:
    linear in the distinct nodes however far the aliases would expand; refuses alias cycles."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, expanded depth)
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            kids = [done[id(k)] for k in _children(node)]
            size = 1 + (len(node.value) if isinstance(node, ScalarNode) else 0) + sum(s for s, _ in kids)
            depth = 1 + max((d for _, d in kids), default=0)
            if size > limits.max_expanded:
                raise ComposerError(
                    None,
                    None,
                    f"aliases expand past {limits.max_expanded} nodes and characters (an alias bomb?)",
                    node.start_mark,
                )
            if depth > limits.max_depth:
                raise ComposerError(
                    None, None, f"aliases nest more than {limits.max_depth} levels deep", node.start_mark
                )
            done[key] = (size, depth)
            continue
        if key in done:
            continue
        if key in on_path:
            raise ComposerError(None, None, "an alias refers to a node that contains it", node.start_mark)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in done)


def _refusing_bad_values(construct: Callable[..., Any]) -> Callable[[Any, Node], Any]:
    """PyYAML's scalar constructors raise ValueError/KeyError/... on values like `!!bool x`."""

    def wrapped(self: Any, node: Node) -> Any:
        try:
            return construct(self, node)
        except (ValueError, KeyError, IndexError, AttributeError, TypeError, OverflowError):
            tag = str(node.tag).rsplit(":", 1)[-1]
            raise ConstructorError(None, None, f"not a valid {tag} value", node.start_mark) from None

    return wrapped


def _construct_int(self: _BoundedLoader, node: ScalarNode) -> int:
    limit = self._limits.max_int_chars
    if len(self.construct_scalar(node)) > limit:
        raise ConstructorError(None, None, f"integer longer than {limit} characters", node.start_mark)
    return SafeConstructor.construct_yaml_int(self, node)


def _construct_as_text(self: Any, node: Node) -> str:
    return str(self.construct_scalar(node))


def _construct_set(self: Any, node: Node) -> Iterator[list[Any]]:
    items: list[Any] = []
    yield items
    items.extend(self.construct_mapping(node))


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _refusing_bad_values(_construct_int))
for _tag, _construct in (
    ("bool", SafeConstructor.construct_yaml_bool),
    ("float", SafeConstructor.construct_yaml_float),
    ("null", SafeConstructor.construct_yaml_null),
):
    _BoundedLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refusing_bad_values(_construct))
_BoundedLoader.add_constructor("tag:yaml.org,2002:timestamp", _construct_as_text)
_BoundedLoader.add_constructor("tag:yaml.org,2002:binary", _construct_as_text)
_BoundedLoader.add_constructor("tag:yaml.org,2002:set", _construct_set)

__all__ = ["DEFAULT_YAML_LIMITS", "YamlLimits", "load_yaml"]
