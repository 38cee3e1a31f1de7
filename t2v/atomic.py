"""Writes that commit by rename: a temporary name beside the target, renamed onto it at the end.

Every file t2v writes (videos, weights folders, checkpoints, LoRA files, sidecars) goes through
`atomic_path`, so a crash leaves the old complete output or the new one, never a partial file
under the final name.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from t2v.errors import UserError


@contextmanager
def atomic_path(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` if the body succeeds,
    delete it otherwise. A folder being replaced is renamed aside first and deleted only once
    the new one is in place, so a crash leaves the old or the new folder, never neither."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise UserError(f"{target}: already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}{target.suffix}")
    try:
        yield tmp
        if target.is_dir() and overwrite:
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
