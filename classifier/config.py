"""params.yaml, read into typed params (`load`): a bad value names its key and what it may be.

The types are in classifier.params; they are also read from here (`config.Params`,
`config.TopParams`...). Keys of earlier versions say what replaced them (`MOVED`).
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from classifier.params import (  # noqa: F401  re-exported: config.Params, config.TopParams...
    BACKBONES,
    EXPORT_FORMATS,
    PARAMS_FILE,
    PRESETS,
    SEED_LIMIT,
    SEED_RANGE,
    AuditParams,
    AugmentParams,
    BaselineParams,
    DataParams,
    EnsembleParams,
    EvaluateParams,
    ExportParams,
    FeaturizeParams,
    FinetuneParams,
    ModelParams,
    Params,
    ParamsError,
    SplitParams,
    SyntheticParams,
    TopParams,
    fail,
)

#: Keys of earlier versions of params.yaml -> what replaced them.
MOVED = {
    "finetune.mixed_precision": (
        "the top-level 'precision' (auto | float32 | bfloat16 | float16), which featurize and evaluate use too: "
        "auto for 'auto', float32 for 'off', bfloat16 on a CPU or float16 on a GPU for 'on'"
    ),
}


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Convert one YAML value to the annotated type `tp`, or fail naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _convert(inner, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            fail(key, value, f"one of {', '.join(map(str, allowed))}")
        return value
    if origin is tuple and typing.get_args(tp)[1:] == (Ellipsis,):  # tuple[str, ...]: a list of any length
        if not isinstance(value, (list, tuple)):
            fail(key, value, "a list (or [] for none)")
        return tuple(_convert(typing.get_args(tp)[0], v, key) for v in value)
    if origin is tuple:
        inner = typing.get_args(tp)
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value] * len(inner)  # a single size means a square
        if not isinstance(value, (list, tuple)) or len(value) != len(inner):
            fail(key, value, f"a list of {len(inner)} values (or one number)")
        return tuple(_convert(t, v, key) for t, v in zip(inner, value, strict=True))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            fail(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, value, "a whole number")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                fail(key, value, "a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail(key, value, "a finite number")
        return value  # an int stays one: a count of 1000 is logged and shown as 1000, not 1000.0
    if tp is str:
        if not isinstance(value, str):
            fail(key, value, "a string")
        return value
    raise TypeError(f"unsupported parameter type {tp!r} for {key}")


def _build(cls: Any, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail(prefix or "params", data, "a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    # In file order, and without sorting: YAML keys may be numbers, booleans (`on:`, `yes:`) or null.
    unknown = [key for key in data if not isinstance(key, str) or key not in names]
    if unknown:
        key = unknown[0]
        where = f"{prefix}.{key}" if prefix else str(key)
        if where in MOVED:
            raise ParamsError(f"{PARAMS_FILE}: '{where}' is now {MOVED[where]}")
        kind = "" if isinstance(key, str) else f" (read as {type(key).__name__} {key!r}, not a name)"
        under = f" under {prefix}" if prefix else ""
        raise ParamsError(f"{PARAMS_FILE}: unknown key '{where}'{kind}; allowed keys{under}: {', '.join(names)}")
    values = {
        name: _convert(hints[name], data[name], f"{prefix}.{name}" if prefix else name)
        for name in names
        if name in data
    }
    obj = cls(**values)
    obj.check(prefix)
    return obj


def parse(data: dict[str, Any] | None) -> Params:
    """Validate a params mapping (as read from params.yaml); keys left out take the defaults."""
    return _build(Params, data, "")


class _DuplicateKeyError(Exception):
    """A mapping in the YAML document gives the same key twice; the message names it and both lines."""


def _node_path(root: yaml.Node, target: yaml.Node) -> str | None:
    """The dotted key path ('finetune.augment') from `root` down to the node `target`; '' for the root itself.

    Only called to word an error, so a plain search is fine; `seen` stops at aliases that loop.
    """
    seen: set[int] = set()

    def walk(node: yaml.Node, prefix: str) -> str | None:
        if node is target:
            return prefix
        if id(node) in seen:
            return None
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                found = walk(value_node, f"{prefix}.{name}" if prefix else str(name))
                if found is not None:
                    return found
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                found = walk(item, f"{prefix}[{index}]")
                if found is not None:
                    return found
        return None

    return walk(root, "")


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping.

    PyYAML silently keeps the last of two equal keys, so a second `top:` block would quietly
    replace the first; a params file must say each thing once.
    """

    _root: yaml.Node | None = None

    def construct_document(self, node: yaml.Node) -> Any:
        self._root = node  # to name the mapping a duplicate is found in
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be overridden on purpose; PyYAML merges those itself
            key = self.construct_object(key_node, deep=True)
            try:
                line = first_line.get(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if line is not None:
                parent = _node_path(self._root, node) if self._root is not None else None
                where = f"{parent}.{key}" if parent else str(key)
                raise _DuplicateKeyError(
                    f"key '{where}' is given twice, on lines {line} and {key_node.start_mark.line + 1}: "
                    "YAML would silently keep the last one; delete or merge one of them"
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


#: The most values (scalars, lists, mappings) params.yaml may expand to, aliases counted each time
#: they are used: the file holds about 150. YAML aliases can make 600 bytes expand to billions.
MAX_VALUES = 10_000


def _expands_within(root: yaml.Node, limit: int) -> bool:
    """Whether the node tree, each alias followed where it is used, holds at most `limit` nodes:
    counted without building anything, and stopped as soon as it passes the limit."""
    pending = [root]
    seen = 0
    while pending:
        node = pending.pop()
        seen += 1
        if seen > limit:
            return False
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                pending += (key, value)
        elif isinstance(node, yaml.SequenceNode):
            pending += node.value
    return True


def _read_text(path: Path) -> str:
    """The file's text; a byte that is not UTF-8 fails naming its line, instead of a UnicodeDecodeError."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ParamsError(
            f"{path}: line {line} is not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}): "
            "save the file as UTF-8"
        ) from None


def load(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml.

    Unlike `parse`, which takes the defaults for a missing mapping, an empty file is refused: it is
    far more likely a truncated or wrongly saved params.yaml than a wish for all the defaults.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run the stages from the repository root, where params.yaml is")
    text = _read_text(path)
    top_keys = ", ".join(f.name for f in dataclasses.fields(Params))
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ParamsError(
                f"{path}: the file is empty (no keys, only blank lines or comments): it should map the "
                f"parameters {top_keys} to their values; restore it from git"
            )
        if not _expands_within(node, MAX_VALUES):
            raise ParamsError(
                f"{path}: its YAML aliases (*name) expand to more than {MAX_VALUES} values: write the values "
                "out instead of repeating aliases"
            )
        data = loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from err
    except _DuplicateKeyError as err:
        raise ParamsError(f"{path}: {err}") from None
    except ValueError as err:  # Python reads integers of at most sys.get_int_max_str_digits() digits
        raise ParamsError(
            f"{path}: a number of more than {sys.get_int_max_str_digits()} digits: no parameter takes one; "
            "write the value it should have"
            if "digits" in str(err)
            else f"{path}: a value that cannot be read ({err}): correct it"
        ) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}
        found = "null" if data is None else f"{kinds.get(type(data), type(data).__name__)} ({reprlib.repr(data)})"
        raise ParamsError(
            f"{path}: the top level is {found}, not a mapping: write `key: value` lines for the parameters {top_keys}"
        )
    return parse(data)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """`Params` (or any part of it) as {'finetune.learning_rate': 1e-4, ...}, for logging."""
    out: dict[str, Any] = {}
    is_instance = dataclasses.is_dataclass(obj) and not isinstance(obj, type)
    items = dataclasses.asdict(obj).items() if is_instance else obj.items()
    for name, value in items:
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, dict):
            out.update(flatten(value, key))
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out
