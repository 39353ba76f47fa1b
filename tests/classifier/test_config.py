"""params.yaml is validated before any work, and a bad value names its key, value and what is allowed."""

from __future__ import annotations

import copy
import sys

import pytest
import yaml

from classifier import config
from ops.demo import DEMO_GENERATED, DEMO_REAL, ROOT, merge


def with_value(key: str, value) -> dict:
    """The repository's params.yaml with one dotted key set to `value`."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    node = data
    *parents, last = key.split(".")
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
    return data


def test_repository_params_are_the_classic_recipe():
    params = config.load(ROOT / "params.yaml")
    assert params.data.source == "cats_vs_dogs"
    assert params.data.image_size == (150, 150)
    assert (params.data.split.train, params.data.split.validation, params.data.split.test) == (1000, 400, 400)
    assert params.model.backbone == "vgg16" and params.model.weights == "imagenet"
    assert (params.top.units, params.top.dropout, params.top.optimizer) == (256, 0.5, "rmsprop")
    assert (params.finetune.learning_rate, params.finetune.momentum, params.finetune.blocks) == (1e-4, 0.9, 1)
    assert params.top.epochs == params.finetune.epochs == 50
    augment = params.finetune.augment
    assert augment.rotation and augment.width_shift and augment.height_shift and augment.shear and augment.zoom
    assert augment.horizontal_flip


def test_every_knob_in_params_yaml_has_a_comment():
    for number, line in enumerate((ROOT / "params.yaml").read_text().splitlines(), 1):
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"params.yaml line {number} has no comment: {line!r}"


@pytest.mark.parametrize(("overrides", "source"), [(DEMO_REAL, "fashion_mnist"), (DEMO_GENERATED, "synthetic")])
def test_demo_params_are_valid_and_use_imagenet_weights_that_need_no_network(overrides, source):
    params = config.parse(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides))
    assert params.data.source == source
    assert (params.model.backbone, params.model.weights) == ("efficientnet_lite0", "imagenet")
    assert params.ensemble.weights == "imagenet" and params.ensemble.image_size == params.data.image_size[0]


def test_square_size_and_yaml_exponent_strings():
    params = config.parse({"data": {"image_size": 64}, "finetune": {"learning_rate": "5e-5"}})
    assert params.data.image_size == (64, 64)
    assert params.finetune.learning_rate == 5e-5


def test_flatten_names_nested_keys():
    flat = config.flatten(config.parse({}))
    assert flat["finetune.learning_rate"] == 1e-4
    assert flat["data.split.train"] == 1000
    assert flat["data.image_size"] == [150, 150]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.backbone", "vgg19", "model.backbone = 'vgg19' is not valid: one of vgg16, resnet50"),
        ("finetune.learning_rate", -0.001, "finetune.learning_rate = -0.001 is not valid: must be > 0"),
        ("top.learning_rate", 0, "top.learning_rate = 0 is not valid: must be > 0"),
        ("top.optimizer", "adagrad", "top.optimizer = 'adagrad' is not valid: one of rmsprop, adam, sgd"),
        ("top.dropout", 1.0, "top.dropout = 1.0 is not valid"),
        ("top.epochs", 2.5, "top.epochs = 2.5 is not valid: a whole number"),
        ("finetune.epochs", "many", "finetune.epochs = 'many' is not valid: a whole number"),
        ("precision", "on", "precision = 'on' is not valid: one of auto, float32, bfloat16, float16"),
        ("data.image_size", [150], "data.image_size = [150] is not valid: a list of 2 values"),
        ("data.split.train", -5, "data.split.train = -5 is not valid: must be >= 0"),
        ("data.split.test", 0, "data.split.test = 0 is not valid: must be > 0"),
        ("data.split", {"train": 0.8, "validation": 0.2, "test": 0.2}, "fractions must add up to at most 1"),
        (
            "data.split",
            {"train": 100, "validation": 0.2, "test": 0.2},
            "give all three as counts per class (>= 1) or all as fractions (< 1)",
        ),
        ("seed", -1, "seed = -1 is not valid: must be >= 0 and < 2**32"),
        ("seed", 2**32, "seed = 4294967296 is not valid: must be >= 0 and < 2**32 (4294967296)"),
        ("data.seed", 2**40, "data.seed = 1099511627776 is not valid: must be >= 0 and < 2**32"),
        ("evaluate.threshold", 1.5, "evaluate.threshold = 1.5 is not valid"),
        ("finetune.augment.shear", 0.9, "finetune.augment.shear = 0.9 is not valid: radians in [0, 0.785]"),
    ],
)
def test_bad_value_names_key_value_and_what_is_allowed(key, value, message):
    with pytest.raises(config.ParamsError) as err:
        config.parse(with_value(key, value))
    assert message in str(err.value)


def test_a_moved_key_names_its_replacement():
    with pytest.raises(config.ParamsError, match=r"'finetune.mixed_precision' is now the top-level 'precision'"):
        config.parse(with_value("finetune.mixed_precision", "auto"))


def test_unknown_key_is_named_with_the_allowed_ones():
    with pytest.raises(config.ParamsError, match=r"unknown key 'top.learnig_rate'; allowed keys under top: pool, u"):
        config.parse(with_value("top.learnig_rate", 0.1))
    with pytest.raises(config.ParamsError, match=r"unknown key 'modle'"):
        config.parse({"modle": {}})


def test_missing_or_broken_params_file(tmp_path):
    with pytest.raises(config.ParamsError, match="not found: run the stages from the repository root"):
        config.load(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("top: [unclosed")
    with pytest.raises(config.ParamsError, match="is not valid YAML"):
        config.load(tmp_path / "params.yaml")


def test_a_stage_reports_a_bad_param_without_a_traceback(tmp_path, monkeypatch, capsys):
    import sys

    from ops import runner

    data = copy.deepcopy(with_value("model.backbone", "vgg19"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)

    def main():
        config.load()

    monkeypatch.setattr(sys, "argv", ["stage"])
    with pytest.raises(SystemExit) as exit_info:
        runner.run(main)
    assert exit_info.value.code == 2
    assert "error: params.yaml: model.backbone = 'vgg19' is not valid" in capsys.readouterr().err


def write_params(tmp_path, content: str | bytes):
    """A params.yaml in `tmp_path` holding `content` (bytes as they are, text as UTF-8)."""
    path = tmp_path / "params.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_the_repository_params_file_still_loads():
    params = config.load(ROOT / "params.yaml")
    assert params == config.parse(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"seed: 42  # caf\xe9\n",
            r"params.yaml: line 1 is not UTF-8 \(byte 0xe9 at offset 15\): save the file as UTF-8",
        ),
        (b"seed: 42\ntop:\n  optimizer: r\xe9sprop\n", r"params.yaml: line 3 is not UTF-8 \(byte 0xe9 at offset 28\)"),
    ],
)
def test_a_file_that_is_not_utf8_names_the_line(tmp_path, content, message):
    with pytest.raises(config.ParamsError, match=message):
        config.load(write_params(tmp_path, content))


def test_a_utf8_file_with_accents_loads(tmp_path):
    params = config.load(write_params(tmp_path, "seed: 7  # café, naïve\n"))
    assert params.seed == 7


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "1: x\na: y\n",
            r"params.yaml: unknown key '1' \(read as int 1, not a name\); allowed keys: seed, deterministic",
        ),
        ("seed: 1\nnull: 2\n", r"unknown key 'None' \(read as NoneType None, not a name\); allowed keys: seed"),
        ("on: 1\n", r"unknown key 'True' \(read as bool True, not a name\); allowed keys: seed"),
        ("top: {1: 2}\n", r"unknown key 'top.1' \(read as int 1, not a name\); allowed keys under top: pool, units"),
        ("top: {units: 8, 2.5: x, b: y}\n", r"unknown key 'top.2.5' \(read as float 2.5, not a name\); allowed keys"),
    ],
)
def test_a_key_that_is_not_a_string_is_an_unknown_key(tmp_path, content, message):
    with pytest.raises(config.ParamsError, match=message):
        config.load(write_params(tmp_path, content))


def test_parse_reports_mixed_keys_without_a_type_error():
    with pytest.raises(config.ParamsError, match=r"unknown key 'data.1' \(read as int 1, not a name\)"):
        config.parse({"data": {1: "x", "seed": 3}})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "top:\n  units: 8\nseed: 1\ntop:\n  units: 16\n",
            r"params.yaml: key 'top' is given twice, on lines 1 and 4: YAML would silently keep the last one",
        ),
        (
            "top:\n  units: 8\n  dropout: 0.1\n  units: 16\n",
            r"params.yaml: key 'top.units' is given twice, on lines 2 and 4",
        ),
        (
            "finetune:\n  augment:\n    zoom: 0.1\n    zoom: 0.2\n",
            r"key 'finetune.augment.zoom' is given twice, on lines 3 and 4: .* delete or merge one of them",
        ),
        ("seed: 1\nseed: 2\n", r"key 'seed' is given twice, on lines 1 and 2"),
    ],
)
def test_a_key_given_twice_names_both_lines(tmp_path, content, message):
    with pytest.raises(config.ParamsError, match=message):
        config.load(write_params(tmp_path, content))


def test_a_yaml_merge_key_may_be_overridden(tmp_path):
    params = config.load(write_params(tmp_path, "top:\n  <<: {units: 8, dropout: 0.1}\n  units: 16\n"))
    assert (params.top.units, params.top.dropout) == (16, 0.1)


@pytest.mark.parametrize("content", ["", "\n  \n", "# all commented out\n# seed: 42\n"])
def test_an_empty_file_is_refused_not_read_as_defaults(tmp_path, content):
    message = r"params.yaml: the file is empty \(no keys, only blank lines or comments\): it should map the parameters"
    with pytest.raises(
        config.ParamsError, match=message + r" seed, deterministic, precision, backend, data, .* restore it from git"
    ):
        config.load(write_params(tmp_path, content))


def test_parse_of_nothing_still_means_the_defaults():
    assert config.parse(None) == config.parse({}) == config.Params()


@pytest.mark.parametrize(
    ("content", "found"),
    [
        ("42\n", r"a number \(42\)"),
        ("- a\n- b\n", r"a list \(\['a', 'b'\]\)"),
        ("hello\n", r"a string \('hello'\)"),
        ("~\n", "null"),
    ],
)
def test_a_top_level_that_is_not_a_mapping_is_named(tmp_path, content, found):
    message = rf"params.yaml: the top level is {found}, not a mapping: write `key: value` lines for the parameters seed"
    with pytest.raises(config.ParamsError, match=message):
        config.load(write_params(tmp_path, content))


#: 400 bytes of nested aliases under a real key: nine values, each the nine before it, nine levels
#: deep (9**9 values once expanded).
ALIAS_BOMB = "seed:\n  - &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  - &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_aliases_that_expand_past_any_params_file_are_refused_before_anything_is_built(tmp_path):
    with pytest.raises(config.ParamsError, match=r"its YAML aliases \(\*name\) expand to more than 10000 values"):
        config.load(write_params(tmp_path, ALIAS_BOMB))


def test_a_few_aliases_still_load(tmp_path):
    params = config.load(write_params(tmp_path, "top:\n  units: &width 32\nbaseline:\n  units: *width\n"))
    assert params.top.units == params.baseline.units == 32


def test_a_number_of_a_million_digits_is_refused_in_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: " + "9" * 1_000_000 + "\n")
    with pytest.raises(config.ParamsError) as refused:
        config.load(path)
    assert str(refused.value) == (
        f"{path}: a number of more than {sys.get_int_max_str_digits()} digits: no parameter takes one; "
        "write the value it should have"
    )
