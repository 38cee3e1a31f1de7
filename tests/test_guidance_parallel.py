"""Guidance-parallel sampling (t2v.sampling.guidance_parallel): 2 processes under torchrun (gloo, CPU)
against one process, through the Python API and the CLI, and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from helpers import free_port, max_rel_diff
from t2v.pipeline.options import load_config
from t2v.errors import UserError
from t2v.sampling.guidance import guide
from t2v.pipeline.text_to_video import TextToVideo
from t2v.cli.sample import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
# Final latents, 2 processes vs 1, max |a - b| / max |b|. Not bit-identical: each rank's UNet
# runs on batch 1 where one process runs batch 2, and oneDNN's conv/matmul blocking depends on
# the batch, so single UNet outputs differ by ~1e-6 (measured on the tiny UNet). Measured here
# over the cases below: 2.5e-6 to 3.9e-6 (3 steps, g = 9); TOL leaves 5x room for other CPUs.
# Against one process running the two passes one after the other at batch 1 ("split"), the
# result is bit-identical: the batch is the only difference.
TOL = 2e-5


def inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(1, 3, 64, 64, generator=g) * 2 - 1,
            "video": torch.rand(1, 3, 4, 64, 64, generator=g) * 2 - 1}


def cases() -> dict[str, dict]:
    """Settings -> pipeline arguments; each also runs with the COMMON ones."""
    x = inputs()
    return {
        "ddim": dict(sampler="ddim"),
        "ddim-eta-rescale": dict(sampler="ddim", eta=0.5, guidance_rescale=0.7),
        "euler_a": dict(sampler="euler_a"),
        "windows-freeinit-init_image": dict(sampler="dpmsolver++", window=3, window_overlap=1,
                                            free_init=2, init_image=x["image"], init_frames=2),
        "prompt-travel": dict(prompt="", prompt_schedule="0: a red ball | 3: a blue ball",
                              window=2, window_overlap=1),
        "video-to-video": dict(init_video=x["video"], strength=0.75, sampler="unipc"),
    }


COMMON = dict(prompt="a red ball", num_frames=4, height=64, width=64, steps=3,
              guidance_scale=9.0, seed=3, output="latents", progress=False)


def split_passes(pipe: TextToVideo) -> None:
    """One process, the two passes as two UNet calls on batch B (as the 2 ranks run them)."""
    def guided_denoiser(context, guidance_scale, frame_chunk, guidance_rescale=0.0,
                        deep_cache=None, guidance_interval=None, freeu=None,
                        timestep_cond=None):
        assert deep_cache is None and guidance_interval is None  # not with guidance_parallel
        assert freeu is None and timestep_cond is None
        uncond, cond = context.chunk(2)

        def denoise(x, t):
            return guide(pipe.unet(x, t, uncond, frame_chunk or None),
                         pipe.unet(x, t, cond, frame_chunk or None),
                         guidance_scale, guidance_rescale)
        return denoise

    pipe.guided_denoiser = guided_denoiser


def run_cases(parallel: bool, split: bool = False) -> dict[str, torch.Tensor]:
    """Final latents of every case, and the UNet batch sizes seen; one process runs guidance
    as one batch-2B UNet call, or as two batch-B calls if `split`."""
    pipe = TextToVideo.from_config(load_config(TINY).model, seed=0)
    if split:
        split_passes(pipe)
    batches = []
    pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    out = {}
    for name, kwargs in cases().items():
        out[name] = pipe(**{**COMMON, **kwargs}, guidance_parallel=parallel).frames.contiguous()
    if parallel:  # no seed: rank 0's random one, shared
        result = pipe(**{**COMMON, "seed": None}, guidance_parallel=True)
        out["shared-seed"] = result.frames
        out["shared-seed.seed"] = torch.tensor([result.seed])
    out["unet-batches"] = torch.tensor(batches)
    return out


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch.distributed as dist
from safetensors.torch import save_file
from test_guidance_parallel import run_cases
from t2v.process_end import end_process
dist.init_process_group("gloo")
save_file(run_cases(parallel=True), {out!r} + f"/rank{{dist.get_rank()}}.st")
dist.destroy_process_group()
end_process(0)  # t2v/process_end.py: why not a plain exit
"""


def torchrun(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--master_port", str(free_port()), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, one_thread):
    from safetensors.torch import load_file

    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path)))
    done = torchrun(script, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = load_file(str(tmp_path / "rank0.st")), load_file(str(tmp_path / "rank1.st"))
    single, split = run_cases(parallel=False), run_cases(parallel=False, split=True)
    # Every UNet call of the ranks ran one pass (batch 1), of one process both (batch 2).
    assert set(rank0["unet-batches"].tolist()) == set(rank1["unet-batches"].tolist()) == {1}
    assert set(single["unet-batches"].tolist()) == {2}
    assert len(rank0["unet-batches"]) == len(single["unet-batches"]) + 3  # + the shared seed
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # the ranks in lockstep, bit for bit
    assert set(split["unet-batches"].tolist()) == {1}
    for name in cases():
        assert torch.equal(rank0[name], split[name]), name
        diff = max_rel_diff(rank0[name], single[name])
        print(f"[guidance-parallel] {name}: 2 processes vs 1, final latents {diff:.2e}")
        assert diff <= TOL, (name, diff)
    seed = int(rank0["shared-seed.seed"])
    reference = TextToVideo.from_config(load_config(TINY).model, seed=0)
    diff = max_rel_diff(rank0["shared-seed"], reference(**{**COMMON, "seed": seed}).frames)
    print(f"[guidance-parallel] shared seed {seed}: {diff:.2e}")
    assert diff <= TOL


def png_frames(folder: Path) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB"))
                     for p in sorted(folder.glob("*.png"))])


@pytest.mark.slow
def test_cli_two_processes_write_once_and_match_one_process(tmp_path, one_thread, capsys):
    """Both ranks run both prompts (not split) with rank 0's random seed (no --seed); rank 0
    alone writes; the frames match one process given that seed."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na blue cube\n")
    args = ["--config", TINY, "--prompts-file", prompts, "--format", "png", "--sampler",
            "euler_a", "--guidance-rescale", "0.5", "--no-progress"]
    done = torchrun("-m", "t2v.sample", *args, "--out", tmp_path / "parallel",
                    "--guidance-parallel", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    seed = int(done.stdout.split()[0].rsplit("-", 1)[1])
    names = [f"0-a-red-ball-{seed}", f"1-a-blue-cube-{seed + 1}"]
    assert done.stdout.split() == [str(tmp_path / "parallel" / n) for n in names]  # rank 0 only
    assert sorted(p.name for p in (tmp_path / "parallel").iterdir()) == \
        sorted(names + [n + ".json" for n in names])
    sidecar = json.loads((tmp_path / "parallel" / (names[0] + ".json")).read_text())
    assert sidecar["config"]["sample"]["guidance_parallel"] is True
    assert sidecar["config"]["sample"]["seed"] == seed
    assert main([str(a) for a in args + ["--seed", seed, "--out", tmp_path / "single"]]) == 0
    capsys.readouterr()
    for name in names:
        a = png_frames(tmp_path / "parallel" / name).astype(int)
        b = png_frames(tmp_path / "single" / name).astype(int)
        levels = np.abs(a - b).max()
        print(f"[guidance-parallel] CLI {name}: {np.mean(a != b):.2e} of the values differ, "
              f"by at most {levels} levels")
        assert levels <= 1  # rounding of latents within TOL, at most one uint8 level


@pytest.mark.parametrize("extra, message", [
    ([], "needs exactly 2 processes"),
    (["--guidance", "1"], "guidance_scale 1 <= 1"),
])
def test_cli_refuses(tmp_path, capsys, extra, message):
    code = main(["--config", TINY, "--prompt", "x", "--seed", "1", "--guidance-parallel",
                 "--out", str(tmp_path / "x.mp4"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.mp4").exists()


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def pipe():
    return TextToVideo.from_config(load_config(TINY).model, seed=0)


def test_pipeline_refuses_without_a_group(pipe):
    with pytest.raises(UserError, match="needs a process group of 2 processes"):
        pipe(**COMMON, guidance_parallel=True)


def test_pipeline_refuses_a_group_of_one(pipe, group_of_one):
    with pytest.raises(UserError, match="exactly 2 processes, got 1"):
        pipe(**COMMON, guidance_parallel=True)


def test_pipeline_refuses_guidance_one(pipe, group_of_one):
    with pytest.raises(UserError, match="guidance_scale 1 <= 1"):
        pipe(**{**COMMON, "guidance_scale": 1.0}, guidance_parallel=True)
