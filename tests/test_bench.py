"""The umbrella benchmark's plumbing (the benchmarks themselves are scripts, not tests)."""

import json
from pathlib import Path

import torch

from t2v.bench.__main__ import TARGETS, check_targets, machine, main


def test_targets_are_checked_from_the_measurements():
    results = {
        "unet": {"cases": {"b": {"speedup": 1.25, "efficiency": {"t2v": 0.9}}}},
        "vae_memory": {"t2v_8": {"step_mib": 2000.0}, "t2v_64": {"step_mib": 2100.0}},
        "load": {"t2v": {"seconds": 5.0, "peak_mib": 6000.0, "weights_mib": 5383.0},
                 "diffusers": {"seconds": 12.0, "peak_mib": 6300.0, "weights_mib": 5383.0}},
    }
    checks = check_targets(results)
    assert checks["unet_speedup_eager_b"] == {"value": 1.25, "target": 1.3, "met": False}
    assert checks["unet_efficiency_b"]["met"]
    assert checks["vae_memory_64_over_8"]["value"] == 1.05
    assert checks["vae_memory_64_over_8"]["met"]
    assert checks["load_time_ratio"]["value"] == round(5 / 12, 3)
    assert checks["load_rss_over_weights"]["met"] == (6000 / 5383 <= TARGETS[
        "load_rss_over_weights"])
    assert check_targets({}) == {}


def test_refuses_to_overwrite_a_report(tmp_path, capsys):
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"keep": 1}))
    assert main(["--json", str(report)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert json.loads(report.read_text()) == {"keep": 1}
    assert main(["--json", str(tmp_path / "missing" / "r.json")]) == 2


def test_benchmark_models_have_no_zero_layers():
    """A default-initialised diffusers UNet3D has zero layers whose denormal activations stall
    its kernels; the benchmark's models must not (they are randomized at a trained-like
    scale on both sides)."""
    from diffusers import UNet3DConditionModel

    from t2v.bench.common import zero_parameters
    from t2v.bench.unet import build_pair
    from t2v.config import UNetConfig
    from weights_convert.diffusers import diffusers_unet_kwargs

    cfg = UNetConfig(channels=(32, 64), attention=(True, False), layers_per_block=1,
                     head_dim=8, context_dim=32, norm_groups=4)
    ours, reference = build_pair(cfg)
    assert zero_parameters(reference) == [] and zero_parameters(ours) == []
    theirs = reference.state_dict()
    for name, p in ours.state_dict().items():
        assert torch.equal(p, theirs[name]), name
    default = UNet3DConditionModel(**diffusers_unet_kwargs(cfg))
    assert zero_parameters(default)  # the control: what the old benchmark timed


def test_end_to_end_times_a_process_and_its_first_step():
    """t2v.bench.end_to_end's timer: wall time to exit, the first step at the progress bar's
    `0/N`, and a failing command raises with its stderr."""
    import sys

    import pytest

    from t2v.bench.end_to_end import timed

    script = ("import sys, time; time.sleep(0.3); sys.stderr.write('sampling:   0/5 [00:00]');"
              "sys.stderr.flush(); time.sleep(0.3)")
    seconds = timed([sys.executable, "-c", script], steps=5)
    assert 0.3 <= seconds["to_first_step"] < seconds["wall"]
    assert seconds["wall"] >= 0.6
    assert timed([sys.executable, "-c", "pass"], steps=5)["to_first_step"] is None
    with pytest.raises(RuntimeError, match="boom"):
        timed([sys.executable, "-c", "raise SystemExit('boom')"], steps=5)


def test_end_to_end_runs_every_component_in_the_benchmark_dtype(tmp_path, monkeypatch):
    """Both sides of t2v.bench.end_to_end in the same precision: diffusers' `torch_dtype`
    casts the whole pipeline, so the t2v command line must set the VAE's dtype too (its
    default is float32), and it must parse as `python -m t2v.sample` reads it."""
    from t2v.bench.end_to_end import commands
    from t2v.cli.sample import parse

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # configs/ms17b.yaml
    for dtype in ("float32", "bfloat16"):
        t2v_cmd, ref_cmd = commands(dtype, 25, tmp_path / "native", tmp_path / "diffusers",
                                    tmp_path)
        args, _ = parse(t2v_cmd[3:])  # after `python -m t2v.sample`
        assert (args.dtype, args.vae_dtype, args.steps) == (dtype, dtype, 25)
        assert ref_cmd[ref_cmd.index(str(tmp_path / "diffusers")) + 3] == dtype


def test_vae_benchmark_checks_parity_and_reports_every_row(monkeypatch):
    """bench.vae at a tiny size: it refuses to time two decoders that disagree, and reports
    every row against diffusers' fp32 time."""
    import pytest

    from t2v.bench import vae as bench_vae
    from t2v.bench.common import zero_parameters
    from t2v.config import VAEConfig

    cfg = VAEConfig(channels=(16, 32, 32, 32), layers_per_block=1, norm_groups=4)
    ours, reference = bench_vae.models(cfg)
    assert zero_parameters(reference) == [] and zero_parameters(ours) == []
    result = bench_vae.run(frames=2, size=32, repeat=1, cfg=cfg)
    assert result["parity"] <= bench_vae.PARITY_TOL
    assert set(result["rows"]) == {"float32", "bfloat16"}
    base = result["rows"]["float32"]["diffusers"]
    for row in result["rows"].values():
        assert row["speedup_vs_diffusers_fp32"] == base / row["t2v"]
    assert "| bfloat16 |" in bench_vae.report(result)
    # a decoder that differs is not timed
    monkeypatch.setattr(bench_vae, "PARITY_TOL", -1.0)
    with pytest.raises(RuntimeError, match="decode differently"):
        bench_vae.run(frames=1, size=16, repeat=1, cfg=cfg)


def test_report_records_the_cpu_capability():
    """Hosts of one machine kind differ (AVX2 vs AVX-512): the report says which one ran."""
    info = machine()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cores"] >= 1 and info["cpu"]


def test_few_step_benchmark_runs_the_fast_path(tmp_path, monkeypatch):
    """t2v.bench.few_step: t2v's side is lcm with one pass per step on the weights plus a
    guidance embedding (random, no zero weight), every component in the benchmark's dtype, as
    `python -m t2v.sample` parses it; diffusers runs its usual 25 fp32 steps."""
    from t2v.bench.few_step import EMBEDDING, REFERENCE_STEPS, commands, student_weights
    from t2v.cli.sample import parse
    from t2v.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
    from t2v.loading.weights import read_checkpoint
    from t2v.pipeline.text_to_video import TextToVideo
    from weights_convert.native import save_native

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # configs/ms17b.yaml
    t2v_cmd, ref_cmd = commands(4, "bfloat16", tmp_path / "student", tmp_path / "diffusers",
                                tmp_path)
    args, _ = parse(t2v_cmd[3:])
    assert (args.sampler, args.steps, args.dtype, args.vae_dtype) == \
        ("lcm", 4, "bfloat16", "bfloat16")
    assert ref_cmd[ref_cmd.index(str(tmp_path / "diffusers")) + 2:][:2] == \
        [str(REFERENCE_STEPS), "float32"]

    cfg = ModelConfig(text_encoder=TextEncoderConfig(width=32, heads=2, layers=1, mlp_width=64),
                      unet=UNetConfig(channels=(32, 64), attention=(True, False),
                                      layers_per_block=1, head_dim=16, transformer_in_heads=2,
                                      context_dim=32, norm_groups=8),
                      vae=VAEConfig(channels=(32, 64), layers_per_block=1, norm_groups=8))
    model = TextToVideo.from_config(cfg)
    native = tmp_path / "native"
    native.mkdir()
    save_native(native, cfg, {n: getattr(model, n).state_dict()
                              for n in ("text_encoder", "unet", "vae")})
    student = student_weights(native, tmp_path / "student")
    _, student_cfg, states = read_checkpoint(student, layout="native")
    assert student_cfg.unet.time_cond_proj_dim == EMBEDDING
    projection = states["unet"]["time_embedding.cond_proj.weight"]
    assert projection.shape == (32, EMBEDDING) and projection.abs().min() > 0
