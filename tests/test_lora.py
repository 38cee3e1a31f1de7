"""LoRA (t2v.models.lora through peft): merging, files, what trains, the pipeline and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import assert_parity, randomize_
from synthetic import write_squares
from t2v.pipeline.options import load_config
from t2v.errors import UserError
from t2v.models.lora import (add_lora, lora_state_dict, lora_target_names, load_lora, merge_lora,
                      parse_lora_arg, save_lora)
from t2v.pipeline.text_to_video import TextToVideo
from t2v.cli.sample import main as sample_main
from t2v.training.trainer import Trainer
from t2v.training.config import TrainRunConfig
from t2v.models.unet import UNet3D

ROOT = Path(__file__).resolve().parents[1]
TINY = load_config(ROOT / "configs" / "tiny.yaml")
MERGE_TOL = 1e-5  # merged vs adapter path: the same sum in another order


def tiny_unet(seed: int = 0) -> UNet3D:
    return randomize_(UNet3D(TINY.model.unet), seed).eval()


def unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 3, 8, 8, generator=g), torch.tensor([400]),
            torch.randn(1, 7, TINY.model.unet.context_dim, generator=g))


def with_random_lora(seed: int = 1, **kwargs) -> UNet3D:
    """A tiny UNet with adapters whose A and B are both random (B starts at zero in peft,
    which would hide the adapter path)."""
    unet = tiny_unet()
    add_lora(unet, rank=kwargs.pop("rank", 4), **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return unet.eval()


def test_targets_cover_attention_and_temporal_convs():
    unet = tiny_unet()
    names = lora_target_names(unet, ["attention", "temporal_conv"])
    assert any(n.endswith("attn2.to_k") for n in names)
    assert any(n.endswith("temp_convs.0.conv4.3") for n in names)
    temporal = lora_target_names(unet, ["temporal_attention"])
    assert temporal and all("temp_attentions" in n or n.startswith("transformer_in")
                            for n in temporal)
    with pytest.raises(UserError, match="match no"):
        lora_target_names(unet, ["nothing_like_this"])


def test_merged_equals_unmerged():
    x, t, context = unet_inputs()
    unet = with_random_lora(alpha=8.0)
    with torch.no_grad():
        adapted = unet(x, t, context)
        base = tiny_unet()(x, t, context)
        merge_lora(unet)
        merged = unet(x, t, context)
    assert (adapted - base).abs().max() > 1e-2  # the adapters do something
    assert_parity(merged, adapted, MERGE_TOL, "LoRA merged vs unmerged")
    assert set(unet.state_dict()) == set(tiny_unet().state_dict())  # a plain UNet3D again


def test_save_load_round_trip_and_scale(tmp_path):
    x, t, context = unet_inputs()
    unet = with_random_lora(targets=["temporal_attention", "temporal_conv"])
    path = save_lora(unet, tmp_path / "motion.safetensors")
    with pytest.raises(UserError, match="already exists"):
        save_lora(unet, path)  # never overwritten without asking

    loaded = tiny_unet()
    load_lora(loaded, path)
    expected, actual = lora_state_dict(unet), lora_state_dict(loaded)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, t, context), unet(x, t, context))

    # scale s multiplies every adapter's update: the same as halving each B at scale 1.
    half = tiny_unet()
    load_lora(half, path, scale=0.5)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)
        assert_parity(half.eval()(x, t, context), unet(x, t, context), MERGE_TOL,
                      "LoRA at scale 0.5 vs B halved")


def test_pipeline_merges_w_plus_scaled_ba(tmp_path):
    unet = with_random_lora(rank=2, alpha=4.0, targets=["attention"])
    path = save_lora(unet, tmp_path / "a.safetensors")
    pipe = TextToVideo.from_config(TINY.model, seed=0)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    before = pipe.unet.get_submodule(name).weight.detach().clone()
    pipe.load_lora(path, scale=0.5)
    lora = lora_state_dict(unet)
    a, b = lora[f"{name}.lora_A.weight"], lora[f"{name}.lora_B.weight"]
    expected = before + 0.5 * (4.0 / 2) * b @ a
    assert_parity(pipe.unet.get_submodule(name).weight, expected, 1e-6, "merged W + s a/r BA")


def test_bad_lora_files_are_clear_errors(tmp_path):
    unet = tiny_unet()
    with pytest.raises(UserError, match="not found"):
        load_lora(unet, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_lora(unet, tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not a t2v LoRA"):
        load_lora(unet, tmp_path / "other.safetensors")
    from t2v.models.lora import LORA_FORMAT
    save_file({"x": torch.zeros(1)}, str(tmp_path / "partial.safetensors"),
              metadata={"format": LORA_FORMAT, "rank": "4"})  # no alpha, no targets
    with pytest.raises(UserError, match="incomplete t2v LoRA metadata \\(no 'alpha'\\)"):
        load_lora(unet, tmp_path / "partial.safetensors")


def test_lora_arg_parsing():
    assert parse_lora_arg("a/b.safetensors:0.7") == ("a/b.safetensors", 0.7)
    assert parse_lora_arg("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora_arg("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)


def test_training_changes_only_the_adapters(tmp_path):
    data = write_squares(tmp_path / "data", count=2)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"data.path={data}", "data.num_frames=4", "data.height=32", "data.width=32",
        f"train.output_dir={tmp_path / 'run'}", "train.steps=2", "train.lr=1e-2",
        "lora.rank=4", "lora.targets=[temporal_attention]"], schema=TrainRunConfig)
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.unet.named_parameters()}
    assert all("lora_" in n for n in trainer.trained) and trainer.trained
    trainer.run(progress=False)
    after = dict(trainer.unet.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n and ("temp_attentions" in n
                                             or n.startswith("transformer_in")) for n in changed)
    out = tmp_path / "run" / "lora.safetensors"
    assert out.is_file()

    # The trained file through the CLI: merged at scale 0.5, recorded in the sidecar.
    video = tmp_path / "v.mp4"
    code = sample_main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--prompt", "a square",
                        "--seed", "1", "--lora", f"{out}:0.5", "--out", str(video),
                        "--no-progress"])
    assert code == 0 and video.is_file()
    sidecar = json.loads(video.with_name(video.name + ".json").read_text())
    assert sidecar["config"]["weights"]["lora"] == [f"{out}:0.5"]
    code = sample_main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--prompt", "x",
                        "--lora", str(tmp_path / "nope.safetensors"), "--out",
                        str(tmp_path / "w.mp4")])
    assert code == 2 and not (tmp_path / "w.mp4").exists()
