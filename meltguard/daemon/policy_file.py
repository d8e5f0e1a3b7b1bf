"""Policy files: YAML text in, a validated Policy out, or every problem as `FILE:LINE: key: msg`.

The model (admission/policy.py) knows nothing of files; it reports problems as key paths.
This module keeps the YAML node tree it parsed so each path can be put back on the line
where ops wrote it, the way compilers report errors, so an editor can jump there.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from importlib import resources

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from meltguard.admission.policy import (
    LEVEL_NAMES,
    Path,
    Policy,
    PolicyError,
    PolicyIssue,
    parse_policy,
)

BUILTIN_NAME = "<builtin>/default.yaml"
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    policy: Policy
    path: str  # as the operator named it; every message and the summary use it
    sha256: str  # of the file's bytes: what policy_info{sha256} and the reload log show
    text: str


class PolicyFileError(ValueError):
    """Every problem of one file at once, so one edit-check round fixes them all."""

    def __init__(self, lines: tuple[str, ...]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def hash_key(key: str) -> str:
    """What `api_keys[].key_sha256` holds: the file never contains a usable key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """The SHA-256 of the file's bytes as they are now, None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def load_policy_file(path: str | os.PathLike[str]) -> LoadedPolicy:
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise PolicyFileError((f"{name}:1: (top level): cannot read the file: {reason}",)) from None
    return _load_bytes(data, name)


def load_policy_text(text: str, name: str = "<policy>") -> LoadedPolicy:
    return _load(text, name, hashlib.sha256(text.encode("utf-8")).hexdigest())


@functools.cache
def builtin_policy() -> LoadedPolicy:
    """The policy `meltguard serve` runs without --policy; shipped inside the package."""
    data = resources.files("meltguard").joinpath("policies/default.yaml").read_bytes()
    return _load_bytes(data, BUILTIN_NAME)


def check_summary(loaded: LoadedPolicy) -> str:
    """The line `meltguard policy check` prints for a good file."""
    policy = loaded.policy
    levels = [name for name in LEVEL_NAMES if name in policy.pressure.levels]
    parts = [
        f"mode {policy.mode}",
        _count(len(policy.tiers), "tier"),
        _count(len(policy.api_keys), "key"),
        f"levels {'/'.join(levels) if levels else 'none'}",
        f"sha256 {loaded.sha256[:8]}",
    ]
    return f"{loaded.path}: ok ({', '.join(parts)})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _load_bytes(data: bytes, name: str) -> LoadedPolicy:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyFileError((
            f"{name}:{line}: (top level): the file is not UTF-8 text "
            f"(byte 0x{data[exc.start]:02x} at offset {exc.start})",
        )) from None
    return _load(text, name, hashlib.sha256(data).hexdigest())


def _load(text: str, name: str, sha256: str) -> LoadedPolicy:
    try:
        root, data, duplicates = _compose(text)
    except yaml.MarkedYAMLError as exc:
        raise PolicyFileError((_syntax_line(exc, text, name),)) from None
    except yaml.reader.ReaderError as exc:  # a control character; it has no mark, only a position
        line = text[: exc.position].count("\n") + 1
        raise PolicyFileError((
            f"{name}:{line}: (yaml): syntax error: control character U+{exc.character:04X} is "
            "not allowed in YAML",
        )) from None
    except yaml.YAMLError as exc:
        raise PolicyFileError((f"{name}:1: (yaml): syntax error: {exc}",)) from None
    if root is None:
        raise PolicyFileError((
            f"{name}:1: (top level): the file is empty (or only comments); "
            "a policy needs version and tiers",
        ))

    found = duplicates
    policy: Policy | None = None
    try:
        policy = parse_policy(data)
    except PolicyError as exc:
        found += [(_line_of(root, issue.path), issue) for issue in exc.issues]
    if found or policy is None:
        # Stable sort: file order, and the model's order for several issues on one line.
        raise PolicyFileError(tuple(
            f"{name}:{line}: {issue.dotted()}: {issue.message}"
            for line, issue in sorted(found, key=lambda item: item[0])
        ))
    return LoadedPolicy(policy=policy, path=name, sha256=sha256, text=text)


def _compose(text: str) -> tuple[Node | None, object, list[tuple[int, PolicyIssue]]]:
    """The node tree (for lines), the data built from that same tree, and duplicate keys."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None, []
        # Before constructing: construction flattens `<<` merges into the mapping nodes in
        # place, which would make every merged key that is overridden look duplicated.
        duplicates = _duplicate_keys(root, ())
        return root, loader.construct_document(root), duplicates
    finally:
        loader.dispose()


def _syntax_line(exc: yaml.MarkedYAMLError, text: str, name: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    # pyyaml marks "unexpected end of stream" one line past the last; point at the last line.
    last = max(text.count("\n") + (0 if text.endswith("\n") else 1), 1)
    line = min(mark.line + 1, last) if mark is not None else 1
    detail = exc.problem or "invalid YAML"
    if exc.context:
        # pyyaml's own order reads best: "while parsing a flow mapping (line 3), expected ..."
        where = exc.context_mark
        at = f" (line {where.line + 1})" if where is not None and where.line + 1 != line else ""
        detail = f"{exc.context}{at}, {detail}"
    return f"{name}:{line}: (yaml): syntax error: {detail}"


def _duplicate_keys(
    node: Node, path: Path, seen: set[int] | None = None
) -> list[tuple[int, PolicyIssue]]:
    """pyyaml keeps the last of two equal keys without a word; ops deserve to hear of it."""
    # An alias reaches the same node again (and may even reach itself): visit each once.
    seen = set() if seen is None else seen
    if id(node) in seen:
        return []
    seen.add(id(node))
    found: list[tuple[int, PolicyIssue]] = []
    if isinstance(node, MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, ScalarNode) or key.tag == _MERGE_TAG:
                continue
            line = key.start_mark.line + 1
            where = (*path, str(key.value))
            if (key.tag, key.value) in first:
                found.append((line, PolicyIssue(where,
                    f"duplicate key (first on line {first[(key.tag, key.value)]}); "
                    "YAML would silently keep only this one")))
            else:
                first[(key.tag, key.value)] = line
            found += _duplicate_keys(value, where, seen)
    elif isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            found += _duplicate_keys(item, (*path, index), seen)
    return found


def _line_of(root: Node, path: Path) -> int:
    """1-based line of the deepest node on `path` that exists (a missing key: its parent)."""
    node, line = root, root.start_mark.line + 1
    for part in path:
        if isinstance(node, MappingNode):
            entry = _entry(node, str(part))
            if entry is None:
                break
            line, node = entry[0].start_mark.line + 1, entry[1]
        elif isinstance(node, SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _entry(mapping: MappingNode, name: str, depth: int = 0) -> tuple[Node, Node] | None:
    """The key and value nodes for `name`, looking through `<<` merges into the anchor
    that really holds the value, since that is the line to edit."""
    match = None
    merges: list[Node] = []
    for key, value in mapping.value:
        if isinstance(key, ScalarNode) and key.tag == _MERGE_TAG:
            merges += value.value if isinstance(value, SequenceNode) else [value]
        elif isinstance(key, ScalarNode) and key.value == name:
            match = (key, value)  # the last of equal keys is the one the data holds
    if match is not None or depth > 16:
        return match
    for merged in merges:
        if isinstance(merged, MappingNode) and (found := _entry(merged, name, depth + 1)):
            return found
    return None
