"""t2v.atomic: what a crash or a kill -9 at each commit point leaves on disk, stale temporaries of
dead processes, file modes (docs/reliability.md, "Writes")."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import t2v.atomic as atomic
from t2v.atomic import atomic_path, atomic_paths, remove_stale
from t2v.cli.sample import write_outputs
from t2v.pipeline.options import load_config
from t2v.pipeline.text_to_video import TextToVideo
from t2v.pipeline.video_io import probe

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")

# A child that replaces FOLDER with a new three-file folder and kills itself (SIGKILL) at the
# commit step named KILL_AT; it prints every step it passes. NO_EXCHANGE=1: the fallback swap.
SWAP_CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import t2v.atomic as atomic
    folder, kill_at, no_exchange = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    if no_exchange:
        atomic._renameat2 = None
    def step(name, target):
        print(name, flush=True)
        if name == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    atomic._commit_step = step
    with atomic.atomic_path(folder, overwrite=True) as tmp:
        tmp.mkdir()
        for i in range(3):
            (tmp / f"{i}.bin").write_text("new")
""")


class Crash(Exception):
    pass


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def contents(folder: Path) -> str | None:
    """'old' or 'new' if `folder` is a complete folder of that run, None if it is missing."""
    if not folder.exists():
        return None
    files = {p.name: p.read_text() for p in folder.iterdir()}
    assert sorted(files) == ["0.bin", "1.bin", "2.bin"] and len(set(files.values())) == 1, files
    return next(iter(files.values()))


def old_folder(parent: Path) -> Path:
    folder = parent / "model"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.bin").write_text("old")
    return folder


def run_swap(folder: Path, kill_at: str, no_exchange: bool) -> tuple[int, list[str]]:
    result = subprocess.run([sys.executable, "-c", SWAP_CHILD, str(folder), kill_at,
                             "1" if no_exchange else "0"], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return result.returncode, result.stdout.split()


def test_the_folder_swap_is_one_exchange_on_this_system(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    if not atomic.exchange(a, b):
        pytest.skip("no renameat2 RENAME_EXCHANGE here: the fallback swap is used")
    assert (b / "x").read_text() == "a" and not (a / "x").exists()


@pytest.mark.parametrize("no_exchange", [False, True], ids=["exchange", "fallback"])
def test_a_kill_at_each_step_of_a_folder_swap(tmp_path, no_exchange):
    """kill -9 at every commit step of `--force`: with the exchange, the folder is at every
    moment the old complete one or the new one; with the fallback, a kill between the two
    renames leaves it missing until the next write into the parent folder puts it back."""
    if not no_exchange and atomic._renameat2 is None:
        pytest.skip("no renameat2 here")
    code, steps = run_swap(old_folder(tmp_path / "dry"), "none", no_exchange)
    assert code == 0 and steps[-1] == "committed", steps
    assert ("exchanged" in steps) != no_exchange, steps
    for step in steps:
        parent = tmp_path / step
        folder = old_folder(parent)
        code, passed = run_swap(folder, step, no_exchange)
        assert code == -signal.SIGKILL and passed[-1] == step
        left = contents(folder)
        if no_exchange and step == "aside":
            assert left is None  # the one moment the fallback cannot avoid
        else:
            assert left == ("old" if step == "ready" else "new"), step
        with atomic_path(parent / "other.txt") as tmp:  # the next write into the folder
            tmp.write_text("x")
        assert contents(folder) in ("old", "new")
        assert sorted(p.name for p in parent.iterdir()) == ["model", "other.txt"], step


@pytest.mark.parametrize("is_folder", [False, True], ids=["file", "folder"])
@pytest.mark.parametrize("no_exchange", [False, True], ids=["exchange", "fallback"])
def test_an_error_at_each_commit_step_leaves_old_or_new_and_no_temporaries(
        tmp_path, monkeypatch, is_folder, no_exchange):
    if no_exchange:
        monkeypatch.setattr(atomic, "_renameat2", None)
    target = tmp_path / ("model" if is_folder else "weights.safetensors")

    def write(run: str) -> None:
        with atomic_path(target, overwrite=True) as tmp:
            if is_folder:
                tmp.mkdir()
                (tmp / "a.txt").write_text(run)
            else:
                tmp.write_text(run)

    def read() -> str:
        return (target / "a.txt" if is_folder else target).read_text()

    steps = []
    write("old")
    monkeypatch.setattr(atomic, "_commit_step", lambda step, t: steps.append(step))
    write("new")
    for step in steps:
        write("old")

        def crash(name, t, step=step):
            if name == step:
                raise Crash(name)
        monkeypatch.setattr(atomic, "_commit_step", crash)
        with pytest.raises(Crash):
            write("new")
        monkeypatch.setattr(atomic, "_commit_step", lambda name, t: None)
        assert read() == ("old" if step in ("ready", "aside") else "new"), step
        assert [p.name for p in tmp_path.iterdir()] == [target.name], step


def test_stale_temporaries_of_dead_processes_are_removed_before_a_write(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    names = {  # name -> kept?
        f".a.mp4.tmp-{dead}.mp4": False, f".a.mp4.json.tmp-{dead}.json": False,
        f".step-000010.tmp-{dead}": False, f".model.tmp-{dead}": False,
        f".model.old-{dead}": False,  # model exists: the old copy goes
        f".b.mp4.tmp-{alive}.mp4": True, f".model.tmp-{os.getpid()}": True,  # live processes
        f".a.mp4.tmp-{dead}.gif": True, f"a.mp4.tmp-{dead}.mp4": True,  # not t2v's pattern
        f".notes.tmp-x{dead}": True, f".c.old-{dead}.txt": True, "keep.txt": True,
        "model": True,
    }
    for name in names:
        if name.startswith((".step", ".model", "model")):
            (tmp_path / name).mkdir()
            (tmp_path / name / "weights.bin").write_bytes(b"w")
        else:
            (tmp_path / name).write_bytes(b"x")
    (tmp_path / f".gone.old-{dead}").mkdir()  # a folder set aside by a killed fallback swap
    (tmp_path / f".gone.old-{dead}" / "a.txt").write_text("old")
    with atomic_path(tmp_path / "video.mp4") as tmp:
        tmp.write_bytes(b"v")
    expected = {name for name, kept in names.items() if kept} | {"video.mp4", "gone"}
    assert {p.name for p in tmp_path.iterdir()} == expected
    assert (tmp_path / "gone" / "a.txt").read_text() == "old"
    assert (tmp_path / "model" / "weights.bin").exists()
    assert remove_stale(tmp_path) == []


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_committed_files_respect_the_umask(tmp_path, mask):
    previous = os.umask(mask)
    try:
        with atomic_path(tmp_path / "lora.safetensors") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp))  # safetensors creates it 0600
        with atomic_path(tmp_path / "model") as tmp:
            tmp.mkdir()
            (tmp / "sub").mkdir()
            save_file({"a": torch.zeros(2)}, str(tmp / "sub" / "unet.safetensors"))
            (tmp / "model.yaml").write_text("x")
    finally:
        os.umask(previous)

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)
    assert mode(tmp_path / "lora.safetensors") == 0o666 & ~mask
    assert mode(tmp_path / "model" / "sub" / "unet.safetensors") == 0o666 & ~mask
    assert mode(tmp_path / "model" / "model.yaml") == 0o666 & ~mask
    assert mode(tmp_path / "model") == mode(tmp_path / "model" / "sub") == 0o777 & ~mask


def test_companions_are_never_paired_with_another_main_output(tmp_path, monkeypatch):
    main, side = tmp_path / "v.mp4", tmp_path / "v.mp4.json"

    def write(run: str) -> None:
        with atomic_paths([main, side], overwrite=True) as (a, b):
            a.write_text(run)
            b.write_text(run)

    steps = []
    write("old")
    monkeypatch.setattr(atomic, "_commit_step", lambda step, t: steps.append((step, t.name)))
    write("new")
    assert steps == [("ready", "v.mp4"), ("companions-removed", "v.mp4"),
                     ("committed", "v.mp4"), ("committed", "v.mp4.json")]
    for point in steps:
        write("old")

        def crash(name, t, point=point):
            if (name, t.name) == point:
                raise Crash(name)
        monkeypatch.setattr(atomic, "_commit_step", crash)
        with pytest.raises(Crash):
            write("new")
        monkeypatch.setattr(atomic, "_commit_step", lambda name, t: None)
        assert not side.exists() or side.read_text() == main.read_text(), point
        assert sorted(p.name for p in tmp_path.iterdir()) <= ["v.mp4", "v.mp4.json"]


@pytest.fixture(scope="module")
def tiny_pipe():
    cfg = load_config(TINY)
    return cfg, TextToVideo.from_config(cfg.model, seed=0)


@pytest.mark.parametrize("fmt", ["mp4", "png"])
def test_sample_overwrite_keeps_each_video_with_its_own_sidecar(tmp_path, monkeypatch, tiny_pipe,
                                                                fmt):
    """`t2v.sample --overwrite` interrupted at each commit point: the sidecar beside the video
    is the video's own (told apart by the frame count), or there is none."""
    cfg, pipe = tiny_pipe
    path = tmp_path / f"v.{fmt}"
    sidecar = path.with_name(path.name + ".json")
    shape = (1, cfg.model.vae.latent_channels, 0, cfg.sample.height // 8, cfg.sample.width // 8)

    def write(frames: int) -> None:
        latents = torch.zeros(shape[:2] + (frames,) + shape[3:])
        write_outputs(pipe, latents, cfg, path, fmt, {"frames": frames}, True, False)

    def frames_in_video() -> int:
        return probe(path)["frames"] if fmt == "mp4" else len(list(path.iterdir()))

    points = []
    write(2)
    monkeypatch.setattr(atomic, "_commit_step", lambda step, t: points.append((step, t.name)))
    write(3)
    assert ("committed", path.name) in points and ("committed", sidecar.name) in points
    for point in points:
        monkeypatch.setattr(atomic, "_commit_step", lambda name, t: None)
        write(2)

        def crash(name, t, point=point):
            if (name, t.name) == point:
                raise Crash(name)
        monkeypatch.setattr(atomic, "_commit_step", crash)
        with pytest.raises(Crash):
            write(3)
        assert frames_in_video() in (2, 3), point
        if sidecar.exists():
            assert json.loads(sidecar.read_text())["frames"] == frames_in_video(), point
        assert sorted(p.name for p in tmp_path.iterdir()) <= sorted([path.name, sidecar.name])
