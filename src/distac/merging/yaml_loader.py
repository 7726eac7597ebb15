"""distac's one YAML reader and writer: a restricted loader for merge configs, and the dump style.

:func:`read_yaml` refuses anchors and aliases (a few hundred bytes of nested aliases can expand to
gigabytes), duplicate keys (YAML would silently keep the last one), nesting deeper than
:data:`MAX_YAML_DEPTH`, files over :data:`MAX_YAML_BYTES`, anything but a regular file, and text
that is not UTF-8. :func:`dump_yaml` writes in the order given (model cards, ``distac_config.yml``).

Example:
    >>> print(dump_yaml({"merge_method": "ties", "models": ["a", "b"]}), end="")
    merge_method: ties
    models: [a, b]
"""

from __future__ import annotations

import re
import stat
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import DistacError

__all__ = ["MAX_YAML_BYTES", "MAX_YAML_DEPTH", "dump_yaml", "read_yaml"]

#: a merge config is a few kilobytes; anything much larger is a mistake (or an attack)
MAX_YAML_BYTES = 1 << 20
#: deeper nesting than any config needs; bounds the composer's recursion
MAX_YAML_DEPTH = 64


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors/aliases or duplicate keys, and with bounded nesting."""

    def __init__(self, stream: str, name: str):
        super().__init__(stream)
        self.name, self.depth = name, 0

    def _fail(self, mark: Any, msg: str) -> DistacError:
        return DistacError(f"{self.name}: line {mark.line + 1}: {msg}")

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        # refusing the first anchor keeps an alias bomb from expanding at all
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise self._fail(
                event.start_mark, "YAML anchors and aliases (&name, *name) are not allowed; write values out"
            )
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise self._fail(event.start_mark, f"nested deeper than {MAX_YAML_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the base class reports unhashable keys
            if key in seen:
                raise self._fail(key_node.start_mark, f"duplicate key '{key}' (first at line {seen[key]}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


# PyYAML follows YAML 1.1, where an exponent needs a dot and a sign: ``tol: 1e-5`` would be the string. YAML
# 1.2 reads it as a number, and so does mergekit (its pydantic config converts it): so does distac.
_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file with distac's restricted loader (the only YAML reader in distac).

    Anchors/aliases, duplicate keys, nesting deeper than :data:`MAX_YAML_DEPTH`, files larger than
    :data:`MAX_YAML_BYTES`, anything but a regular file and text that is not UTF-8 are refused.

    Args:
        path: the file.

    Returns:
        The parsed document (plain dicts, lists and scalars).

    Raises:
        DistacError: one line naming the file (and the line, for a YAML error).

    Example:
        >>> read_yaml("merge.yml")["merge_method"]  # doctest: +SKIP
        'ties'
    """
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise DistacError(f"{path}: not a regular file; give the path of a YAML config file")
        if st.st_size > MAX_YAML_BYTES:
            raise DistacError(f"{path}: {st.st_size} bytes is too large for a merge config (limit {MAX_YAML_BYTES})")
        with open(path, "rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise DistacError(f"{path}: config file not found") from None
    except OSError as e:
        raise DistacError(f"{path}: cannot read the YAML config: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DistacError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save the config as UTF-8"
        ) from None
    loader = _SafeLoader(text, str(path))
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise DistacError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()


def dump_yaml(obj: Any) -> str:
    """YAML text of ``obj`` in the order given (the model card's and ``distac_config.yml``'s style)."""
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=None, allow_unicode=True)
