"""The demo model's shipped 4-step student (configs/demo_fast.yaml, t2v/demo/fast): found by
name, loaded onto the demo model with its guidance embedding, following its prompts at 4 LCM
steps with one UNet pass per step; the evaluation and the benchmark read the config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from t2v.bench import demo_fast
from t2v.demo.evaluate import EvalSettings, load_demo_pipeline, parse, settings_from_args
from t2v.errors import UserError
from t2v.loading import lora_formats
from t2v.loading.lora_formats import DEMO_FAST_FILE, DEMO_FAST_LORA, lora_path
from t2v.loading.weights import DEMO_SOURCE
from t2v.pipeline.options import load_config

from helpers import MIN_BACKGROUND, MIN_COLOUR, MIN_DIRECTION, MIN_SHAPE, prompt_following

ROOT = Path(__file__).resolve().parents[1]
FAST_CONFIG = ROOT / "configs" / "demo_fast.yaml"


def test_the_student_is_found_by_name(monkeypatch, tmp_path):
    assert lora_path(DEMO_FAST_LORA) == DEMO_FAST_FILE and DEMO_FAST_FILE.is_file()
    assert lora_path("runs/x/lora.safetensors") == Path("runs/x/lora.safetensors")
    monkeypatch.setattr(lora_formats, "DEMO_FAST_FILE", tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="demo student is missing.*reinstall"):
        lora_path(DEMO_FAST_LORA)


def test_demo_student_follows_prompts_in_four_passes():
    """configs/demo_fast.yaml end to end: the student (the demo model + the shipped LoRA and
    guidance embedding) at 4 LCM steps is above the teacher's floors on 20 trained prompts,
    with 4 UNet passes per video; the wrong prompts fall below."""
    cfg = load_config(FAST_CONFIG)
    assert cfg.weights.lora == (DEMO_FAST_LORA,) and cfg.sample.sampler == "lcm"
    pipe = load_demo_pipeline(DEMO_SOURCE, loras=cfg.weights.lora)
    assert pipe.config.unet.time_cond_proj_dim is not None
    calls = []
    hook = pipe.unet.register_forward_hook(lambda m, a, k: calls.append(a[0].shape[0]))
    settings = EvalSettings(cfg.sample, lora=cfg.weights.lora)
    scores = prompt_following(pipe, settings)
    hook.remove()
    assert calls == [20] * cfg.sample.steps  # one pass of the 20 videos per step, no uncond
    assert scores["colour"] >= MIN_COLOUR and scores["shape"] >= MIN_SHAPE \
        and scores["direction"] >= MIN_DIRECTION \
        and scores["background"] >= MIN_BACKGROUND, scores
    wrong = prompt_following(pipe, settings, lambda i, listed: listed[(i + 7) % len(listed)])
    assert wrong["colour"] < MIN_COLOUR and wrong["shape"] < MIN_SHAPE \
        and wrong["direction"] < MIN_DIRECTION, wrong


def test_eval_reads_a_config():
    """`python -m t2v.eval demo --config configs/demo_fast.yaml`: the flags default to that
    config's sample section and LoRAs; flags still override; the default is configs/demo.yaml."""
    args, cfg = parse(["demo", "--config", str(FAST_CONFIG), "--steps", "2"])
    settings = settings_from_args(args, cfg)
    assert (settings.options.sampler, settings.options.steps) == ("lcm", 2)
    assert settings.options.guidance_interval is None and settings.lora == (DEMO_FAST_LORA,)
    args, cfg = parse(["demo", "--config", str(FAST_CONFIG), "--lora", "other.safetensors"])
    assert settings_from_args(args, cfg).lora == ("other.safetensors",)
    args, cfg = parse(["demo"])
    plain = settings_from_args(args, cfg)
    assert (plain.options.sampler, plain.options.steps, plain.lora) == ("dpmsolver++", 25, ())
    assert plain.options.guidance_interval == (600, 999)


def test_demo_speed_benchmark(monkeypatch, tmp_path, capsys):
    """python -m t2v.bench.demo_fast: every setting timed each repeat, the speed-up the
    teacher's median over the student's."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "r.json"
    demo_fast.main(["--steps", "1", "4", "--repeats", "3", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["seconds"]) == {"teacher", "student 1 steps", "student 4 steps"}
    for name, ratio in result["speedup"].items():
        assert ratio == pytest.approx(result["seconds"]["teacher"]["median"]
                                      / result["seconds"][name]["median"])
        assert result["seconds"][name]["fastest"] <= result["seconds"][name]["median"]
    # 25 steps (guided at some) against 1 and 4 single passes, same sizes: the student is faster
    assert result["speedup"]["student 1 steps"] > result["speedup"]["student 4 steps"] > 1
    assert "faster than the teacher" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        demo_fast.main(["--json", str(out)])  # never over an existing file


def test_cli_commands_of_the_docs(tmp_path):
    """README / docs/few-step.md: configs/demo_fast.yaml, and the same by hand from
    configs/demo.yaml with --lora t2v:demo-fast, write the same frames; the teacher's differ."""
    import numpy as np
    from PIL import Image

    from t2v.cli.sample import main

    prompt = ["--prompt", "a red circle moving right", "--seed", "3", "--no-progress",
              "--format", "png"]
    runs = {
        "config": ["--config", str(FAST_CONFIG)],
        "by_hand": ["--config", str(ROOT / "configs" / "demo.yaml"), "--lora", DEMO_FAST_LORA,
                    "--sampler", "lcm", "--steps", "4", "--lcm-original-steps", "10",
                    "sample.guidance_interval=null"],
        "teacher": ["--config", str(ROOT / "configs" / "demo.yaml")],
    }
    frames = {}
    for name, args in runs.items():
        assert main([*args, *prompt, "--out", str(tmp_path / name)]) == 0
        pngs = sorted((tmp_path / name).rglob("*.png"))  # OUT/<prompt>-<seed>/NNNN.png
        assert len(pngs) == 8
        frames[name] = np.stack([np.asarray(Image.open(p)) for p in pngs])
    assert np.array_equal(frames["config"], frames["by_hand"])
    assert not np.array_equal(frames["config"], frames["teacher"])
