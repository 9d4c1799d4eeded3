"""Writes that either complete or leave nothing behind (temp file, then rename)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from ..errors import InputError

__all__ = [
    "atomic_directory",
    "atomic_output",
    "check_folder",
    "compound_suffix",
    "new_partial",
    "remove_stale_partials",
]

PathLike = Union[str, "os.PathLike[str]"]
_COMPOUND = (".nii.gz", ".seg.nrrd", ".tar.gz")


def compound_suffix(path: PathLike) -> str:
    """The file-type suffix of ``path``, keeping double suffixes such as ``.nii.gz`` and ``.seg.nrrd``."""
    name = Path(path).name.lower()
    for suffix in _COMPOUND:
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def check_folder(target: Path) -> None:
    """Raise InputError unless ``target``'s folder exists (as a folder)."""
    if not target.parent.is_dir():
        what = "is a file, not a folder" if target.parent.exists() else "does not exist"
        raise InputError(f"cannot write {target}: folder {target.parent} {what}")


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise InputError(f"{target} already exists; choose another name or ask to overwrite it")
    check_folder(target)


def new_partial(target: Path, directory: bool = False) -> Path:
    """Create the temporary file (or folder) a write of ``target`` starts with, beside it (see
    :func:`remove_stale_partials` for its name); InputError when the folder takes no new files."""
    suffix = "" if directory else compound_suffix(target)
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    prefix, end = f".{stem}.{os.getpid()}.", f".partial{suffix}"
    try:
        if directory:
            return Path(tempfile.mkdtemp(prefix=prefix, suffix=end, dir=target.parent))
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=end, dir=target.parent)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise InputError(
            f"cannot write {target}: folder {target.parent} does not take new files ({reason}); choose another folder"
        ) from None
    os.close(fd)
    return Path(name)


def _default_mode(directory: bool) -> int:
    """The permissions a plain ``open``/``mkdir`` would give under the current umask (temp files get 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running (True when this cannot be told)."""
    try:
        import psutil
    except ImportError:
        return True
    return pid == os.getpid() or psutil.pid_exists(pid)


def remove_stale_partials(target: Path, suffix: str) -> None:
    """Remove temporary files or folders left beside ``target`` by writers that were killed.

    Temporary names carry the writer's process id (``.<name>.<pid>.<random>.partial<suffix>``),
    so only leftovers of processes that no longer run are removed.
    """
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    prefix = f".{stem}."
    try:
        candidates = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for path in candidates:
        pid, _, rest = path.name[len(prefix) :].partition(".")
        if not pid.isdigit() or not rest.endswith(f".partial{suffix}") or _pid_alive(int(pid)):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextmanager
def atomic_output(target: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``.

    The temporary name (hidden, with the writer's process id and ``.partial``) keeps
    ``target``'s suffix, so writers that choose the format from the extension still
    work. If the block raises (or is interrupted), the temporary file is removed and
    ``target`` is left as it was. A temporary file left by a writer that was killed is
    removed by the next write to the same ``target``.
    """
    target = Path(target)
    _check_target(target, overwrite)
    remove_stale_partials(target, compound_suffix(target))
    tmp = new_partial(target)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, _default_mode(directory=False))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(target: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` in one rename.

    With ``overwrite`` an existing ``target`` is moved aside first and deleted only
    after the new folder is in place. On failure the temporary folder is removed.
    """
    target = Path(target)
    _check_target(target, overwrite)
    remove_stale_partials(target, "")
    tmp = new_partial(target, directory=True)
    try:
        yield tmp
        for item in tmp.rglob("*"):
            if item.is_file():
                _fsync(item)
        os.chmod(tmp, _default_mode(directory=True))
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
