"""Prompt travel (t2v.sampling.prompt_travel): the schedule, the per-window embedding, the pipeline
and the CLI, against the semantics of docs/sampling-tools.md."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2v.pipeline.options import load_config
from t2v.errors import ConfigError, UserError
from t2v.pipeline.text_to_video import TextToVideo
from t2v.sampling.prompt_travel import (parse_prompt_schedule, resolve_schedule, schedule_embedding,
                               segment, window_centre)
from t2v.cli.sample import main
from t2v.sampling.windows import window_starts, windowed

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SCHEDULE = "0: a red circle moving right | 6: a blue circle moving right"


@pytest.fixture(scope="module")
def pipe():
    return TextToVideo.from_config(load_config(TINY).model, seed=0)


def small(**extra):
    return dict(num_frames=10, height=32, width=32, steps=2, seed=1, window=4,
                window_overlap=2, output="latents", progress=False, **extra)


# -- the schedule --------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("0: a red ball", {0: "a red ball"}),
    (SCHEDULE, {0: "a red circle moving right", 6: "a blue circle moving right"}),
    ("  3 :a  |7:  b c  ", {3: "a", 7: "b c"}),
    ("0: a cat: sitting | 4: (red:1.3) ball", {0: "a cat: sitting", 4: "(red:1.3) ball"}),
    ("5: late start", {5: "late start"}),
])
def test_parse_prompt_schedule(text, expected):
    schedule = parse_prompt_schedule(text)
    assert schedule == expected and list(schedule) == sorted(expected)


@pytest.mark.parametrize("text, needle", [
    ("", "prompt schedule is empty"),
    ("  ", "prompt schedule is empty"),
    ("a red ball", "has no 'FRAME:'"),
    ("0: a | b", "'b' has no 'FRAME:'"),
    ("x: a", "'x' is not a frame number"),
    ("-1: a", "'-1' is not a frame number"),
    ("1.5: a", "'1.5' is not a frame number"),
    (": a", "'' is not a frame number"),
    ("0: a | 0: b", "frame 0 appears twice"),
    ("8: a | 4: b", "keyframes must increase, but 4 comes after 8"),
    ("0: a | 4:", "frame 4 has no prompt"),
    ("0: a | 10: b", "keyframe 10 is past the last frame (9) of a 10-frame video"),
])
def test_bad_schedules_are_one_line_errors(text, needle):
    with pytest.raises(UserError, match=None) as info:
        resolve_schedule(text, 10)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_dict_schedules():
    assert list(resolve_schedule({6: "b", 0: "a"}, 10)) == [0, 6]  # sorted
    for bad, needle in [({}, "is empty"), ({"0": "a"}, "'0' is not a frame number"),
                        ({True: "a"}, "not a frame number"), ({-2: "a"}, "not a frame number"),
                        ({12: "a"}, "past the last frame"), ({0: ""}, "frame 0 has no prompt"),
                        ({0: 3}, "frame 0 has no prompt")]:
        with pytest.raises(UserError, match=needle):
            resolve_schedule(bad, 10)
    with pytest.raises(UserError, match="a string or a dict"):
        resolve_schedule([(0, "a")], 10)


# -- the interpolation ---------------------------------------------------------------------

def written_interpolation(keyframes, embeddings, c):
    """docs/sampling-tools.md, "Prompt travel", transcribed."""
    if c <= keyframes[0]:
        return embeddings[0]
    if c >= keyframes[-1]:
        return embeddings[-1]
    i = [k for k, f in enumerate(keyframes) if f <= c][-1]
    a = (c - keyframes[i]) / (keyframes[i + 1] - keyframes[i])
    return (1 - a) * embeddings[i] + a * embeddings[i + 1]


@pytest.mark.parametrize("c", [-1.0, 0.0, 2.0, 3.5, 6.0, 7.25, 9.5, 12.0, 20.0, 31.0])
def test_schedule_embedding_is_the_written_interpolation(c):
    keyframes = [2, 6, 12]
    embeddings = torch.randn(3, 77, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(schedule_embedding(keyframes, embeddings, c),
                       written_interpolation(keyframes, embeddings, c))


def test_segments_and_centres():
    assert segment([2, 6, 12], 4.0) == (0, 0.5) and segment([2, 6, 12], 9.0) == (1, 0.5)
    assert segment([2, 6, 12], 6.0) == (1, 0.0) and segment([5], 0.0) == (0, 0.0)
    assert window_centre(0, 16, 64) == 7.5 and window_centre(4, 5, 64) == 6.0
    assert window_centre(60, 8, 64, loop=True) == 63.5  # the centre has not wrapped yet
    assert window_centre(62, 8, 64, loop=True) == 1.5  # 65.5 wraps to 1.5


@pytest.mark.parametrize("frames, window, overlap, loop", [(10, 4, 2, False), (9, 4, 1, True),
                                                           (4, 6, 2, False)])
def test_windowed_passes_each_windows_frames(frames, window, overlap, loop):
    seen = []

    def model(x, t, index):
        seen.append(index.tolist())
        return x

    x = torch.randn(1, 2, frames, 1, 1)
    assert torch.allclose(windowed(model, window, overlap, loop, pass_frames=True)(x, 0), x)
    size = min(window, frames)
    starts = window_starts(frames, size, size - overlap, loop)
    assert seen == [[(s + k) % frames for k in range(size)] for s in starts]


def test_each_window_gets_the_schedule_at_its_centre(pipe, monkeypatch):
    """The contexts the UNet sees, window by window, against the written formula on the
    keyframes' text-encoder outputs."""
    keyframes, prompts = [1, 6], ["a red circle", "a blue (circle:1.2)"]
    made = []
    real = TextToVideo.guided_denoiser

    def recording(self, context, *args, **kwargs):
        made.append(context.clone())
        return real(self, context, *args, **kwargs)

    monkeypatch.setattr(TextToVideo, "guided_denoiser", recording)
    schedule = {f: p for f, p in zip(keyframes, prompts)}
    for loop in (False, True):
        made.clear()
        pipe(prompt_schedule=schedule, negative_prompt="noise", prompt_weighting=True,
             **small(loop=loop, num_videos_per_prompt=2))
        cond = pipe.encode_prompt(prompts, weighted=True, min_chunks=1)  # (K, L, D)
        negative = pipe.encode_prompt(["noise"] * 2, weighted=True)[:1]  # one per keyframe
        starts = window_starts(10, 4, 2, loop)
        assert len(made) == len(starts)
        for start, context in zip(starts, made):
            expected = written_interpolation(keyframes, cond, window_centre(start, 4, 10, loop))
            assert context.shape == (4, 77, 32)  # [uncond x 2 videos; cond x 2 videos]
            assert torch.equal(context[:2], negative.expand(2, -1, -1))
            assert torch.equal(context[2:], expected.expand(2, -1, -1))
    # the conditioning travels: more than two distinct contexts (compared by content; a sum
    # is no fingerprint, the text encoder's final layer norm makes every token's sum ~0)
    assert len({c[2:].numpy().tobytes() for c in made}) > 2


def test_single_prompt_schedule_equals_the_plain_windowed_run(pipe):
    for extra in ({}, {"loop": True}, {"guidance_scale": 1.0}, {"negative_prompt": "dark"}):
        plain = pipe("a red ball", **small(**extra)).frames
        for schedule in ("0: a red ball", "7: a red ball", {9: "a red ball"}):
            travel = pipe(prompt_schedule=schedule, **small(**extra)).frames
            assert torch.equal(travel, plain), (extra, schedule)
    plain = pipe("a (red:1.3) ball", **small(prompt_weighting=True)).frames
    travel = pipe(prompt_schedule="0: a (red:1.3) ball", **small(prompt_weighting=True)).frames
    assert torch.equal(travel, plain)
    # A real schedule does change the video.
    assert not torch.equal(pipe(prompt_schedule="0: a red ball | 9: a blue cube",
                                **small()).frames, plain)


def test_pipeline_refusals(pipe):
    bad = [
        (dict(prompt_schedule="0: a"), {"window": None}, "needs windowed sampling"),
        (dict(prompt="a red ball", prompt_schedule="0: a"), {}, "takes the place of the prompt"),
        (dict(prompt_schedule="0: a", prompt_embeds=torch.zeros(1, 77, 32)), {},
         "takes the place of the prompt"),
        (dict(prompt_schedule="0: a", negative_prompt=["x", "y"]), {},
         "2 negative prompts for one prompt schedule"),
        (dict(prompt_schedule="0: a | 10: b"), {}, "past the last frame"),
        (dict(prompt_schedule="0 a"), {}, "has no 'FRAME:'"),
    ]
    for call, change, needle in bad:
        with pytest.raises(UserError, match=needle):
            pipe(**call, **{**small(), **change})
    frames = pipe(prompt_schedule="0: a", negative_prompt=["x"], **small()).frames
    assert frames.shape == (1, 4, 10, 4, 4)


# -- config and CLI ------------------------------------------------------------------------

def test_config_checks_the_schedule():
    ok = ["sample.num_frames=10", "sample.window=4", "sample.window_overlap=2",
          f"sample.prompt_schedule={SCHEDULE}"]
    assert load_config(TINY, ok).sample.prompt_schedule == SCHEDULE
    for change, needle in [("sample.window=null", "needs windowed sampling"),
                           ("sample.prompt_schedule=4: a | 2: b", "keyframes must increase"),
                           ("sample.prompt=a red ball", "takes the place of sample.prompt"),
                           ("sample.num_frames=5", "past the last frame")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(TINY, ok + [change])


def read_pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB"))
                     for p in sorted(folder.glob("*.png"))])


def test_cli_flag_end_to_end(tmp_path, capsys):
    args = ["--config", str(TINY), "--prompt-schedule", SCHEDULE, "--frames", "10", "--window",
            "4", "--window-overlap", "2", "--seed", "3", "--format", "png", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    written = Path(capsys.readouterr().out.strip())
    assert written.parent == tmp_path / "a" and written.name.startswith("0-a-red-circle")
    s = load_config(TINY).sample
    pipe = TextToVideo.from_config(load_config(TINY).model, seed=0)
    expected = pipe(prompt_schedule=SCHEDULE, num_frames=10, height=s.height, width=s.width,
                    steps=s.steps, seed=3, window=4, window_overlap=2,
                    progress=False).frames[0].numpy()
    assert np.array_equal(read_pngs(written), expected)
    sidecar = written.with_name(written.name + ".json")
    assert json.loads(sidecar.read_text())["config"]["sample"]["prompt_schedule"] == SCHEDULE
    # The sidecar reproduces the run.
    assert main(["--config", str(sidecar), "--format", "png", "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 0
    again = Path(capsys.readouterr().out.strip())
    assert np.array_equal(read_pngs(again), expected)


@pytest.mark.parametrize("args, needle", [
    (["--prompt-schedule", SCHEDULE], "needs windowed sampling"),
    (["--prompt-schedule", "0: a | 0: b", "--window", "8"], "frame 0 appears twice"),
    (["--prompt-schedule", "0 a", "--window", "8"], "has no 'FRAME:'"),
    (["--prompt-schedule", "0: a | 99: b", "--window", "8"], "keyframe 99 is past the last"),
    (["--prompt-schedule", SCHEDULE, "--window", "8", "--prompt", "a"], "takes the place of"),
])
def test_cli_bad_schedules_exit_2_with_one_line(tmp_path, capsys, args, needle):
    code = main(["--config", str(TINY), "--frames", "10", "--out", str(tmp_path / "v.mp4"),
                 "--no-progress", *args])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and needle in errors[0], errors
    assert not any(tmp_path.iterdir())


def test_window_colours_find_where_the_colour_changes():
    """The helper for measuring prompt travel on the demo model (t2v.demo.evaluate)."""
    from t2v.demo.classify import window_colours
    from t2v.training.synthetic import Attributes, render

    rng = np.random.default_rng(0)
    red = render(Attributes("red", "circle", "right", "black"), rng, num_frames=8)
    blue = render(Attributes("blue", "circle", "right", "black"), rng, num_frames=8)
    colours = window_colours(np.concatenate([red, blue]), window=4, stride=4)
    assert colours == ["red", "red", "blue", "blue"]
