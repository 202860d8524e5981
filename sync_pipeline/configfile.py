"""Strict YAML reading for the project's configuration files (the settings file, the mappings).

PyYAML's SafeLoader already refuses Python tags; on top of it, through its own loader hooks:

- the file must be UTF-8 (a byte-order mark is allowed), and a file that is not names itself;
- no anchors or aliases: these files do not need them, and refusing them when the document is
  composed, before anything is expanded, makes an alias bomb cost nothing;
- no duplicate keys (plain safe_load silently keeps the last one);
- `19:00` unquoted is the text 19:00, as in YAML 1.2, not YAML 1.1's base-60 number 1140.

Problems raise ConfigFileError with one message naming the file, the entry and the problem; the
settings and mapping loaders pass it on as their own error type.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

# YAML 1.1's sexagesimal ints and floats (`1:30`, `19:00`, `1:30.5`); YAML 1.2 dropped them.
_SEXAGESIMAL = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?")
_STR_TAG = "tag:yaml.org,2002:str"


class ConfigFileError(ValueError):
    """A configuration file that cannot be read as strict YAML; the message names the file."""


class _Refused(Exception):
    """Raised inside the loader; turned into ConfigFileError once the file name is at hand."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem


class _StrictLoader(yaml.SafeLoader):
    def resolve(self, kind, value, implicit):  # type: ignore[no-untyped-def]
        if kind is yaml.ScalarNode and implicit[0] and _SEXAGESIMAL.fullmatch(value):
            return _STR_TAG
        return super().resolve(kind, value, implicit)

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            raise _Refused(
                f"line {mark.line + 1}",
                "YAML anchors and aliases (&name, *name) are not allowed in this file; write "
                "the value out in full",
            )
        return super().compose_node(parent, index)

    def compose_document(self):  # type: ignore[no-untyped-def]
        node = super().compose_document()
        self._paths: dict[int, str] = {}
        self._walk(node, "")
        return node

    def _walk(self, node: yaml.Node, path: str) -> None:
        # Dotted paths of every node, so that a duplicate key can be named by its entry.
        self._paths[id(node)] = path
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                self._walk(value_node, f"{path}.{key}" if path else str(key))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, f"{path}[{i}]")

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                parent = getattr(self, "_paths", {}).get(id(node), "")
                raise _Refused(
                    f"{parent}.{key}" if parent else str(key),
                    f"duplicate key on line {line} (first defined on line {seen[key]})",
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_config(data: bytes, source: str) -> Any:
    """The YAML document in `data`, read strictly; `source` names the file in errors."""
    try:
        # utf-8-sig: Windows editors may start a UTF-8 file with a byte-order mark.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(
            f"{source}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
            "save the file as UTF-8"
        ) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as refused:
        raise ConfigFileError(f"{source}: {refused.where}: {refused.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{source}: not valid YAML: {exc}") from None


def read_config(path: str | Path) -> Any:
    """Read and parse one configuration file strictly (see the module docstring)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(data, str(path))
