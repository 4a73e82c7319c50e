from pathlib import Path

import pytest
import yaml

from medseg.config import ExperimentConfig, apply_override, dump_config, load_config
from medseg.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
BASE = {"data": {"root": "somewhere"}, "transforms": {"patch_size": [64, 64]}}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg


@pytest.mark.parametrize(
    ("overrides", "key", "expected"),
    [
        (["data.bogus=1"], "data.bogus", "unknown key; expected one of: root, spatial_dims"),
        (["trian.epochs=3"], "trian", "unknown key; expected one of: experiment, data, transforms"),
        (["train.epochs=abc"], "train.epochs", "valid integer"),
        (["train.epochs=0"], "train.epochs", "greater than 0"),
        (["transforms.patch_size=[-8, 64]"], "transforms.patch_size", "positive integer"),
        (["transforms.patch_size=[64, 64, 64]"], "transforms.patch_size", "expected 2 sizes"),
        (["data.classes={bg: 0, cell: 2}"], "data.classes", "0..1 without gaps"),
        (["data.classes={bg: 0, cell: 1}", "inference.border_class=2"], "inference.border_class", "out of range"),
        (["data.classes={bg: 0, cell: 1}", "loss.class_weights=[1.0]"], "loss.class_weights", "expected 2 weights"),
        (["train.optimizer.name=rmsprop"], "train.optimizer.name", "'adam', 'adamw' or 'sgd'"),
        (["loss.dice_weight=0", "loss.ce_weight=0"], "loss", "nothing to optimise"),
        (["transforms.normalize.lower=99.9"], "transforms.normalize.upper", "expected upper > lower"),
        (["data.val_fraction=1.5"], "data.val_fraction", "less than 1"),
        (["loss.deep_supervision_weights=linear"], "loss.deep_supervision_weights", "expected halving, equal"),
        (["loss.deep_supervision_weights=[1, -1]"], "loss.deep_supervision_weights", "finite weights >= 0"),
        (["loss.deep_supervision_weights=[0, 0]"], "loss.deep_supervision_weights", "not all 0"),
        (["loss.deep_supervision_weights=5"], "loss.deep_supervision_weights", "a list of finite weights"),
        (["transforms.augmentation.preset=cells3d"], "transforms.augmentation.preset", "cells2d, lesions2d"),
        (["transforms.augmentation.params.flip_axes=[2]"], "transforms.augmentation.params.flip_axes", "0..1"),
        (["transforms.augmentation.params.noise_prob=true"], "transforms.augmentation.params.noise_prob", "number"),
    ],
)
def test_invalid_values_name_the_key_and_the_expected_form(overrides, key, expected):
    with pytest.raises(ConfigError) as info:
        load_config(BASE, overrides)
    assert info.value.key == key
    assert expected in str(info.value)


def test_every_problem_is_reported_once_with_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**BASE, "train": {"epochs": -1, "batch_size": "x", "typo": 1}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path}: train.") for line in lines)


def test_missing_section_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="transforms: required key is missing"):
        load_config({"data": {"root": "x"}})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")


def test_overrides_parse_yaml_values_and_create_nested_keys():
    cfg = load_config(
        BASE,
        ["train.epochs=7", "train.optimizer.lr=3e-4", "model.params.features=8", "transforms.patch_size=[32, 48]",
         "tracking.uri=http://127.0.0.1:5000", "data.cache=false"],
    )
    assert cfg.train.epochs == 7 and cfg.train.optimizer.lr == pytest.approx(3e-4)
    assert cfg.model.params == {"features": 8}
    assert cfg.transforms.patch_size == [32, 48]
    assert cfg.tracking.uri == "http://127.0.0.1:5000" and cfg.data.cache is False


def test_overrides_do_not_leak_into_the_source_mapping():
    load_config(BASE, ["data.spatial_dims=3", "transforms.patch_size=[8, 8, 8]"])
    assert BASE["data"] == {"root": "somewhere"}


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError):
        apply_override({}, bad)


def test_override_into_a_scalar_is_an_error():
    raw = {"train": {"epochs": 3}}
    with pytest.raises(ConfigError, match="train.epochs: is a value"):
        apply_override(raw, "train.epochs.x=1")


def test_defaults_and_output_dir():
    cfg = load_config(BASE, ["experiment.name=abc"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.output_dir == Path("runs/abc")
    assert cfg.transforms.weight_map.w0 == 10.0 and cfg.transforms.weight_map.sigma == 5.0


def test_cross_section_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(BASE, ["transforms.patch_size=[64, 64, 64]", "transforms.augmentation.params.elastic_spacing=[8]",
                           "data.classes={bg: 0, cell: 1}", "loss.class_weights=[1.0]"])
    assert {key for key, _ in info.value.problems} == {
        "transforms.patch_size", "transforms.augmentation.params.elastic_spacing", "loss.class_weights"}


def test_augmentation_resolves_to_every_parameter_of_its_preset():
    cfg = load_config(BASE, ["transforms.augmentation.preset=lesions3d", "data.spatial_dims=3",
                             "transforms.patch_size=[8, 8, 8]", "transforms.augmentation.params.blur_prob=0.5"])
    params = cfg.transforms.augmentation.params
    assert params.rot90_prob == 0.0 and params.rotate_deg == 15.0 and params.blur_prob == 0.5
    assert load_config(yaml.safe_load(dump_config(cfg))) == cfg  # the resolved file holds them all
