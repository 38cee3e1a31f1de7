import dataclasses
from pathlib import Path

import pytest

from t2v.config import ConfigError, ModelConfig, UNetConfig, config_from_dict, config_to_dict, config_to_yaml
from t2v.pipeline.options import Config, GenerationOptions, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_ms17b_is_the_real_model():
    cfg = load_config(CONFIGS / "ms17b.yaml")
    assert cfg.model == ModelConfig()  # the dataclass defaults are ms-1.7b
    assert cfg.model.unet.channels == (320, 640, 1280, 1280)
    assert cfg.model.text_encoder.layers == 23
    assert (cfg.sample.num_frames, cfg.sample.height, cfg.sample.width) == (16, 256, 256)
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance_scale) == ("ddim", 50, 9.0)
    assert cfg.sample.fps == 8
    assert cfg.weights.source == "ali-vilab/text-to-video-ms-1.7b"


def test_zeroscope_and_tiny_load():
    zs = load_config(CONFIGS / "zeroscope_v2_576w.yaml")
    assert zs.model == ModelConfig()
    assert (zs.sample.num_frames, zs.sample.height, zs.sample.width) == (24, 320, 576)
    tiny = load_config(CONFIGS / "tiny.yaml")
    assert len(tiny.model.unet.channels) == 4
    assert tiny.model.unet.attention == (True, True, True, False)
    assert tiny.weights.source is None


@pytest.mark.parametrize("name", ["ms17b", "zeroscope_v2_576w", "tiny"])
def test_round_trip_through_yaml(tmp_path, name):
    cfg = load_config(CONFIGS / f"{name}.yaml", ["sample.seed=7"])
    path = tmp_path / "saved.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg
    assert config_from_dict(Config, config_to_dict(cfg)) == cfg


def test_overrides_apply_and_are_typed():
    cfg = load_config(CONFIGS / "ms17b.yaml",
                      ["sample.steps=25", "sample.sampler=dpmsolver++", "sample.seed=3",
                       "model.unet.channels=[64,128]", "model.unet.attention=[true,false]"])
    assert cfg.sample.steps == 25 and cfg.sample.sampler == "dpmsolver++" and cfg.sample.seed == 3
    assert cfg.model.unet.channels == (64, 128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sample.steps = 3


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  unet:\n    chanels: [1, 2]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "unet.chanels" in message and "\n" not in message


def test_wrong_type_in_file_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sample:\n  steps: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "sample.steps" in str(err.value)


@pytest.mark.parametrize("override, needle", [
    ("sample.stepz=3", "sample.stepz"),
    ("sample.steps=abc", "sample.steps"),
    ("model.unet.foo=1", "unet.foo"),
    ("steps", "key=value"),
    ("sample.height=100", "sample.height"),
    ("model.unet.channels=[64]", "model.unet.channels"),
])
def test_bad_overrides_are_one_line_errors(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "ms17b.yaml", [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("sample: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_section_from_dict_is_strict():
    assert config_from_dict(UNetConfig, {"channels": [64], "attention": [False]}).channels == (64,)
    with pytest.raises(ConfigError, match="head_dimm"):
        config_from_dict(UNetConfig, {"head_dimm": 3}, "unet metadata")
    with pytest.raises(ConfigError, match=r"sample.sampler must be one of \('ddim', "):
        GenerationOptions(sampler="heun")  # the names are t2v.sampling.samplers.SAMPLERS' keys
