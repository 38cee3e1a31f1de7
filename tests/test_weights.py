"""Loading every layout, the restricted unpickler, the hub cache path and `weights_convert`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet3DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from helpers import assert_parity
from layouts import (DIFF_TEXT, DIFF_UNET, DIFF_VAE, MS_TEXT, MS_UNET, MS_VAE,
                     write_diffusers_folder, write_modelscope_folder)
from t2v.loading.checkpoint_io import WeightsError, read_pickle
from t2v.models.tokenizer import Tokenizer
from t2v.loading.weights import detect_layout, load_models
from weights_convert.__main__ import main as convert_main

IDS = Tokenizer()(["a cat playing the piano", ""])


def outputs(models, seed=0):
    """Text embedding, UNet output and VAE decode of fixed inputs."""
    g = torch.Generator().manual_seed(seed)
    cfg = models.config
    x = torch.randn(1, 4, 2, 8, 8, generator=g)
    context = torch.randn(1, 77, cfg.unet.context_dim, generator=g)
    z = torch.randn(1, 4, 4, 4, generator=g)
    with torch.no_grad():
        return (models.text_encoder(IDS), models.unet(x, 500, context), models.vae.decode(z)), \
            (x, context, z)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    ms = write_modelscope_folder(root / "modelscope")
    diff = write_diffusers_folder(root / "diffusers")
    return root, ms, diff


def test_modelscope_folder_loads_and_matches_the_original_classes(folders):
    root, (unet, vae, clip), _ = folders
    models = load_models(root / "modelscope")
    assert models.layout == "modelscope"
    assert (models.config.unet, models.config.vae, models.config.text_encoder) == \
        (MS_UNET, MS_VAE, MS_TEXT)
    (text, eps, image), (x, context, z) = outputs(models)
    with torch.no_grad():
        expected_eps = unet(x, torch.tensor([500]), context)
        expected_image = vae.decode(z)
        h = clip.token_embedding(IDS) + clip.positional_embedding
        for block in clip.transformer.resblocks[:-1]:
            h = block(h, attn_mask=clip.attn_mask)
        expected_text = clip.ln_final(h)
    assert_parity(eps, expected_eps, what="ModelScope folder: UNet")
    assert_parity(image, expected_image, what="ModelScope folder: VAE")
    assert_parity(text, expected_text, what="ModelScope folder: text encoder")


def test_diffusers_folder_loads_and_matches(folders):
    root, _, (text_model, unet, vae) = folders
    models = load_models(root / "diffusers")
    assert models.layout == "diffusers"
    assert (models.config.unet, models.config.vae, models.config.text_encoder) == \
        (DIFF_UNET, DIFF_VAE, DIFF_TEXT)
    (text, eps, image), (x, context, z) = outputs(models)
    with torch.no_grad():
        assert_parity(text, text_model(IDS).last_hidden_state, what="diffusers folder: text")
        assert_parity(eps, unet(x, 500, context).sample, what="diffusers folder: UNet")
        assert_parity(image, vae.decode(z).sample, what="diffusers folder: VAE")


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_diffusers_bin_files_and_variants(tmp_path, variant):
    text_model, unet, _ = write_diffusers_folder(tmp_path, safe=False, variant=variant)
    # transformers 5 always writes safetensors; write the older pickle name by hand.
    suffix = f".{variant}" if variant else ""
    for f in (tmp_path / "text_encoder").glob("model*.safetensors"):
        f.unlink()
    state = {f"text_model.{k}": v for k, v in text_model.state_dict().items()}
    if variant:
        state = {k: v.half() for k, v in state.items()}
    torch.save(state, tmp_path / "text_encoder" / f"pytorch_model{suffix}.bin")
    models = load_models(tmp_path, variant=variant)
    expected_dtype = torch.float16 if variant else torch.float32
    assert models.unet.conv_in.weight.dtype == expected_dtype
    assert models.text_encoder.final_layer_norm.weight.dtype == expected_dtype
    loaded = models.unet.state_dict()
    for name, p in unet.state_dict().items():
        assert torch.equal(loaded[name], p.to(expected_dtype)), name


def test_dtype_casts_while_loading(folders):
    root = folders[0]
    models = load_models(root / "diffusers", dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert models.unet.conv_in.weight.dtype == torch.bfloat16
    assert models.text_encoder.final_layer_norm.weight.dtype == torch.bfloat16
    assert models.vae.dtype == torch.float32


def test_native_round_trip_through_diffusers_is_bit_exact(folders, tmp_path):
    root = folders[0]
    native, diffusers_out, native2 = tmp_path / "n1", tmp_path / "d", tmp_path / "n2"
    assert convert_main([str(root / "modelscope"), str(native)]) == 0
    assert convert_main([str(native), str(diffusers_out), "--to", "diffusers"]) == 0
    assert convert_main([str(diffusers_out), str(native2)]) == 0
    assert detect_layout(native) == "native" and detect_layout(diffusers_out) == "diffusers"
    first, second = load_models(native), load_models(native2)
    assert first.config == second.config
    for name in ("text_encoder", "unet", "vae"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    manifest = json.loads((native / "manifest.json").read_text())
    assert manifest["source"]["layout"] == "modelscope"
    assert {f["path"] for f in manifest["source"]["files"]} >= {"text2video_pytorch_model.pth"}
    assert all(len(f["sha256"]) == 64 for f in manifest["source"]["files"])


def test_written_diffusers_folder_loads_in_diffusers_and_transformers(folders, tmp_path):
    root = folders[0]
    out = tmp_path / "d"
    assert convert_main([str(root / "diffusers"), str(out), "--to", "diffusers"]) == 0
    ours = load_models(root / "diffusers")
    unet = UNet3DConditionModel.from_pretrained(out / "unet").eval()
    text = CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    (t, eps, _), (x, context, _) = outputs(ours)
    with torch.no_grad():
        assert_parity(unet(x, 500, context).sample, eps, what="written folder: UNet")
        assert_parity(text(IDS).last_hidden_state, t, what="written folder: text")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")

    def hf_ids(prompts):
        return tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids

    prompts = ["a cat playing the piano", "", "An astronaut, riding a horse."]
    assert torch.equal(hf_ids(prompts), Tokenizer()(prompts))
    # SD 2's tokenizer files make "!" the pad token, so transformers splits every "!" out as
    # id 0 where open_clip (and ModelScope) has "!</w>" = 256: the hub's diffusers tokenizer
    # differs from the original on such prompts. t2v follows open_clip.
    assert hf_ids(["wow!"])[0, 2].item() == 0 and Tokenizer()(["wow!"])[0, 2].item() == 256


def test_fp16_conversion(folders, tmp_path):
    out = tmp_path / "half"
    assert convert_main([str(folders[0] / "diffusers"), str(out), "--dtype", "fp16"]) == 0
    models = load_models(out)
    assert models.unet.conv_in.weight.dtype == torch.float16


def test_hub_id_resolves_from_local_cache_offline(folders, tmp_path, monkeypatch):
    """A hub repo id found in the standard cache layout, with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-t2v"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folders[0] / "diffusers", repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    models = load_models("someone/tiny-t2v")
    assert models.layout == "diffusers" and models.folder.name == commit
    with pytest.raises(WeightsError, match="not in the local Hugging Face cache"):
        load_models("someone/not-there")
    # A typo'd local path of the owner/name shape: the error says it is no local folder.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match=r"runs/modle: no local folder .*runs/modle, and as a "
                                           r"hub repo id"):
        load_models("runs/modle")


@pytest.mark.parametrize("variant, wanted, unwanted", [
    (None, "unet/diffusion_pytorch_model.safetensors",
     "unet/diffusion_pytorch_model.fp16.safetensors"),
    ("fp16", "unet/diffusion_pytorch_model.fp16.safetensors",
     "unet/diffusion_pytorch_model.safetensors"),
])
def test_hub_patterns_fetch_one_precision_and_format(variant, wanted, unwanted):
    from fnmatch import fnmatch

    from t2v.loading.weights import _hub_patterns
    patterns = _hub_patterns(variant)

    def fetched(name):
        return any(fnmatch(name, p) for p in patterns)

    suffix = f".{variant}" if variant else ""
    assert fetched(wanted) and fetched(f"text_encoder/model{suffix}.safetensors")
    assert fetched("unet/config.json") and fetched("tokenizer/merges.txt")
    assert not fetched(unwanted) and not fetched("unet/diffusion_pytorch_model.bin")
    assert not fetched(f"text_encoder/pytorch_model{suffix}.bin")


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    path = tmp_path / "text2video_pytorch_model.pth"
    torch.save({"conv_in.weight": torch.zeros(1), "x": Payload()}, path)
    for lightning in (False, True):
        with pytest.raises(WeightsError, match="refused to unpickle.*exec"):
            read_pickle(path, lightning=lightning)
    assert not marker.exists()


@pytest.mark.parametrize("content", [bytes(range(256)) * 8, b"\x80\x02garbage", b""])
def test_corrupt_pickle_never_advises_turning_the_restriction_off(tmp_path, content):
    """Random bytes used to surface torch's advice to re-run with weights_only=False."""
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as info:
        read_pickle(path)
    message = str(info.value)
    assert "corrupt or not a PyTorch checkpoint" in message and "weights_only" not in message
    assert len(message.splitlines()) == 1


def test_lightning_checkpoint_loads_without_lightning_installed(folders):
    checkpoint = read_pickle(folders[0] / "modelscope" / "VQGAN_autoencoder.pth", lightning=True)
    assert checkpoint["epoch"] == 6 and int(checkpoint["global_step"]) == 70000
    assert any(k.startswith("first_stage_model.") for k in checkpoint["state_dict"])
    with pytest.raises(WeightsError, match="pytorch_lightning"):
        read_pickle(folders[0] / "modelscope" / "VQGAN_autoencoder.pth", lightning=False)


def run_cli(*args):
    """The real command, in a child process: exit code and stderr lines."""
    result = subprocess.run([sys.executable, "-m", "weights_convert", *map(str, args)],
                            capture_output=True, text=True)
    return result.returncode, result.stderr.strip().splitlines()


@pytest.fixture
def cli(capsys):
    """The command's main() in this process (fast): exit code and stderr lines."""
    def run(*args):
        code = convert_main([str(a) for a in args])
        return code, capsys.readouterr().err.strip().splitlines()
    return run


def assert_clean_failure(out: Path, code: int, lines: list[str], needle: str):
    assert code == 2, lines
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], lines
    assert not any("Traceback" in line for line in lines)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_cli_bad_inputs(folders, tmp_path, cli):
    root = folders[0]
    out = tmp_path / "out"
    # unknown layout
    (tmp_path / "empty").mkdir()
    assert_clean_failure(out, *cli(tmp_path / "empty", out), "no known weights layout")
    # missing file
    broken = tmp_path / "missing"
    shutil.copytree(root / "modelscope", broken)
    (broken / "VQGAN_autoencoder.pth").unlink()
    assert_clean_failure(out, *cli(broken, out), "VQGAN_autoencoder.pth: file not found")
    # truncated safetensors
    truncated = tmp_path / "truncated"
    shutil.copytree(root / "diffusers", truncated)
    weights = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_clean_failure(out, *cli(truncated, out), "not a readable safetensors file")
    # wrong shapes: a config that does not match the weights
    wrong = tmp_path / "wrong"
    shutil.copytree(root / "diffusers", wrong)
    config = json.loads((wrong / "unet" / "config.json").read_text())
    config["block_out_channels"] = [32, 64, 64, 128]
    (wrong / "unet" / "config.json").write_text(json.dumps(config))
    assert_clean_failure(out, *cli(wrong, out), "wrong shapes")


def test_cli_malicious_pickle(folders, tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil"
    shutil.copytree(folders[0] / "modelscope", evil)
    target = evil / "text2video_pytorch_model.pth"
    code = ("import torch\n"
            "class P:\n"
            "    def __reduce__(self):\n"
            f"        return (exec, (\"open({str(marker)!r}, 'w')\",))\n"
            f"torch.save({{'a': P()}}, {str(target)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    out = tmp_path / "out"
    assert_clean_failure(out, *run_cli(evil, out), "refused to unpickle")
    assert not marker.exists()


def test_cli_refuses_to_overwrite_without_force(folders, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, lines = cli(folders[0] / "diffusers", out)
    assert code == 2 and any("already exists" in line and "--force" in line for line in lines)
    assert (out / "keep.txt").read_text() == "mine"
    code, _ = cli(folders[0] / "diffusers", out, "--force")
    assert code == 0 and not (out / "keep.txt").exists() and detect_layout(out) == "native"


@pytest.mark.parametrize("error", ["safetensors", "oserror"])
def test_cli_full_disk_is_one_line_and_leaves_nothing(folders, tmp_path, cli, monkeypatch, error):
    """ENOSPC while writing (safetensors' error around it, or a plain OSError): exit 2 with one
    line, no traceback, nothing at OUT and no temporary; with --force the old OUT stays."""
    import errno
    import os

    import weights_convert.__main__ as convert
    from safetensors import SafetensorError

    def full_disk(folder, *args):
        (folder / "unet.safetensors").write_bytes(b"partial")
        if error == "safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  f"(os error 28) at path \"{folder}/.tmpab12\"")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(convert, "save_native", full_disk)
    out = tmp_path / "out"
    assert_clean_failure(out, *cli(folders[0] / "diffusers", out), "No space left on device")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, lines = cli(folders[0] / "diffusers", out, "--force")
    assert code == 2 and lines[-1] == f"error: {out}: cannot write (No space left on device)"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_replacing_a_folder_keeps_the_old_one_until_the_new_one_is_complete(tmp_path):
    from t2v.atomic import atomic_path

    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target, overwrite=True) as tmp:
            tmp.mkdir()
            (tmp / "new.txt").write_text("new")
            assert (target / "old.txt").read_text() == "old"  # untouched while writing
            raise RuntimeError("crash while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "old.txt").read_text() == "old"
    with atomic_path(target, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing left aside


def test_save_native_writes_its_config_last(tmp_path, monkeypatch):
    """A folder whose writing stopped part way is not taken for a native checkpoint."""
    import weights_convert.native
    from t2v.config import ModelConfig
    from t2v.loading.weights import save_native

    calls = []

    def failing_save_file(tensors, path, metadata=None):
        calls.append(path)
        if path.endswith("vae.safetensors"):
            raise OSError(28, "No space left on device")
        Path(path).write_bytes(b"")

    monkeypatch.setattr(weights_convert.native, "save_file", failing_save_file)
    states = {name: {} for name in ("text_encoder", "unet", "vae")}
    with pytest.raises(OSError):
        save_native(tmp_path, ModelConfig(), states)
    assert len(calls) == 3 and not (tmp_path / "model.yaml").exists()


def test_removed_unet_options_load_when_off_and_are_refused_when_on(tmp_path):
    """Native folders written before `model.unet.frame_embedding` was removed name it (false)
    in model.yaml and in unet.safetensors' metadata, as the shipped demo model's metadata
    still does: such folders load; one with the option on is a one-line UserError."""
    from safetensors.torch import load_file, save_file

    from t2v.errors import UserError
    from t2v.loading.checkpoint_io import safetensors_metadata
    from t2v.loading.weights import DEMO_FOLDER

    old = tmp_path / "old"
    shutil.copytree(DEMO_FOLDER, old)
    assert '"frame_embedding": false' in safetensors_metadata(old / "unet.safetensors")[
        "t2v_config"]
    text = (old / "model.yaml").read_text()
    assert "frame_embedding" not in text
    (old / "model.yaml").write_text(text.replace("  temporal_position_embedding: false\n",
                                                 "  temporal_position_embedding: false\n"
                                                 "  frame_embedding: false\n"))
    assert "frame_embedding: false" in (old / "model.yaml").read_text()
    loaded, shipped = load_models(old), load_models(DEMO_FOLDER)
    assert loaded.config == shipped.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(),
                                                 shipped.unet.state_dict().values()))

    (old / "model.yaml").write_text(text.replace("  temporal_position_embedding: false\n",
                                                 "  temporal_position_embedding: false\n"
                                                 "  frame_embedding: true\n"))
    with pytest.raises(UserError, match="unet.frame_embedding is True, but t2v removed") as err:
        load_models(old)
    assert "\n" not in str(err.value)
    (old / "model.yaml").write_text(text)  # only the metadata says it is on
    metadata = safetensors_metadata(old / "unet.safetensors")
    stored = json.loads(metadata["t2v_config"])
    metadata["t2v_config"] = json.dumps({**stored, "frame_embedding": True})
    save_file(load_file(old / "unet.safetensors"), old / "unet.safetensors", metadata=metadata)
    with pytest.raises(UserError, match="metadata: unet.frame_embedding is True"):
        load_models(old)
