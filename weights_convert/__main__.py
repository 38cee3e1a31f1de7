"""python -m weights_convert SRC OUT: convert text-to-video weights between layouts.

    python -m weights_convert ./modelscope-damo-text-to-video-synthesis ./ms17b-native
    python -m weights_convert ali-vilab/text-to-video-ms-1.7b ./ms17b-fp16 --dtype fp16
    python -m weights_convert ./ms17b-native ./ms17b-diffusers --to diffusers

SRC is a local folder or a hub repo id in any layout t2v loads (native, diffusers,
ModelScope); OUT is written atomically (a temporary folder renamed at the end; nothing is left
at OUT on failure) and never overwritten without --force. Exit codes: 0 done, 2 bad input or
a failed write such as a full disk (one line), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from t2v import __version__
from t2v.atomic import atomic_path, write_error
from t2v.errors import UserError
from t2v.loading.weights import read_checkpoint, resolve_source, save_native
from t2v.models.text_encoder import TextEncoder
from t2v.models.unet import UNet3D
from t2v.models.vae import AutoencoderKL
from weights_convert.diffusers import save_diffusers
from weights_convert.table import check_shapes

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m weights_convert",
        description="Convert text-to-video-ms-1.7b-family weights between layouts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("src", help="source folder or hub repo id (owner/name)")
    parser.add_argument("out", type=Path, help="output folder (must not exist unless --force)")
    parser.add_argument("--from", dest="source_layout", default="auto",
                        choices=["auto", "modelscope", "diffusers", "native"],
                        help="layout of SRC; auto detects it from the files")
    parser.add_argument("--to", dest="target_layout", default="native",
                        choices=["native", "diffusers"], help="layout to write")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="cast floating-point weights (default: keep the stored dtype)")
    parser.add_argument("--revision", default=None, help="hub revision of SRC")
    parser.add_argument("--variant", default=None, help="diffusers weights variant, e.g. fp16")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    return parser.parse_args(argv)


def convert_folder(args: argparse.Namespace, log: logging.Logger) -> None:
    out = args.out.resolve()
    if out.exists() and not args.force:
        raise UserError(f"{args.out}: already exists; pass --force to replace it")
    source = resolve_source(args.src, args.revision, args.variant)
    forced = None if args.source_layout == "auto" else args.source_layout
    layout, cfg, states = read_checkpoint(source, args.variant, forced)
    log.info("read %s (%s layout)", source, layout)

    factories = {"text_encoder": lambda: TextEncoder(cfg.text_encoder),
                 "unet": lambda: UNet3D(cfg.unet), "vae": lambda: AutoencoderKL(cfg.vae)}
    for name, factory in factories.items():  # strict accounting before anything is written
        with torch.device("meta"):
            expected = {k: v.shape for k, v in factory().state_dict().items()}
        check_shapes(states[name], expected, f"{args.src}: {name}")

    def progress(name: str, tensors: int, size: int) -> None:
        log.info("%s: %d tensors, %.1f MB written", name, tensors, size / 1e6)

    source_files = sorted(p for p in source.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(source).parts))
    origin = {"location": str(args.src), "revision": args.revision, "layout": layout,
              "files": [{"path": str(p.relative_to(source)), "bytes": p.stat().st_size,
                         "sha256": sha256(p)} for p in source_files]}
    try:
        manifest = write_folder(args, out, origin, cfg, states, progress)
    except (OSError, SafetensorError) as exc:  # a full disk, no permission, ...: one line
        error = write_error(args.out, exc)
        if error is None:
            raise
        raise error from None
    total = sum(f["bytes"] for f in manifest["files"])
    log.info("wrote %s (%s layout, %.1f MB)", out, args.target_layout, total / 1e6)


def write_folder(args: argparse.Namespace, out: Path, origin: dict, cfg, states,
                 progress) -> dict:
    """Write OUT atomically (the weights, then manifest.json, `origin` as its source);
    returns the manifest."""
    with atomic_path(out, overwrite=args.force) as tmp:
        tmp.mkdir()
        dtype = DTYPES[args.dtype] if args.dtype else None
        writer = save_native if args.target_layout == "native" else save_diffusers
        written = writer(tmp, cfg, states, dtype, progress)
        manifest = {
            "tool": "weights_convert", "t2v_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "layout": args.target_layout, "dtype": args.dtype or "as stored",
            "source": origin,
            "files": [{"path": str(p.relative_to(tmp)), "bytes": p.stat().st_size}
                      for p in written],
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    log = logging.getLogger("weights_convert")
    args = parse_args(argv)
    try:
        convert_folder(args, log)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
