"""python -m t2v.sample end to end with the tiny config (random weights, offline)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import free_port
from t2v.cli.flags import flag_of
from t2v.pipeline.options import Config, load_config, option_fields
from t2v.pipeline.text_to_video import TextToVideo
from t2v.cli.sample import build_parser, main
from t2v.pipeline.video_io import probe, read_video, rgb_to_yuv420p, write_gif, write_mp4

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
# Codec tolerance, as luma PSNR: H.264 (crf 18) keeps luma at ~38 dB on the noise-like frames of
# random weights, while yuv420p's 2x2 chroma subsampling alone caps RGB PSNR near 25 dB on
# them. Frames of another seed score ~18 dB, so a wrong frame, order or size fails.
MIN_LUMA_PSNR_DB = 32.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def luma_psnr(a: np.ndarray, b: np.ndarray) -> float:
    weights = np.array([0.299, 0.587, 0.114])  # BT.601 luma
    return psnr(a.astype(np.float64) @ weights, b.astype(np.float64) @ weights)


@pytest.fixture
def cli(capsys):
    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()
    return run


def expected_frames(seed: int, **overrides) -> np.ndarray:
    cfg = load_config(TINY)
    s = cfg.sample
    pipe = TextToVideo.from_config(cfg.model, seed=0)
    kwargs = dict(num_frames=s.num_frames, height=s.height, width=s.width, steps=s.steps,
                  seed=seed, progress=False)
    kwargs.update(overrides)
    return pipe("a red ball", **kwargs).frames[0].numpy()


def test_mp4_end_to_end(cli, tmp_path, caplog):
    out = tmp_path / "ball.mp4"
    code, stdout, _ = cli("--config", TINY, "--prompt", "a red ball", "--seed", 3,
                          "--out", out, "--no-progress")
    assert code == 0 and stdout == [str(out)]
    assert "RANDOM weights" in caplog.text  # logged (stderr outside pytest)
    info = probe(out)
    cfg = load_config(TINY).sample
    assert (info["codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    assert (info["frames"], info["width"], info["height"], info["fps"]) == \
        (cfg.num_frames, cfg.width, cfg.height, cfg.fps)
    assert json.loads(info["comment"])["seed"] == 3
    with open(out, "rb") as f:
        head = f.read(64)
    assert b"moov" in head  # +faststart: the index comes right after ftyp, before the data
    decoded, fps = read_video(out)
    assert luma_psnr(decoded, expected_frames(3)) >= MIN_LUMA_PSNR_DB
    assert not list(tmp_path.glob(".*tmp*"))


def test_same_frames_give_the_same_files(tmp_path):
    """20 encodes of the same frames: one MP4 hash and one GIF hash (x264 runs one thread;
    with its automatic frame threads 60 encodes gave 5 different files)."""
    frames = np.random.default_rng(0).integers(0, 256, (16, 64, 96, 3), dtype=np.uint8)
    mp4s = {hashlib.sha256(write_mp4(frames, tmp_path / f"{i}.mp4", 8, {"seed": 1}).read_bytes())
            .hexdigest() for i in range(20)}
    gifs = {hashlib.sha256(write_gif(frames, tmp_path / f"{i}.gif", 8).read_bytes()).hexdigest()
            for i in range(20)}
    assert len(mp4s) == 1 and len(gifs) == 1


def test_sidecar_reproduces_the_same_bytes(tmp_path):
    """`--config VIDEO.json` makes the same MP4 and GIF, byte for byte, as a user runs it: two
    processes. (MP4 needs the RGB -> YUV conversion done by t2v: swscale's, inside the encoder,
    gave different files from one process to the next for the same frames.)"""
    def command(*args):
        return subprocess.run([sys.executable, "-m", "t2v.sample", *map(str, args)],
                              capture_output=True, text=True, timeout=300)

    for fmt in ("mp4", "gif"):
        first, second = tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"
        assert command("--config", TINY, "--prompt", "a red ball", "--out", first,
                       "--no-progress", "sample.steps=2").returncode == 0
        assert command("--config", first.with_name(first.name + ".json"), "--out", second,
                       "--no-progress").returncode == 0
        assert first.read_bytes() == second.read_bytes(), fmt


def test_rgb_to_yuv420p_is_bt601_limited_range():
    """Black, white and the primaries land on BT.601's limited-range codes; a 2x2 block's
    chroma is that of its mean colour."""
    colours = {(0, 0, 0): (16, 128, 128), (255, 255, 255): (235, 128, 128),
               (255, 0, 0): (81, 90, 240), (0, 255, 0): (145, 54, 34),
               (0, 0, 255): (41, 240, 110)}
    for rgb, (y, cb, cr) in colours.items():
        planes = rgb_to_yuv420p(np.full((2, 2, 3), rgb, dtype=np.uint8))
        assert planes.shape == (3, 2)
        assert (planes[:2] == y).all() and planes[2, 0] == cb and planes[2, 1] == cr, rgb


def test_sidecar_reproduces_the_run(cli, tmp_path):
    """Exact on PNG frames."""
    first, second = tmp_path / "a", tmp_path / "b"
    assert cli("--config", TINY, "--prompt", "a red ball", "--out", first, "--format", "png",
               "--no-progress", "sample.steps=3")[0] == 0
    (sidecar_path,) = first.glob("*.json")
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["config"]["sample"]["steps"] == 3
    seed = sidecar["config"]["sample"]["seed"]
    assert isinstance(seed, int) and sidecar["weights"]["layout"] == "random"
    assert cli("--config", sidecar_path, "--out", second, "--format", "png",
               "--no-progress")[0] == 0
    frames_a = sorted(p.read_bytes() for p in first.glob("*/*.png"))
    frames_b = sorted(p.read_bytes() for p in second.glob("*/*.png"))
    assert len(frames_a) == 4 and frames_a == frames_b


def test_gif_and_png_outputs(cli, tmp_path):
    gif = tmp_path / "ball.gif"
    assert cli("--config", TINY, "--prompt", "a red ball", "--seed", 3, "--out", gif,
               "--no-progress")[0] == 0
    code, stdout, _ = cli("--config", TINY, "--prompt", "a red ball", "--seed", 3, "--out",
                          tmp_path / "frames", "--format", "png", "--no-progress")
    png = Path(stdout[0])
    assert code == 0 and png.parent == tmp_path / "frames" and png.is_dir()
    expected = expected_frames(3)
    pngs = sorted(png.glob("*.png"))
    assert len(pngs) == len(expected)
    from PIL import Image
    assert all(np.array_equal(np.asarray(Image.open(p).convert("RGB")), f)
               for p, f in zip(pngs, expected))
    gif_frames, _ = read_video(gif)
    assert gif_frames.shape == expected.shape
    assert luma_psnr(gif_frames, expected) >= 25.0  # a 256-colour palette per frame


def test_real_weights_from_a_diffusers_folder(cli, tmp_path):
    """The non-random path: --weights loads a folder (here tiny diffusers weights) and its
    config replaces the config file's model section."""
    from layouts import DIFF_UNET, write_diffusers_folder
    write_diffusers_folder(tmp_path / "weights")
    out = tmp_path / "v.mp4"
    code, stdout, _ = cli("--config", TINY, "--weights", tmp_path / "weights", "--prompt",
                          "a red ball", "--seed", 2, "--out", out, "--no-progress")
    assert code == 0 and stdout == [str(out)]
    sidecar = json.loads((tmp_path / "v.mp4.json").read_text())
    assert sidecar["weights"]["layout"] == "diffusers"
    assert tuple(sidecar["config"]["model"]["unet"]["channels"]) == DIFF_UNET.channels
    assert probe(out)["frames"] == load_config(TINY).sample.num_frames


def test_200_frames_make_a_25_second_mp4(cli, tmp_path):
    out = tmp_path / "long.mp4"
    code, _, _ = cli("--config", TINY, "--prompt", "a long ride", "--frames", 200, "--window",
                     16, "--steps", 2, "--seed", 1, "--out", out, "--no-progress")
    assert code == 0
    info = probe(out)
    assert (info["frames"], info["fps"]) == (200, 8.0)
    import av
    with av.open(str(out)) as container:
        assert container.duration / 1e6 == pytest.approx(25.0, abs=0.01)


def test_prompts_file_and_defaults(cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red ball\n\na blue cube\n")
    code, stdout, _ = cli("--config", TINY, "--prompts-file", prompts, "--seed", 10, "--out",
                          tmp_path / "videos", "--no-progress")
    assert code == 0
    assert [Path(p).name for p in stdout] == ["0-a-red-ball-10.mp4", "1-a-blue-cube-11.mp4"]


def test_video_to_video_from_a_file(cli, tmp_path):
    source = tmp_path / "in.mp4"
    rng = np.random.default_rng(0)
    write_mp4(rng.integers(0, 255, (4, 72, 80, 3), dtype=np.uint8), source, fps=8)
    out = tmp_path / "out.mp4"
    code, _, _ = cli("--config", TINY, "--prompt", "a red ball", "--init-video", source,
                     "--strength", 0.5, "--seed", 1, "--out", out, "--no-progress")
    assert code == 0
    info = probe(out)
    assert (info["frames"], info["width"], info["height"]) == (4, 64, 64)  # resized to config


@pytest.mark.parametrize("args, needle", [
    (["--config", "nope.yaml"], "config file not found"),
    (["sample.stepz=3"], "sample.stepz"),
    (["--height", "100"], "sample.height must be a positive multiple of 8"),
    (["--frames", "0"], "sample.num_frames must be >= 1"),
    (["--steps", "-2"], "sample.steps must be >= 1"),
    (["--sampler", "heun"], "invalid choice"),
    (["--init-video", "missing.mp4"], "missing.mp4: video file not found"),
    (["--out", "x.avi"], "unknown extension"),
])
def test_bad_inputs_exit_2_with_one_line(cli, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    argv = ["--config", TINY, "--prompt", "a red ball", "--out", "v.mp4", *args]
    if args[0] == "--out":
        argv = ["--config", TINY, "--prompt", "a red ball", *args]
    code, stdout, stderr = cli(*argv)
    errors = [line for line in stderr if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and needle in errors[0], stderr
    assert stdout == [] and not any(tmp_path.iterdir())


def test_unwritable_outputs_fail_before_loading_with_one_line(cli, tmp_path, monkeypatch):
    """A file where a folder should be: exit 2, one line, nothing written, and no model built
    (failed after the whole generation, with a traceback, before the check)."""
    blocker = tmp_path / "existing_file"
    blocker.write_text("x")
    built = []
    monkeypatch.setattr(TextToVideo, "from_config",
                        classmethod(lambda cls, *a, **k: built.append(1)))
    code, stdout, stderr = cli("--config", TINY, "--prompt", "x", "--out",
                               blocker / "v.mp4", "--no-progress")
    assert code == 2 and len(stderr) == 1 and "is a file, not a folder" in stderr[0], stderr
    assert built == [] and stdout == [] and sorted(tmp_path.iterdir()) == [blocker]


def test_write_errors_become_one_line(cli, tmp_path, monkeypatch):
    import t2v.cli.sample

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(t2v.cli.sample, "write_mp4", refuse)
    code, _, stderr = cli("--config", TINY, "--prompt", "x", "--out", tmp_path / "v.mp4",
                          "--no-progress")
    assert code == 2 and stderr[-1].startswith("error:") and "Permission denied" in stderr[-1]
    assert not any(tmp_path.iterdir())


def test_prompt_with_equals_sign_is_not_an_override(cli, tmp_path):
    """"E=mc2" in --prompt / --negative-prompt is text; positional key=value still overrides."""
    out = tmp_path / "e.mp4"
    code, stdout, stderr = cli("--config", TINY, "--prompt", "E=mc2 on a chalkboard",
                               "--negative-prompt", "a=b", "--seed", 1, "--out", out,
                               "--no-progress", "sample.steps=2")
    assert code == 0, stderr
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["config"]["sample"]["prompt"] == "E=mc2 on a chalkboard"
    assert sidecar["config"]["sample"]["negative_prompt"] == "a=b"
    assert sidecar["config"]["sample"]["steps"] == 2


def test_unreadable_init_video_and_existing_output(cli, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    code, _, stderr = cli("--config", TINY, "--prompt", "x", "--init-video", bad, "--out",
                          tmp_path / "o.mp4")
    assert code == 2 and "cannot read the video" in stderr[-1]
    existing = tmp_path / "o.mp4"
    existing.write_bytes(b"keep")
    code, _, stderr = cli("--config", TINY, "--prompt", "x", "--out", existing)
    assert code == 2 and "already exists" in stderr[-1] and existing.read_bytes() == b"keep"
    assert not (tmp_path / "o.mp4.json").exists()


def test_real_process_exit_codes_and_help(tmp_path):
    result = subprocess.run([sys.executable, "-m", "t2v.sample", "--config", TINY, "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "(default: 4)" in result.stdout  # tiny's 4 frames
    result = subprocess.run([sys.executable, "-m", "t2v.sample", "--config", TINY, "--prompt",
                             "x", "--height", "30"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:")


@pytest.mark.slow
def test_torchrun_splits_prompts_across_processes(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na blue cube\na green cone\n")
    out = tmp_path / "videos"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), "-m", "t2v.sample", "--config", TINY, "--prompts-file",
         str(prompts), "--seed", "5", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    videos = sorted(p.name for p in out.glob("*.mp4"))
    assert videos == ["0-a-red-ball-5.mp4", "1-a-blue-cube-6.mp4", "2-a-green-cone-7.mp4"]
    assert len(list(out.glob("*.mp4.json"))) == 3
    assert all(probe(out / v)["frames"] == 4 for v in videos)


@pytest.mark.parametrize("flags, overrides", [
    (["--freeu"], {"freeu": (1.2, 1.4, 0.9, 0.2)}),
    (["--freeu", "1.5", "1.6", "0.9", "0.2", "--guidance-rescale", "0.7"],
     {"freeu": (1.5, 1.6, 0.9, 0.2), "guidance_rescale": 0.7}),
    (["--guidance-interval", "500", "999"], {"guidance_interval": (500.0, 999.0)}),
    (["--free-init", "2", "--free-init-method", "gaussian", "--free-init-fast"],
     {"free_init": {"num_iters": 2, "method": "gaussian", "use_fast_sampling": True}}),
])
def test_sampling_tool_flags(cli, tmp_path, flags, overrides):
    """The CLI flags reach the pipeline: PNG frames equal the Python call's, and the sidecar
    records the tools."""
    out = tmp_path / "v"
    code, stdout, err = cli("--config", TINY, "--prompt", "a red ball", "--seed", 5, "--out",
                            out, "--format", "png", "--no-progress", *flags)
    assert code == 0, err
    from PIL import Image

    frames = Path(stdout[0])
    written = np.stack([np.asarray(Image.open(p).convert("RGB"))
                        for p in sorted(frames.glob("*.png"))])
    assert np.array_equal(written, expected_frames(5, **overrides))
    assert not np.array_equal(written, expected_frames(5))
    (sidecar,) = out.glob("*.json")
    recorded = json.loads(sidecar.read_text())["config"]["sample"]
    for key, value in overrides.items():
        expected = value if not isinstance(value, dict) else {**recorded[key], **value}
        assert recorded[key] == (list(value) if isinstance(value, tuple) else expected), key


def test_sampling_tool_flags_bad_values(cli, tmp_path):
    code, _, err = cli("--config", TINY, "--freeu", "1.2", "1.4", "--out", tmp_path / "x.mp4")
    assert code == 2 and len(err) == 1 and "sample.freeu must be null or 4 numbers" in err[0]
    code, _, err = cli("--config", TINY, "--guidance-rescale", "2", "--out", tmp_path / "x.mp4")
    assert code == 2 and "guidance_rescale must be between 0 and 1" in err[0]
    code, _, err = cli("--config", TINY, "--guidance-interval", "900", "100", "--out",
                       tmp_path / "x.mp4")
    assert code == 2 and len(err) == 1 and "sample.guidance_interval must be null" in err[0]
    assert not list(tmp_path.iterdir())


def test_init_image_and_continue_from_flags(cli, tmp_path):
    """--init-image reads and resizes the image; --continue-from continues a written video:
    the new clip's first frames come back near the input's last frames (within the codec and
    the VAE round trip), and errors are one line."""
    from PIL import Image

    first = tmp_path / "first.mp4"
    assert cli("--config", TINY, "--prompt", "a red ball", "--seed", 1, "--out", first,
               "--no-progress")[0] == 0
    following = tmp_path / "next"
    code, stdout, err = cli("--config", TINY, "--prompt", "a red ball", "--seed", 2, "--out",
                            following, "--format", "png", "--no-progress", "--continue-from",
                            first, "--continue-frames", 2)
    assert code == 0, err
    written = sorted(Path(stdout[0]).glob("*.png"))
    source, _ = read_video(first)
    new = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in written])
    video = torch.from_numpy(source).permute(0, 3, 1, 2)[None]  # (1, F, 3, H, W) uint8
    expected = expected_frames(2, continue_from=video, continue_frames=2)
    assert np.abs(new.astype(int) - expected).max() <= 1  # float rounding of the resize only
    assert not np.array_equal(expected, expected_frames(2))
    image = tmp_path / "start.png"
    Image.fromarray(source[0]).resize((48, 40)).save(image)  # resized to the config's size
    code, _, err = cli("--config", TINY, "--prompt", "a red ball", "--seed", 2, "--out",
                       tmp_path / "img.mp4", "--no-progress", "--init-image", image,
                       "--init-frames", 2, "--init-weights", "1,0.5")
    assert code == 0, err
    code, _, err = cli("--config", TINY, "--prompt", "a", "--init-image",
                       tmp_path / "missing.png", "--out",
                       tmp_path / "x.mp4")
    assert code == 2 and len(err) == 1 and "missing.png: not found" in err[0]
    code, _, err = cli("--config", TINY, "--init-image", image, "--continue-from", first,
                       "--out", tmp_path / "x.mp4")
    assert code == 2 and "give one, not both" in err[0]
    assert not (tmp_path / "x.mp4").exists()


def test_every_option_has_a_flag_and_a_docs_row():
    """The flags are derived from GenerationOptions: one per field, and docs/cli.md lists each
    (a new option that is not documented fails here)."""
    parser = build_parser(Config())
    flags = {flag for action in parser._actions for flag in action.option_strings}
    docs = (ROOT / "docs" / "cli.md").read_text()
    for name, field in option_fields():
        flag = flag_of(name, field)
        assert flag in flags, f"{name}: no flag {flag}"
        assert f"`{flag}" in docs, f"docs/cli.md has no row for {flag} ({name})"


def test_a_truncated_prompt_is_reported(cli, tmp_path, caplog):
    """A prompt past the context is cut, and the run says so (a warning line on stderr)."""
    long = "a red ball bouncing on a wooden floor " * 12  # > 77 tokens
    assert cli("--config", TINY, "--prompt", long, "--out", tmp_path / "v.mp4", "--no-progress",
               "sample.steps=1")[0] == 0
    assert "warning: prompt 0: the prompt is" in caplog.text and "tokens are dropped" in \
        caplog.text
