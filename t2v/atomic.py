"""Writes that commit by rename: a temporary name beside the target, renamed onto it at the end.

Every file t2v writes (videos, weights folders, checkpoints, LoRA files, sidecars) goes through
`atomic_path` (or `atomic_paths` for outputs that belong together, such as a video and its
sidecar), so a crash leaves the old complete output or the new one, never a partial file under
the final name. What a kill at each moment leaves is listed in docs/reliability.md ("Writes").

- Temporaries are `.NAME.tmp-PID[SUFFIX]` (and, on the fallback path below, `.NAME.old-PID`)
  beside NAME. Before writing into a folder, those of processes that are no longer alive are
  removed (`remove_stale`); a live process's temporaries and every other name are left alone.
- Replacing a folder (`overwrite`) swaps the new folder and the old one in one system call
  (Linux renameat2 RENAME_EXCHANGE), so NAME always holds a complete folder. Where the call is
  unavailable (not Linux, old kernel or C library, a file system without it), the old folder is
  renamed aside and the new one renamed in: a kill between these two renames leaves NAME
  missing and the old folder at `.NAME.old-PID`, which the next write into that folder renames
  back. Files are replaced atomically by rename(2) everywhere.
- Committed files and folders get the modes the umask gives (0644 / 0755 under umask 022),
  whatever the writer chose (safetensors writes 0600).
- `_commit_step(step, target)` is called after every step of a commit: tests replace it to
  raise or kill the process at each point.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from safetensors import SafetensorError

from t2v.errors import UserError

AT_FDCWD = -100
RENAME_EXCHANGE = 2
# .NAME.tmp-PID[SUFFIX] or .NAME.old-PID; NAME may itself contain dots
IO_CAUSE = r"I/O error|IoError|os error \d+"  # safetensors' message around an OSError
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>[0-9]+)(?P<rest>.*)$")


def _commit_step(step: str, target: Path) -> None:
    """Called after each step of a commit ("ready", "companions-removed", "exchanged",
    "aside", "replaced", "committed"); does nothing. Tests replace it to raise or kill here."""


def temporary_name(target: Path, kind: str = "tmp") -> Path:
    """The temporary name of `target` for this process: `.NAME.tmp-PID.SUFFIX` (writers keep
    the suffix: some pick the format from it) or `.NAME.old-PID` (a folder set aside)."""
    suffix = target.suffix if kind == "tmp" else ""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}{suffix}")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id t2v writes: leave the name alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process (or no answer): treat as alive
    return True


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass  # another process cleaned it first


def remove_stale(folder: Path) -> list[Path]:
    """Remove the temporaries in `folder` left by processes that are no longer alive; a folder
    set aside by an interrupted fallback swap (`.NAME.old-PID` with NAME missing) is renamed
    back to NAME instead. Returns the names handled. Never raises: a write goes on regardless."""
    handled = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return handled
    for path in entries:
        match = TEMPORARY.match(path.name)
        if match is None:
            continue
        name, kind, rest = match["name"], match["kind"], match["rest"]
        if rest != (Path(name).suffix if kind == "tmp" else "") or _alive(int(match["pid"])):
            continue
        try:
            if kind == "old" and not os.path.lexists(path.with_name(name)):
                os.rename(path, path.with_name(name))
            else:
                _remove(path)
            handled.append(path)
        except OSError:
            continue
    return handled


def _umask() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
    os.umask(mask)
    return mask


def respect_umask(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the modes a newly created file or
    folder gets: 0666 / 0777 minus the umask."""
    mask = _umask()
    paths = [path]
    if path.is_dir() and not path.is_symlink():
        paths += [Path(root) / name for root, dirs, files in os.walk(path)
                  for name in dirs + files]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _load_renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` in one system call (Linux renameat2 RENAME_EXCHANGE). False if
    the system cannot (no such call, or the file system does not support it)."""
    if _renameat2 is None:
        return False
    if _renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _replace_folder(tmp: Path, target: Path) -> None:
    """Put the complete folder `tmp` at `target`, where a folder already is."""
    if exchange(tmp, target):  # target: the new folder; tmp: the old one, removed below
        _commit_step("exchanged", target)
        _remove(tmp)
        return
    # Fallback without an atomic exchange: two renames, with NAME missing in between (a kill
    # there leaves the old folder at .NAME.old-PID, which remove_stale renames back).
    old = temporary_name(target, "old")
    os.replace(target, old)
    try:
        _commit_step("aside", target)
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # put the old folder back
        raise
    try:
        _commit_step("replaced", target)
    finally:
        _remove(old)


def _commit(tmp: Path, target: Path, overwrite: bool) -> None:
    if overwrite and target.is_dir() and not target.is_symlink():
        _replace_folder(tmp, target)
    else:
        os.replace(tmp, target)  # atomic for a file; a folder onto no folder
    _commit_step("committed", target)


def _check(target: Path, overwrite: bool) -> None:
    if os.path.lexists(target) and not overwrite:
        raise UserError(f"{target}: already exists; pass --overwrite to replace it")


@contextmanager
def atomic_paths(targets: Sequence[Path], overwrite: bool = False) -> Iterator[list[Path]]:
    """Yield a temporary path beside each target; commit them all if the body succeeds, delete
    them otherwise. The first target is the main output, the others its companion FILES (a
    video's sidecar): the old companions are deleted before the main output is committed and
    the new ones committed after it, so a kill leaves the old outputs with their companions,
    the main output (old or new) without them, or the new outputs with theirs; never a new main
    output with an old companion."""
    targets = [Path(t) for t in targets]
    for target in targets:
        _check(target, overwrite)
    for folder in {target.parent for target in targets}:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale(folder)
    tmps = [temporary_name(target) for target in targets]
    try:
        yield tmps
        for tmp in tmps:
            respect_umask(tmp)
        _commit_step("ready", targets[0])
        main, *companions = targets
        if any(os.path.lexists(c) for c in companions):
            for companion in companions:
                if os.path.lexists(companion):
                    os.unlink(companion)
            _commit_step("companions-removed", main)
        for tmp, target in zip(tmps, targets):
            _commit(tmp, target, overwrite)
    finally:
        for tmp in tmps:
            if os.path.lexists(tmp):
                _remove(tmp)


@contextmanager
def atomic_path(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` if the body succeeds,
    delete it otherwise. A folder being replaced is swapped with the new one in one step where
    the system allows (see the module docstring), so a crash leaves the old or the new folder,
    never neither. Stale temporaries of dead processes in the folder are removed first."""
    with atomic_paths([target], overwrite) as (tmp,):
        yield tmp


def write_error(target: Path, exc: BaseException) -> UserError | None:
    """The one-line error for a write to `target` that failed with `exc` (an OSError such as a
    full disk, or safetensors' error around one); None if `exc` is not a write failure."""
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    elif isinstance(exc, SafetensorError) and re.search(IO_CAUSE, str(exc)):
        code = re.search(r"(?:os error|code:) (\d+)", str(exc))
        reason = os.strerror(int(code[1])) if code else str(exc)
    else:
        return None
    return UserError(f"{target}: cannot write ({reason})")
