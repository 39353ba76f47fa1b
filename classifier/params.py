"""The params' types: one dataclass per section of params.yaml, with the checks of each value.

The defaults here are the values params.yaml ships with (tests/classifier/test_params.py compares
them). `classifier.config` reads params.yaml into these types.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

PARAMS_FILE = "params.yaml"

#: Names accepted by `model.backbone` and `ensemble.backbones`; classifier.model.catalog describes each.
BACKBONES = (
    "vgg16",
    "resnet50",
    "inception_v3",
    "xception",
    "mobilenet_v2",
    "efficientnet_v2_b0",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
)


#: The presets downloaded from where they are published (classifier.data.presets says where).
PUBLISHED = ("cats_vs_dogs", "stanford_dogs")
#: Named data sources; anything else must be an http(s) URL or a local path.
PRESETS = (*PUBLISHED, "synthetic", "fashion_mnist")


class ParamsError(ValueError):
    """A value in params.yaml is missing, unknown, of the wrong type or out of range, or the file is unusable."""


#: Seeds reach numpy's, TensorFlow's and JAX's generators, which take 32 bits.
SEED_LIMIT = 2**32


SEED_RANGE = f"must be >= 0 and < 2**32 ({SEED_LIMIT})"


def fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    """Refuse `value` of params.yaml's `key`, saying what is allowed (classifier.config's checks too)."""
    raise ParamsError(f"{PARAMS_FILE}: {key} = {value!r} is not valid: {allowed}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        fail(key, value, "must be > 0")


def _check_choices(key: str, values: tuple[str, ...], allowed: tuple[str, ...], what: str) -> None:
    """A list of some of `allowed`, each at most once."""
    for name in values:
        if name not in allowed:
            fail(key, list(values), f"each one of {', '.join(allowed)}")
    if len(set(values)) != len(values):
        fail(key, list(values), f"each {what} at most once")


def _check_patience(key: str, value: int | None) -> None:
    if value is not None and value < 1:
        fail(key, value, "a number of epochs >= 1, or null to train every epoch")


def _check_dense_training(key: str, params: TopParams | BaselineParams) -> None:
    """What a dense classifier's training params must be (train_top's head, the baseline)."""
    _check_patience(f"{key}.patience", params.patience)
    _positive(f"{key}.units", params.units)
    if not 0 <= params.dropout < 1:
        fail(f"{key}.dropout", params.dropout, "must be in [0, 1)")
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
                fail(f"{key}.{name}", value, "must be >= 0")
        if self.train <= 0:
            fail(f"{key}.train", self.train, "must be > 0: training needs images")
        if self.validation <= 0:
            fail(f"{key}.validation", self.validation, "must be > 0: training is validated")
        if self.test <= 0:
            fail(f"{key}.test", self.test, "must be > 0: evaluation needs a test set")
        counts = [v >= 1 for v in values.values()]
        if any(counts) and not all(counts):
            fail(key, values, "give all three as counts per class (>= 1) or all as fractions (< 1)")
        if all(counts):
            for name, value in values.items():
                if value != int(value):
                    fail(f"{key}.{name}", value, "a count per class must be a whole number")
        elif sum(values.values()) > 1 + 1e-9:
            fail(key, values, "fractions must add up to at most 1")

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
            fail(f"{key}.classes", self.classes, "must be >= 2")
        if self.classes > 8:
            fail(f"{key}.classes", self.classes, "must be <= 8 (there are 8 patterns)")
        _positive(f"{key}.images_per_class", self.images_per_class)
        if self.size < 16:
            fail(f"{key}.size", self.size, "must be >= 16 pixels")


@dataclass(frozen=True)
class FashionMnistParams:
    """Fashion-MNIST's pictures (`data.source: fashion_mnist`, classifier.data.fashion_mnist)."""

    per_class: int = 1800  # the first pictures of each class, training file first: the default split's 1000 + 400 + 400

    def check(self, key: str) -> None:
        if not 1 <= self.per_class <= 7000:
            fail(f"{key}.per_class", self.per_class, "must be 1..7000 (Fashion-MNIST has 7000 pictures per class)")


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
    fashion_mnist: FashionMnistParams = field(default_factory=FashionMnistParams)

    def check(self, key: str) -> None:
        if not 0 <= self.seed < SEED_LIMIT:
            fail(f"{key}.seed", self.seed, SEED_RANGE)
        if not self.source:
            fail(f"{key}.source", self.source, f"one of {', '.join(PRESETS)}, an http(s) URL, or a local path")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256.lower())
        ):
            fail(f"{key}.sha256", self.sha256, "64 hexadecimal digits, or null")
        for value in self.image_size:
            if value < 32:
                fail(f"{key}.image_size", list(self.image_size), "height and width must be >= 32")
        if self.min_side < 1:
            fail(f"{key}.min_side", self.min_side, "must be >= 1 pixel")
        if self.source == "fashion_mnist" and self.min_side > 28:
            fail(
                f"{key}.min_side",
                self.min_side,
                "Fashion-MNIST's pictures are 28x28, so prepare would drop every one as too small: "
                "set data.min_side: 28 (or lower)",
            )
        if self.max_pixels < self.min_side**2:
            fail(f"{key}.max_pixels", self.max_pixels, f"must be >= data.min_side squared ({self.min_side**2})")
        if self.max_side < max(self.image_size):
            fail(
                f"{key}.max_side", self.max_side, f"must be >= the largest of data.image_size ({max(self.image_size)})"
            )


@dataclass(frozen=True)
class ModelParams:
    backbone: str = "vgg16"
    weights: str | None = "imagenet"

    def check(self, key: str) -> None:
        if self.backbone not in BACKBONES:
            fail(f"{key}.backbone", self.backbone, f"one of {', '.join(BACKBONES)}")
        if self.weights is not None and self.weights != "imagenet" and not self.weights.endswith(".h5"):
            fail(f"{key}.weights", self.weights, "imagenet, null (random init), or a path to a local .h5 weights file")


@dataclass(frozen=True)
class TopParams:
    pool: Literal["auto", "flatten", "avg"] = "auto"  # features -> vector; auto: per backbone (heads.head_pool)
    units: int = 256
    dropout: float = 0.5
    optimizer: Literal["rmsprop", "adam", "sgd"] = "rmsprop"
    learning_rate: float = 1e-3
    epochs: int = 50
    batch_size: int = 16
    patience: int | None = 5  # epochs without a better validation loss before stopping (the best kept); None: all

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
            fail(f"{key}.rotation", self.rotation, "degrees in [0, 180]")
        for name in ("width_shift", "height_shift", "zoom"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                fail(f"{key}.{name}", value, "a fraction in [0, 1)")
        if not 0 <= self.shear <= math.pi / 4:
            fail(f"{key}.shear", self.shear, "radians in [0, 0.785] (45 degrees)")


@dataclass(frozen=True)
class FinetuneParams:
    blocks: int = 1
    learning_rate: float = 1e-4
    momentum: float = 0.9
    epochs: int = 50
    batch_size: int = 16
    patience: int | None = 5  # epochs without a better validation loss before stopping (the best kept); None: all
    augment: AugmentParams = field(default_factory=AugmentParams)

    def check(self, key: str) -> None:
        _check_patience(f"{key}.patience", self.patience)
        if self.blocks < 1:
            fail(f"{key}.blocks", self.blocks, "must be >= 1 (the number of last backbone blocks to unfreeze)")
        _positive(f"{key}.learning_rate", self.learning_rate)
        if not 0 <= self.momentum < 1:
            fail(f"{key}.momentum", self.momentum, "must be in [0, 1)")
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
            fail(f"{key}.registered_model", self.registered_model, "a model name, or null to not register")
        if not 0 < self.threshold < 1:
            fail(f"{key}.threshold", self.threshold, "must be in (0, 1)")


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
        _check_choices(f"{key}.backbones", self.backbones, BACKBONES, "backbone")
        if self.weights not in (None, "imagenet"):
            fail(f"{key}.weights", self.weights, "imagenet, or null (random init)")
        if self.image_size < 32:
            fail(f"{key}.image_size", self.image_size, "must be >= 32")


@dataclass(frozen=True)
class AuditParams:
    """The label audit (the `audit` stage): linear heads on k folds of the cached features rank suspect labels."""

    folds: int = 5  # heads trained, each on all folds but one, to score the one it did not see
    sheet: int = 24  # the most suspect pictures shown on reports/audit/suspects.png

    def check(self, key: str) -> None:
        if self.folds < 2:
            fail(f"{key}.folds", self.folds, "at least 2 (each picture is scored by a head trained on the others)")
        if self.sheet < 0:
            fail(f"{key}.sheet", self.sheet, "0 or more pictures")


#: The formats `export` writes, as Keras 3's `model.export` names them.
EXPORT_FORMATS = ("onnx", "tf_saved_model", "litert")


@dataclass(frozen=True)
class ExportParams:
    """The best model in standard formats (the `export` stage)."""

    formats: tuple[str, ...] = EXPORT_FORMATS  # empty: nothing exported

    def check(self, key: str) -> None:
        _check_choices(f"{key}.formats", self.formats, EXPORT_FORMATS, "format")


@dataclass(frozen=True)
class FeaturizeParams:
    batch_size: int = 32

    def check(self, key: str) -> None:
        _positive(f"{key}.batch_size", self.batch_size)


@dataclass(frozen=True)
class Params:
    seed: int = 42  # training: weight initialisation, shuffling, dropout, augmentation
    deterministic: bool = True  # deterministic kernels: the same bytes on a GPU too
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # of featurize, finetune, evaluate
    backend: Literal["auto", "tensorflow", "jax"] = "auto"  # what Keras runs on (classifier.model.backend)
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    featurize: FeaturizeParams = field(default_factory=FeaturizeParams)
    top: TopParams = field(default_factory=TopParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    baseline: BaselineParams = field(default_factory=BaselineParams)
    ensemble: EnsembleParams = field(default_factory=EnsembleParams)
    audit: AuditParams = field(default_factory=AuditParams)
    export: ExportParams = field(default_factory=ExportParams)

    def check(self, key: str) -> None:
        if not 0 <= self.seed < SEED_LIMIT:
            fail("seed", self.seed, SEED_RANGE)
