"""Windowed sampling for long videos (t2v.sampling.windows) and its use in the pipeline."""

from pathlib import Path

import pytest
import torch

from t2v.pipeline.options import load_config
from t2v.errors import UserError
from t2v.pipeline.text_to_video import TextToVideo
from t2v.sampling.windows import frame_weights, reschedule_noise, window_starts, windowed

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"



def frame_wise(x, t):
    """A denoiser without temporal interaction: windows cannot change its output."""
    return torch.tanh(x * 0.5 + t * 1e-3)


def temporal(x, t):
    """A denoiser whose output depends on all frames it sees (their mean)."""
    return x - x.mean(dim=2, keepdim=True)


@pytest.mark.parametrize("frames, window, stride, loop, expected", [
    (16, 16, 12, False, [0]),
    (20, 8, 6, False, [0, 6, 12]),
    (21, 8, 6, False, [0, 6, 12, 13]),
    (12, 4, 4, True, [0, 4, 8]),
    (12, 4, 3, True, [0, 3, 6, 9]),
])
def test_window_starts_cover_every_frame(frames, window, stride, loop, expected):
    starts = window_starts(frames, window, stride, loop)
    assert starts == expected
    covered = {(s + i) % frames for s in starts for i in range(min(window, frames))}
    assert covered == set(range(frames))


def test_weights_peak_at_the_centre_and_never_vanish():
    w = frame_weights(8)
    assert torch.allclose(w, w.flip(0)) and w.min() > 0 and w.max() <= 1
    assert frame_weights(1).tolist() == [1.0] and frame_weights(5)[2] == 1.0


def test_window_covering_all_frames_is_the_plain_denoiser():
    x = torch.randn(1, 4, 6, 3, 3)
    assert torch.equal(windowed(temporal, 6, 2)(x, 7), temporal(x, 7))
    assert torch.equal(windowed(temporal, 10, 2)(x, 7), temporal(x, 7))


@pytest.mark.parametrize("loop", [False, True])
def test_fusion_is_exact_for_frame_wise_denoisers(loop):
    x = torch.randn(2, 4, 11, 3, 3)
    fused = windowed(frame_wise, 4, 2, loop)(x, 5)
    torch.testing.assert_close(fused, frame_wise(x, 5), rtol=0, atol=1e-6)


def test_temporal_denoiser_only_sees_its_window():
    x = torch.zeros(1, 1, 8, 1, 1)
    x[:, :, 7] = 8.0  # only the last frame is non-zero
    fused = windowed(temporal, 4, 0)(x, 0)  # windows [0..3], [4..7]
    assert torch.equal(fused[:, :, :4], torch.zeros(1, 1, 4, 1, 1))  # never saw frame 7
    assert fused[0, 0, 7].item() == pytest.approx(8.0 - 2.0)


def test_noise_rescheduling_reuses_shuffled_earlier_noise():
    noise = torch.randn(1, 4, 14, 2, 2)
    out = reschedule_noise(noise, window=6, stride=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, :6], noise[:, :, :6])
    for start in (6, 10):  # each block is a permutation of the block `window` frames earlier
        count = min(4, 14 - start)
        block = {tuple(out[0, :, start + i].flatten().tolist()) for i in range(count)}
        source = {tuple(out[0, :, start - 6 + i].flatten().tolist()) for i in range(count)}
        assert block == source


def test_pipeline_window_covering_all_frames_equals_plain_sampling():
    cfg = load_config(TINY)
    pipe = TextToVideo.from_config(cfg.model)
    kwargs = dict(num_frames=6, height=64, width=64, steps=3, seed=1, output="latents",
                  progress=False)
    plain = pipe("a long video", **kwargs).frames
    assert torch.equal(pipe("a long video", window=6, **kwargs).frames, plain)
    assert torch.equal(pipe("a long video", window=8, **kwargs).frames, plain)
    long = pipe("a long video", window=4, window_overlap=2, loop=True, **kwargs).frames
    assert long.shape == plain.shape and torch.isfinite(long).all()
    with pytest.raises(UserError, match="loop needs windowed sampling"):
        pipe("x", loop=True, **kwargs)
    with pytest.raises(UserError, match="window_overlap"):
        pipe("x", window=4, window_overlap=4, **kwargs)
