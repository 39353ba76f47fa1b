"""Typed parameters: load `params.yaml`, validate every value, fail with a message naming the key.

Every knob of the pipeline lives in `params.yaml`; this module turns it into frozen dataclasses
so the stages get typed values and never index raw dicts. Validation happens before any work:
an unknown key, a wrong type or a value out of range raises `ParamsError` naming the key, the
value and what is allowed; a file that is not UTF-8, gives a key twice or is empty is refused the same way.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PARAMS_FILE = "params.yaml"

#: Names accepted by `model.backbone`; `backbones.REGISTRY` holds one entry for each.
BACKBONES = ("vgg16", "resnet50", "inception_v3", "xception", "mobilenet_v2", "efficientnet_v2_b0")
#: Named data sources; anything else must be an http(s) URL or a local path.
PRESETS = ("cats_vs_dogs", "stanford_dogs", "synthetic")


class ParamsError(ValueError):
    """A value in params.yaml is missing, unknown, of the wrong type or out of range, or the file is unusable."""


#: Keys of earlier versions of params.yaml -> what replaced them.
MOVED = {
    "finetune.mixed_precision": (
        "the top-level 'precision' (auto | float32 | bfloat16 | float16), which featurize and evaluate use too: "
        "auto for 'auto', float32 for 'off', bfloat16 on a CPU or float16 on a GPU for 'on'"
    ),
}


#: Seeds reach numpy's and TensorFlow's generators, which take 32 bits.
SEED_LIMIT = 2**32
SEED_RANGE = f"must be >= 0 and < 2**32 ({SEED_LIMIT})"


def _fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ParamsError(f"{PARAMS_FILE}: {key} = {value!r} is not valid: {allowed}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        _fail(key, value, "must be > 0")


def _check_patience(key: str, value: int | None) -> None:
    if value is not None and value < 1:
        _fail(key, value, "a number of epochs >= 1, or null to train every epoch")


def _check_dense_training(key: str, params: TopParams | BaselineParams) -> None:
    """What a dense classifier's training params must be (train_top's head, the baseline)."""
    _check_patience(f"{key}.patience", params.patience)
    _positive(f"{key}.units", params.units)
    if not 0 <= params.dropout < 1:
        _fail(f"{key}.dropout", params.dropout, "must be in [0, 1)")
    _positive(f"{key}.learning_rate", params.learning_rate)
    _positive(f"{key}.epochs", params.epochs)
    _positive(f"{key}.batch_size", params.batch_size)


@dataclass(frozen=True)
class SplitParams:
    """Images per class in each split: all whole counts, or all fractions of the class."""

    train: float = 1000
    validation: float = 400
    test: float = 400

    def check(self, key: str) -> None:
        values = dataclasses.asdict(self)
        for name, value in values.items():
            if value < 0:
                _fail(f"{key}.{name}", value, "must be >= 0")
        if self.train <= 0:
            _fail(f"{key}.train", self.train, "must be > 0: training needs images")
        if self.validation <= 0:
            _fail(f"{key}.validation", self.validation, "must be > 0: training is validated")
        if self.test <= 0:
            _fail(f"{key}.test", self.test, "must be > 0: evaluation needs a test set")
        counts = [v >= 1 for v in values.values()]
        if any(counts) and not all(counts):
            _fail(key, values, "give all three as counts per class (>= 1) or all as fractions (< 1)")
        if all(counts):
            for name, value in values.items():
                if value != int(value):
                    _fail(f"{key}.{name}", value, "a count per class must be a whole number")
        elif sum(values.values()) > 1 + 1e-9:
            _fail(key, values, "fractions must add up to at most 1")

    @property
    def as_fractions(self) -> bool:
        return self.train < 1


@dataclass(frozen=True)
class SyntheticParams:
    """The generated offline data set (`data.source: synthetic`)."""

    classes: int = 2
    images_per_class: int = 200
    size: int = 64

    def check(self, key: str) -> None:
        if self.classes < 2:
            _fail(f"{key}.classes", self.classes, "must be >= 2")
        if self.classes > 8:
            _fail(f"{key}.classes", self.classes, "must be <= 8 (there are 8 patterns)")
        _positive(f"{key}.images_per_class", self.images_per_class)
        if self.size < 16:
            _fail(f"{key}.size", self.size, "must be >= 16 pixels")


@dataclass(frozen=True)
class DataParams:
    source: str = "cats_vs_dogs"
    sha256: str | None = None
    seed: int = 42  # the split (and the generated images): its own, so training seeds never move the test set
    image_size: tuple[int, int] = (150, 150)
    max_side: int = 500
    min_side: int = 32
    max_pixels: int = 89_478_485  # Pillow's own default limit
    split: SplitParams = field(default_factory=SplitParams)
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)

    def check(self, key: str) -> None:
        if not 0 <= self.seed < SEED_LIMIT:
            _fail(f"{key}.seed", self.seed, SEED_RANGE)
        if not self.source:
            _fail(f"{key}.source", self.source, f"one of {', '.join(PRESETS)}, an http(s) URL, or a local path")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256.lower())
        ):
            _fail(f"{key}.sha256", self.sha256, "64 hexadecimal digits, or null")
        for value in self.image_size:
            if value < 32:
                _fail(f"{key}.image_size", list(self.image_size), "height and width must be >= 32")
        if self.min_side < 1:
            _fail(f"{key}.min_side", self.min_side, "must be >= 1 pixel")
        if self.max_pixels < self.min_side**2:
            _fail(f"{key}.max_pixels", self.max_pixels, f"must be >= data.min_side squared ({self.min_side**2})")
        if self.max_side < max(self.image_size):
            _fail(
                f"{key}.max_side", self.max_side, f"must be >= the largest of data.image_size ({max(self.image_size)})"
            )


@dataclass(frozen=True)
class ModelParams:
    backbone: str = "vgg16"
    weights: str | None = "imagenet"

    def check(self, key: str) -> None:
        if self.backbone not in BACKBONES:
            _fail(f"{key}.backbone", self.backbone, f"one of {', '.join(BACKBONES)}")
        if self.weights is not None and self.weights != "imagenet" and not self.weights.endswith(".h5"):
            _fail(f"{key}.weights", self.weights, "imagenet, null (random init), or a path to a local .h5 weights file")


@dataclass(frozen=True)
class TopParams:
    pool: Literal["auto", "flatten", "avg"] = "auto"  # features -> vector; auto: per backbone (backbones.head_pool)
    units: int = 256
    dropout: float = 0.5
    optimizer: Literal["rmsprop", "adam", "sgd"] = "rmsprop"
    learning_rate: float = 1e-3
    epochs: int = 50
    batch_size: int = 16
    patience: int | None = None  # epochs without a better validation loss before stopping; None: all epochs

    def check(self, key: str) -> None:
        _check_dense_training(key, self)


@dataclass(frozen=True)
class AugmentParams:
    """Random transforms of the training images during fine-tuning (none at featurize time)."""

    rotation: float = 40.0  # degrees, either way
    width_shift: float = 0.2  # fraction of the width
    height_shift: float = 0.2
    shear: float = 0.2  # shear angle, in radians, either way
    zoom: float = 0.2
    horizontal_flip: bool = True

    def check(self, key: str) -> None:
        if not 0 <= self.rotation <= 180:
            _fail(f"{key}.rotation", self.rotation, "degrees in [0, 180]")
        for name in ("width_shift", "height_shift", "zoom"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                _fail(f"{key}.{name}", value, "a fraction in [0, 1)")
        if not 0 <= self.shear <= math.pi / 4:
            _fail(f"{key}.shear", self.shear, "radians in [0, 0.785] (45 degrees)")


@dataclass(frozen=True)
class FinetuneParams:
    blocks: int = 1
    learning_rate: float = 1e-4
    momentum: float = 0.9
    epochs: int = 50
    batch_size: int = 16
    patience: int | None = None  # epochs without a better validation loss before stopping; None: all epochs
    augment: AugmentParams = field(default_factory=AugmentParams)

    def check(self, key: str) -> None:
        _check_patience(f"{key}.patience", self.patience)
        if self.blocks < 1:
            _fail(f"{key}.blocks", self.blocks, "must be >= 1 (the number of last backbone blocks to unfreeze)")
        _positive(f"{key}.learning_rate", self.learning_rate)
        if not 0 <= self.momentum < 1:
            _fail(f"{key}.momentum", self.momentum, "must be in [0, 1)")
        _positive(f"{key}.epochs", self.epochs)
        _positive(f"{key}.batch_size", self.batch_size)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 32
    threshold: float = 0.5  # two classes: the second class is predicted from this probability on
    registered_model: str | None = "image-classifier"  # MLflow registry name; None: not registered

    def check(self, key: str) -> None:
        _positive(f"{key}.batch_size", self.batch_size)
        if self.registered_model is not None and not self.registered_model.strip():
            _fail(f"{key}.registered_model", self.registered_model, "a model name, or null to not register")
        if not 0 < self.threshold < 1:
            _fail(f"{key}.threshold", self.threshold, "must be in (0, 1)")


@dataclass(frozen=True)
class BaselineParams:
    """The recipe's small convnet trained from scratch on the same split (the `baseline` stage)."""

    enabled: bool = True  # false: the stage writes empty outputs and logs nothing
    units: int = 64
    dropout: float = 0.5
    learning_rate: float = 1e-3  # of RMSprop, as in the recipe
    epochs: int = 50
    batch_size: int = 16
    patience: int | None = None  # epochs without a better validation loss before stopping; None: all epochs

    def check(self, key: str) -> None:
        _check_dense_training(key, self)


@dataclass(frozen=True)
class EnsembleParams:
    """A head on the concatenated features of several backbones (the `ensemble` stage)."""

    backbones: tuple[str, ...] = ("resnet50", "xception", "inception_v3")  # empty: no ensemble
    weights: str | None = "imagenet"  # imagenet | null (random init)
    image_size: int = 299  # the square images the ensemble model takes; each backbone resizes them down

    def check(self, key: str) -> None:
        for name in self.backbones:
            if name not in BACKBONES:
                _fail(f"{key}.backbones", list(self.backbones), f"each one of {', '.join(BACKBONES)}")
        if len(set(self.backbones)) != len(self.backbones):
            _fail(f"{key}.backbones", list(self.backbones), "each backbone at most once")
        if self.weights not in (None, "imagenet"):
            _fail(f"{key}.weights", self.weights, "imagenet, or null (random init)")
        if self.image_size < 32:
            _fail(f"{key}.image_size", self.image_size, "must be >= 32")


@dataclass(frozen=True)
class FeaturizeParams:
    batch_size: int = 32

    def check(self, key: str) -> None:
        _positive(f"{key}.batch_size", self.batch_size)


@dataclass(frozen=True)
class Params:
    seed: int = 42  # training: weight initialisation, shuffling, dropout, augmentation
    deterministic: bool = True  # TensorFlow op determinism: the same bytes on a GPU too
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # of featurize, finetune, evaluate
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    featurize: FeaturizeParams = field(default_factory=FeaturizeParams)
    top: TopParams = field(default_factory=TopParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    baseline: BaselineParams = field(default_factory=BaselineParams)
    ensemble: EnsembleParams = field(default_factory=EnsembleParams)

    def check(self, key: str) -> None:
        if not 0 <= self.seed < SEED_LIMIT:
            _fail("seed", self.seed, SEED_RANGE)


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
            _fail(key, value, f"one of {', '.join(map(str, allowed))}")
        return value
    if origin is tuple and typing.get_args(tp)[1:] == (Ellipsis,):  # tuple[str, ...]: a list of any length
        if not isinstance(value, (list, tuple)):
            _fail(key, value, "a list (or [] for none)")
        return tuple(_convert(typing.get_args(tp)[0], v, key) for v in value)
    if origin is tuple:
        inner = typing.get_args(tp)
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value] * len(inner)  # a single size means a square
        if not isinstance(value, (list, tuple)) or len(value) != len(inner):
            _fail(key, value, f"a list of {len(inner)} values (or one number)")
        return tuple(_convert(t, v, key) for t, v in zip(inner, value, strict=True))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, value, "a whole number")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                _fail(key, value, "a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(key, value, "a finite number")
        return value  # an int stays one: a count of 1000 is logged and shown as 1000, not 1000.0
    if tp is str:
        if not isinstance(value, str):
            _fail(key, value, "a string")
        return value
    raise TypeError(f"unsupported parameter type {tp!r} for {key}")


def _build(cls: Any, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(prefix or "params", data, "a mapping of keys to values")
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
        data = loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from err
    except _DuplicateKeyError as err:
        raise ParamsError(f"{path}: {err}") from None
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
