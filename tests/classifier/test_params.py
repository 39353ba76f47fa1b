"""classifier.params: the defaults of the params' types are the values params.yaml ships with, and
params.yaml names every param (so a user reads every knob there, and `config.parse({})` is the
project's own params.yaml)."""

from __future__ import annotations

import yaml

from classifier import config
from classifier.data import presets
from classifier.model import catalog
from ops.code import ROOT


def shipped() -> dict:
    return yaml.safe_load((ROOT / config.PARAMS_FILE).read_text(encoding="utf-8"))


def test_the_defaults_are_the_values_params_yaml_ships_with():
    defaults = config.flatten(config.parse({}))
    assert defaults == config.flatten(config.load(ROOT / config.PARAMS_FILE))


def test_params_yaml_names_every_param_and_nothing_else():
    assert set(config.flatten(shipped())) == set(config.flatten(config.parse({})))


def test_every_name_of_the_catalogs_is_a_valid_param():
    for backbone in catalog.CATALOG:
        assert config.parse({"model": {"backbone": backbone}}).model.backbone == backbone
    for preset in presets.PRESETS:
        assert config.parse({"data": {"source": preset}}).data.source == preset
