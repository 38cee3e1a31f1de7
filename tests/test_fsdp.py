"""train.strategy=fsdp (t2v/training/fsdp.py): FSDP2 on CPU with gloo, 2 processes under torchrun against
one process with the combined batch; sharded checkpoints resumed on 2 and on 1 process; LoRA."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from helpers import free_port, max_rel_diff, run_config
from synthetic import write_squares
from t2v.errors import UserError
from t2v.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
# 2 processes x batch 1 vs 1 process x batch 2, float32 compute: the same maths, rounded
# differently (a batch of 2 vs two batches of 1, a reduce-scatter vs a sum in one process);
# tests/test_train.py measures 1.5e-5 for gradients of this tiny model without any sharding.
GRAD_TOL = 5e-5
# Some gradients are zero up to rounding (self-attention q/k where a map has one position:
# 1e-13 against 1e-2 elsewhere); a tensor's difference is taken relative to its own largest
# value, or this share of the largest gradient of the model if that is more.
ZERO_FLOOR = 1e-3
# The change of the weights over 4 AdamW steps, compared as the gradients. AdamW turns rounding
# noise on a near-zero gradient into a step of size lr (m / sqrt(v) ~ sign): the runs use
# adam_eps=1, which makes steps proportional to gradients, so rounding stays rounding, and lr=1
# (with clipping at 0.05), so the changes are well above the float32 rounding of the weights.
WEIGHT_TOL = 5e-5
# bf16 compute against float32 on the same batch: 8 bits of mantissa (4e-3 per rounding)
# through ~40 layers; the loss (a mean over 16k values) agrees to this share.
BF16_LOSS_TOL = 1e-2
# torch's warning when an FSDP2-wrapped module returns a view (issue 39, item 13).
VIEW_WARNING = "returned a view tensor"

COMMON = ["train.trainable=[all]", "train.dropout=false", "train.lr=1.0",
          "train.adam_eps=1.0", "train.ema_decay=0.9", "train.grad_accum=2",
          "train.max_grad_norm=0.05", "train.gradient_checkpointing=true",
          "train.checkpoint_every=2", "train.strategy=fsdp"]

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
import torch.distributed as dist
from pathlib import Path
from safetensors.torch import save_file
from helpers import run_config
from t2v.process_end import end_process
from t2v.training.fsdp import full_value
from t2v.training.trainer import Trainer
trainer = Trainer(run_config(Path({data!r}), Path({out!r}), *{extra!r}))
init = {{"init." + n: full_value(p.detach()).clone() for n, p in trainer.trained.items()}}
grads = {{}}
step = trainer.optimizer.step
def capture(*a, **k):
    if not grads:  # the first step's gradients, whole
        grads.update({{"grad." + n: full_value(p.grad).clone()
                      for n, p in trainer.trained.items()}})
    return step(*a, **k)
trainer.optimizer.step = capture
trainer.run(progress=False)
weights = {{n: full_value(p.detach()).clone() for n, p in trainer.trained.items()}}
ema = {{"ema." + n: full_value(v).clone() for n, v in (trainer.ema or {{}}).items()}}
if trainer.dist.main:
    save_file({{**weights, **ema, **grads, **init}}, {out!r} + f"/result-{{trainer.dist.world}}.st")
if dist.is_initialized():
    dist.destroy_process_group()
end_process(0)  # t2v/process_end.py: why not a plain exit
"""


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> Path:
    return write_squares(tmp_path_factory.mktemp("squares"))


def run(squares: Path, out: Path, *extra: str, processes: int = 2) -> dict[str, torch.Tensor]:
    """A training run in `processes` processes (torchrun, gloo); its gathered weights, EMA and
    first-step gradients."""
    script = out.parent / f"{out.name}-run.py"
    out.mkdir(parents=True, exist_ok=True)
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests"), data=str(squares), out=str(out),
                                    extra=list(extra)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(free_port()), str(script)] if processes > 1
           else [sys.executable, str(script)])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert VIEW_WARNING not in done.stderr, done.stderr[-4000:]
    return load_file(str(out / f"result-{processes}.st"))


def diff(a: dict, b: dict, kind: str = "") -> float:
    """The largest difference of the first gradients (kind "grad.") or of the changes of the
    weights (kind "") or EMA ("ema.") from the initial weights of run `a`, relative to each
    tensor's largest value or ZERO_FLOOR x the largest of all, whichever is more."""
    assert set(a) == set(b)
    names = [n for n in a if not n.startswith(("grad.", "ema.", "init."))]

    def value(result, name):
        if kind == "grad.":
            return result["grad." + name]
        return result[kind + name] - a["init." + name]

    scale = max(float(value(b, n).abs().max()) for n in names)
    assert scale > 0  # the runs moved: the comparison is not vacuous
    return max(float((value(a, n) - value(b, n)).abs().max())
               / max(float(value(b, n).abs().max()), ZERO_FLOOR * scale) for n in names)


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_anywhere(squares, tmp_path):
    fp32 = ["train.fsdp.param_dtype=float32"]
    two = run(squares, tmp_path / "two", *COMMON, *fp32, "train.steps=4", "train.batch_size=1")
    one = run(squares, tmp_path / "one", *COMMON, *fp32, "train.steps=4", "train.batch_size=2",
              processes=1)
    g, w, e = diff(two, one, "grad."), diff(two, one), diff(two, one, "ema.")
    print(f"[fsdp] 2x1 vs 1x2 (fp32): first gradients {g:.2e}, weights {w:.2e}, EMA {e:.2e}")
    assert g <= GRAD_TOL and w <= WEIGHT_TOL and e <= WEIGHT_TOL
    # Sharded checkpoints: per-rank shards, state.pt, one folder per checkpoint step.
    steps = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert steps == ["step-000002", "step-000004"]
    folder = tmp_path / "two" / "checkpoints" / "step-000002"
    assert (folder / ".metadata").is_file() and (folder / "state.pt").is_file()
    assert sorted(p.name for p in folder.glob("rng-rank*.pt")) == ["rng-rank0.pt",
                                                                  "rng-rank1.pt"]
    # Resume at step 2 on 2 processes: equal to the uninterrupted run, bit for bit.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoints").mkdir()
    os.symlink(folder, resumed / "checkpoints" / "step-000002")
    again = run(squares, resumed, *COMMON, *fp32, "train.steps=4", "train.batch_size=1",
                "train.resume=latest")
    for name in two:
        if name.startswith("ema.") or "." in name and not name.startswith(("grad.", "init.")):
            assert torch.equal(two[name], again[name]), name
    # Resume on 1 process (the combined batch) from the 2-process checkpoint.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "checkpoints").mkdir()
    os.symlink(folder, alone / "checkpoints" / "step-000002")
    single = run(squares, alone, *COMMON, *fp32, "train.steps=4", "train.batch_size=2",
                 "train.resume=latest", processes=1)
    w, e = diff(two, single), diff(two, single, "ema.")
    print(f"[fsdp] resumed on 1 process from 2: weights {w:.2e}, EMA {e:.2e}")
    assert w <= WEIGHT_TOL and e <= WEIGHT_TOL
    # The exported model (rank 0, gathered, EMA weights) is the run's EMA.
    exported = load_file(str(tmp_path / "two" / "model" / "unet.safetensors"))
    for name in two:
        if name.startswith("ema."):
            assert torch.equal(exported[name[4:]], two[name]), name


def test_bf16_policy_computes_in_bf16(squares, tmp_path, one_thread):
    """train.fsdp.param_dtype=bfloat16: the gathered weights and the forward are bf16, the
    sharded master weights float32; "auto" is float32 on the CPU (t2v.training.fsdp.fsdp_param_dtype)."""
    from t2v.training.losses import diffusion_loss

    losses = {}
    try:
        for dtype in ("bfloat16", "auto"):
            trainer = Trainer(run_config(squares, tmp_path / dtype, "train.trainable=[all]",
                                         "train.strategy=fsdp", "train.dropout=false",
                                         f"train.fsdp.param_dtype={dtype}"))
            assert all(p.dtype == torch.float32 for p in trainer.trained.values())
            x0, context, t, noise, _ = trainer.micro_batch(0)
            with torch.no_grad():
                out = trainer.model(x0, t, context)
                losses[dtype] = float(diffusion_loss(trainer.model, x0, context, t, noise,
                                                     trainer.schedule.alphas_cumprod, "epsilon"))
            assert out.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)
            dist.destroy_process_group()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(f"[fsdp] loss bf16 {losses['bfloat16']:.5f} vs float32 {losses['auto']:.5f}")
    assert losses["bfloat16"] != losses["auto"]
    assert abs(losses["bfloat16"] - losses["auto"]) <= BF16_LOSS_TOL * losses["auto"]


@pytest.mark.slow
def test_lora_sharded_equals_lora_alone(squares, tmp_path):
    lora = ["lora.rank=4", "train.steps=2", "train.dropout=false", "train.lr=1.0",
            "train.adam_eps=1.0", "train.checkpoint_every=2"]
    two = run(squares, tmp_path / "two", *lora, "train.strategy=fsdp",
              "train.fsdp.param_dtype=float32", "train.batch_size=1")
    one = run(squares, tmp_path / "one", *lora, "train.batch_size=2", processes=1)  # no FSDP
    # The adapters start equal (rank 0's random A on every rank, as DDP would broadcast).
    assert all(torch.equal(two[n], one[n]) for n in two if n.startswith("init."))
    worst = diff(two, one)
    print(f"[fsdp] LoRA 2x1 sharded vs 1x2 plain: weight changes {worst:.2e}")
    assert worst <= WEIGHT_TOL
    # lora.safetensors: written once (rank 0), the adapters' final weights.
    files = {k: load_file(str(tmp_path / k / "lora.safetensors")) for k in ("two", "one")}
    assert set(files["two"]) == set(files["one"])
    for name, value in files["two"].items():
        assert max_rel_diff(value, files["one"][name]) <= WEIGHT_TOL or \
            float((value - files["one"][name]).abs().max()) <= 1e-9, name
    assert any(float(v.abs().max()) > 0 for n, v in files["two"].items() if "lora_B" in n)


@pytest.mark.parametrize("frames", [4, 1])
def test_no_view_warning_from_wrapped_blocks(squares, tmp_path, one_thread, frames):
    """No FSDP2 "returned a view tensor" warning in a training step: blocks ending in a
    TemporalConv (the last down block, the mid block) returned a view of their residual sum,
    and with one frame the root's output was a view (t2v/models/unet.py)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Trainer(run_config(squares, tmp_path, "train.trainable=[all]", "train.steps=1",
                               "train.strategy=fsdp", "train.dropout=false",
                               f"data.num_frames={frames}")).run(progress=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    views = [str(w.message).split(".")[0] for w in caught if VIEW_WARNING in str(w.message)]
    assert not views, views


def test_strategy_mismatch_and_bad_settings_are_clear(squares, tmp_path, one_thread):
    from t2v.pipeline.options import load_config
    from t2v.errors import ConfigError
    from t2v.training.config import TrainRunConfig

    Trainer(run_config(squares, tmp_path, "train.steps=1")).run(progress=False)
    try:
        with pytest.raises(UserError, match="train.strategy=ddp"):
            Trainer(run_config(squares, tmp_path, "train.steps=2", "train.resume=latest",
                               "train.strategy=fsdp"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    for bad, needle in [(["train.strategy=zero"], "train.strategy must be one of"),
                        (["train.strategy=fsdp", "train.mixed_precision=bf16"],
                         "train.fsdp.param_dtype"),
                        (["train.strategy=fsdp", "train.model=vae"], "train.model=vae"),
                        (["train.fsdp.param_dtype=int8"], "train.fsdp.param_dtype must be")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(None, bad, schema=TrainRunConfig)



def test_training_memory_model_terms():
    from t2v.pipeline.options import load_config
    from t2v.models.memory import largest_block_parameters, parameter_counts, training_memory

    cfg = load_config(ROOT / "configs" / "tiny.yaml", []).model
    unet = parameter_counts(cfg)["unet"]
    one = training_memory(cfg, ranks=1, strategy="ddp", frames=8, height=64, width=64)
    assert (one.weights, one.gradients, one.optimizer, one.gathered) == (4 * unet, 4 * unet,
                                                                       8 * unet, 0)
    four = training_memory(cfg, ranks=4, strategy="fsdp", ema=True, param_dtype="bfloat16",
                           frames=8, height=64, width=64)
    assert (four.weights, four.optimizer, four.ema) == (unet, 2 * unet, unet)
    assert four.gathered == largest_block_parameters(cfg) * (2 * 2 + 4)
    # Activations: linear in frames and batch, halved by a 16-bit compute dtype.
    twice = training_memory(cfg, frames=16, height=64, width=64)
    assert abs(twice.activations - 2 * one.activations) <= 1
    batch2 = training_memory(cfg, batch=2, frames=8, height=64, width=64)
    assert abs(batch2.activations - 2 * one.activations) <= 1
    assert abs(four.activations - one.activations / 2) <= 1
    lora = training_memory(cfg, trained=1000, frames=8, height=64, width=64)
    assert (lora.gradients, lora.optimizer) == (4000, 8000)


def test_clip_grad_norm_equals_torch():
    """t2v.training.fsdp.clip_grad_norm_ (sum of squares of the local shards, one all-reduce) against
    torch.nn.utils.clip_grad_norm_ on plain tensors in a one-process group: the norm and the
    clipped gradients, clipping on and off; float32 rounding of a different summation order."""
    from t2v.training.fsdp import clip_grad_norm_

    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (7,), (2, 3, 5), (1,)]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for max_norm in (0.5, 1e9, float("inf")):
            ours = [torch.zeros(s, requires_grad=True) for s in shapes]
            theirs = [torch.zeros(s, requires_grad=True) for s in shapes]
            for a, b in zip(ours, theirs):
                a.grad = torch.randn(a.shape, generator=g) * 3
                b.grad = a.grad.clone()
            norm = clip_grad_norm_(ours, max_norm)
            expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
            torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
            clipped = float(torch.cat([a.grad.flatten() for a in ours]).norm())
            assert clipped == pytest.approx(min(max_norm, float(expected)), rel=1e-5)
    finally:
        dist.destroy_process_group()


# The loss is the difference of two nearly equal network outputs (student at x_t, target at
# x_s), so the batch-composition noise of each (1x2 vs 2x1 batches) is a larger part of its
# gradient than in the diffusion loss: 5.2e-5 measured (2026-12-05).
CONSISTENCY_GRAD_TOL = 1e-4


@pytest.mark.slow
def test_consistency_distillation_two_processes_equal_one(squares, tmp_path):
    """Sharded consistency distillation (the target network's weights swapped into the
    sharded student for its pass, its EMA updated on the local shards) gives the one-process
    run's first gradients and weights after 4 steps."""
    distil = [*COMMON, "train.fsdp.param_dtype=float32", "train.objective=consistency",
              "consistency.loss=l2", "consistency.guidance_embedding=16",
              "consistency.ddim_steps=10", "consistency.target_ema_decay=0.5", "train.steps=4"]
    two = run(squares, tmp_path / "two", *distil, "train.batch_size=1")
    one = run(squares, tmp_path / "one", *distil, "train.batch_size=2", processes=1)
    g, w = diff(two, one, "grad."), diff(two, one)
    print(f"[fsdp] consistency 2x1 vs 1x2 (fp32): first gradients {g:.2e}, weights {w:.2e}")
    assert g <= CONSISTENCY_GRAD_TOL and w <= WEIGHT_TOL
