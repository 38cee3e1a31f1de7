"""DeepCache (t2v/sampling/deep_cache.py): exact where it must be, an approximation where it may be."""

from pathlib import Path

import pytest
import torch

from helpers import TINY, inputs, randomize_
from t2v.pipeline.options import load_config
from t2v.sampling.deep_cache import DeepCache, deep_cached
from t2v.sampling.freeu import RECOMMENDED, with_freeu
from t2v.errors import UserError
from t2v.pipeline.text_to_video import TextToVideo
from t2v.models.unet import UNet3D

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unet():
    return randomize_(UNet3D(TINY), seed=3).eval()


@torch.no_grad()
def test_interval_one_is_the_plain_unet(unet):
    x, context = inputs(2, 3, (8, 8))
    cache = DeepCache(1)
    for t in (900, 500):
        assert torch.equal(deep_cached(unet, cache)(x, t, context), unet(x, t, context))
    assert cache.full_calls == 2


@pytest.mark.parametrize("branch", [0, 1, 2])
@torch.no_grad()
def test_a_reused_call_on_the_same_inputs_gives_the_full_output(unet, branch):
    """The shallow path recomputes the high-resolution branch from the kept deep features: on
    the inputs of the full call it must return the full output, bit for bit, at every branch
    (TINY has 2 layers per block: branches 0, 1, 2)."""
    x, context = inputs(2, 3, (8, 8))
    cache = DeepCache(2, branch=branch)
    full = deep_cached(unet, cache)(x, 700, context)
    reused = deep_cached(unet, cache)(x, 700, context)
    assert cache.full_calls == 1 and cache.calls == 2
    assert torch.equal(full, unet(x, 700, context))
    assert torch.equal(reused, full)
    # The same with FreeU and frame chunks, which the shallow path must apply alike.
    cache = DeepCache(2, branch=branch)
    call = deep_cached(unet, cache, frame_chunk=1, freeu=RECOMMENDED)
    full = call(x, 700, context)
    assert torch.equal(call(x, 700, context), full)
    assert torch.equal(full, with_freeu(unet, RECOMMENDED, frame_chunk=1)(x, 700, context))
    assert not torch.equal(full, unet(x, 700, context))  # FreeU did act


@pytest.mark.parametrize("branch", [0, 1, 2])
@torch.no_grad()
def test_a_shallow_call_runs_the_branch_layers_only(unet, branch):
    """Branch b: the first b layers of down block 0 and the last b + 1 of the last up block;
    nothing of the other blocks."""
    ran = []
    hooks = [m.register_forward_hook(lambda m, *a, name=name: ran.append(name))
             for name, m in unet.named_modules() if name.endswith(("resnets.0", "resnets.1",
                                                                   "resnets.2"))]
    try:
        x, context = inputs(2, 3, (8, 8))
        cache = DeepCache(2, branch=branch)
        deep_cached(unet, cache)(x, 700, context)
        ran.clear()
        deep_cached(unet, cache)(x, 650, context)
    finally:
        for h in hooks:
            h.remove()
    last = len(unet.up_blocks) - 1
    assert ran == [f"down_blocks.0.resnets.{i}" for i in range(branch)] + \
        [f"up_blocks.{last}.resnets.{i}" for i in range(2 - branch, 3)]


@torch.no_grad()
def test_reused_calls_approximate_and_refresh_on_schedule(unet):
    x, context = inputs(2, 3, (8, 8))
    x2 = x + 0.05 * torch.randn_like(x)
    cache = DeepCache(3)
    deep_cached(unet, cache)(x, 700, context)
    approx = deep_cached(unet, cache)(x2, 680, context)
    exact = unet(x2, 680, context)
    # Not the full output (deep features are from the previous input), but close to it.
    diff = (approx - exact).abs().max() / exact.abs().max()
    assert 0 < diff < 0.5
    deep_cached(unet, cache)(x2, 660, context)  # call 3: still shallow
    assert cache.full_calls == 1
    assert torch.equal(deep_cached(unet, cache)(x2, 640, context), unet(x2, 640, context))
    assert cache.full_calls == 2
    # Inputs of another shape cannot reuse the kept features: such a call runs in full.
    for other, ctx in ((x2[:1], context[:1]), (x2[:, :, :2], context),
                       (x2.reshape(1, 4, 6, 8, 8), context[:1])):  # same batch x frames
        cache.calls = 1
        assert torch.equal(deep_cached(unet, cache)(other, 640, ctx), unet(other, 640, ctx))
    cache.reset()
    assert cache.features is None and cache.calls == 0


def test_interval_is_checked():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(UserError, match="cache_interval"):
            DeepCache(bad)
    for bad in (-1, 1.0, True):
        with pytest.raises(UserError, match="cache_branch"):
            DeepCache(2, branch=bad)


@torch.no_grad()
def test_a_branch_beyond_the_first_block_is_refused(unet):
    x, context = inputs(1, 2, (8, 8))
    with pytest.raises(UserError, match="between 0 and 2"):
        deep_cached(unet, DeepCache(2, branch=3))(x, 700, context)


@pytest.fixture(scope="module")
def pipe():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    pipe = TextToVideo.from_config(cfg.model, seed=0)
    randomize_(pipe.unet, seed=4)
    return pipe


def test_pipeline_cache_interval(pipe):
    calls = []
    handle = pipe.unet.up_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    kwargs = dict(num_frames=3, height=32, width=32, steps=6, sampler="dpmsolver++", seed=1,
                  output="latents", progress=False)
    try:
        plain = pipe("a red circle", **kwargs).frames
        assert len(calls) == 6
        assert torch.equal(pipe("a red circle", cache_interval=1, **kwargs).frames, plain)
        calls.clear()
        cached = pipe("a red circle", cache_interval=3, **kwargs).frames
        assert len(calls) == 2  # the deep blocks ran at steps 1 and 4 only
        assert not torch.equal(cached, plain)
        calls.clear()
        pipe("a red circle", cache_interval=3, free_init=2, **{**kwargs, "steps": 4})
        assert len(calls) == 4  # each pass: steps 1 and 4 (without the reset: 1, 4, 7)
    finally:
        handle.remove()
    with pytest.raises(UserError, match="windowed"):
        pipe("a red circle", cache_interval=2, window=2, window_overlap=1,
             **{**kwargs, "num_frames": 4})


def test_cli_flag_and_config_key():
    from t2v.errors import ConfigError
    from t2v.cli.sample import parse

    base = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--prompt", "a red circle"]
    _, cfg = parse([*base, "--cache-interval", "3"])
    assert cfg.sample.cache_interval == 3
    _, cfg = parse([*base, "sample.cache_interval=2"])
    assert cfg.sample.cache_interval == 2
    _, cfg = parse([*base, "--cache-interval", "3", "--cache-branch", "2"])
    assert cfg.sample.cache_branch == 2
    with pytest.raises((ConfigError, UserError), match="cache_branch"):
        parse([*base, "--cache-branch", "-1"])
    for bad in (["--cache-interval", "0"], ["--cache-interval", "2", "--window", "8"]):
        with pytest.raises((ConfigError, UserError), match="cache_interval"):
            parse([*base, *bad])


def test_benchmark_per_video_model():
    """t2v.bench.deep_cache's per-video ratio: 25 steps at N = 3 are 9 full calls and 16
    shallow ones."""
    from t2v.bench.deep_cache import per_video_speedup

    assert per_video_speedup(1.0, 0.0, 25, 3) == pytest.approx(25 / 9)
    assert per_video_speedup(1.0, 1.0, 25, 5) == pytest.approx(1.0)
    assert per_video_speedup(2.0, 0.5, 25, 1) == pytest.approx(1.0)
    assert per_video_speedup(1.0, 0.25, 10, 2) == pytest.approx(10 / (5 + 5 * 0.25))
