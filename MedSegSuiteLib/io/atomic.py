"""Writes that either complete or leave nothing behind (temp file, then rename)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, Union

from ..errors import InputError, MedSegSuiteError

__all__ = [
    "atomic_directory",
    "atomic_output",
    "atomic_outputs",
    "check_folder",
    "check_targets",
    "compound_suffix",
    "new_partial",
    "remove_stale_partials",
    "write_error",
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
        raise InputError(f"{target} already exists; choose another name or ask to overwrite it (--overwrite)")
    check_folder(target)


def check_targets(targets: Sequence[PathLike], overwrite: bool = False) -> None:
    """Before any work: raise InputError unless every target can be written (no existing file
    without ``overwrite``, an existing folder that takes new files, no target named twice)."""
    seen: set[Path] = set()
    for target in map(Path, targets):
        key = target.resolve()
        if key in seen:
            raise InputError(f"{target} is named for two outputs; give each output its own file")
        seen.add(key)
        _check_target(target, overwrite)
        if target.is_dir():
            raise InputError(f"cannot write {target}: it is a folder; name a file")
        probe = new_partial(target)
        probe.unlink(missing_ok=True)


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
    so only leftovers of processes that no longer run are removed. A writer that itself
    writes through a temporary of that temporary leaves ``..<name>.<pid>...`` names, which
    count too.
    """
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    prefix = f"{stem.lstrip('.')}."
    try:
        candidates = [
            p for p in target.parent.iterdir() if p.name.startswith(".") and p.name.lstrip(".").startswith(prefix)
        ]
    except OSError:
        return
    for path in candidates:
        pid, _, rest = path.name.lstrip(".")[len(prefix) :].partition(".")
        if not pid.isdigit() or not rest.endswith(f".partial{suffix}") or _pid_alive(int(pid)):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


_NO_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS, getattr(errno, "ENOTSUP", -1), errno.EOPNOTSUPP}
_HINTS = {
    errno.ENOSPC: "free some disk space or choose another folder",
    errno.EDQUOT: "free some space in your quota or choose another folder",
    errno.EFBIG: "choose a folder on a file system that takes large files",
    errno.EROFS: "the folder is read-only; choose a writable folder",
    errno.EACCES: "you may not write there; choose a folder you can write to",
    errno.EPERM: "you may not write there; choose a folder you can write to",
}


def write_error(target: PathLike, error: OSError) -> InputError:
    """The one-line InputError for an OSError met while writing ``target`` (disk full, read-only...)."""
    reason = error.strerror or str(error) or type(error).__name__
    hint = _HINTS.get(error.errno or 0, "check the folder and the free disk space, or choose another folder")
    return InputError(f"cannot write {target}: {reason}; {hint}")


def _finish(tmp: Path, target: Path) -> None:
    """Flush ``tmp`` to disk, refuse an empty one (a writer that failed silently) and give it the
    permissions a plain ``open`` would (``mkstemp`` creates 0600)."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    if tmp.stat().st_size == 0:
        raise InputError(
            f"cannot write {target}: nothing was written (is the disk full?); free some space or choose another folder"
        )
    os.chmod(tmp, _default_mode(directory=False))


def _exists_error(target: Path) -> InputError:
    return InputError(f"{target} already exists (perhaps written meanwhile by another command); pass --overwrite")


def _commit(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move ``tmp`` onto ``target``; without ``overwrite`` only if ``target`` does not exist at that
    moment (a hard link is created exclusively, so two writers racing cannot replace each other)."""
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise _exists_error(target) from None
    except OSError as error:
        if error.errno not in _NO_LINKS:
            raise
        if target.exists() or target.is_symlink():  # a file system without hard links: best effort
            raise _exists_error(target) from None
        os.replace(tmp, target)
    else:
        tmp.unlink()


@contextmanager
def atomic_outputs(targets: Sequence[PathLike], overwrite: bool = False) -> Iterator[list[Path]]:
    """Yield temporary paths beside ``targets``; after the block all are moved into place, or none is.

    Each temporary name (hidden, with the writer's process id and ``.partial``) keeps
    its target's suffix, so writers that choose the format from the extension still
    work. Existing targets are refused before anything is written unless
    ``overwrite``, and again at the moment of the move (another command may have
    written one meanwhile). If the block raises or is interrupted, or a move fails,
    temporaries and targets already moved are removed and replaced files restored.
    An OSError (disk full, read-only folder...) becomes a one-line InputError; an
    empty temporary file (a writer that failed silently) is refused. Files get the
    permissions a plain ``open`` gives. Temporaries left by a writer that was killed
    are removed by the next write to the same target.
    """
    paths = [Path(t) for t in targets]
    for target in paths:
        _check_target(target, overwrite)
    temps: list[Path] = []
    current = paths[0]  # the target an OSError is reported for
    try:
        for target in paths:
            remove_stale_partials(target, compound_suffix(target))
            temps.append(new_partial(target))
        yield temps
        for tmp, target in zip(temps, paths):
            current = target
            _finish(tmp, target)
        backups: list[tuple[Path, Path]] = []
        done: list[Path] = []
        try:
            for tmp, target in zip(temps, paths):
                current = target
                if overwrite and target.exists():
                    backup = target.with_name(f".{target.name}.old-{os.getpid()}")
                    os.replace(target, backup)
                    backups.append((target, backup))
                _commit(tmp, target, overwrite)
                done.append(target)
        except BaseException:
            for target in done:
                target.unlink(missing_ok=True)
            for target, backup in backups:
                os.replace(backup, target)
            raise
        for _, backup in backups:
            backup.unlink(missing_ok=True)
    except OSError as error:
        named = {str(tmp): target for tmp, target in zip(temps, paths)}
        raise write_error(named.get(str(error.filename), current), error) from None
    except InputError as error:
        message = str(error)
        for tmp, target in zip(temps, paths):
            message = message.replace(str(tmp), str(target))
        if message == str(error):
            raise
        raise InputError(message) from None
    except Exception as error:
        if isinstance(error, MedSegSuiteError) or not _disk_full(current.parent):
            raise
        raise write_error(current, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_output(target: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is moved onto ``target``.

    The single-file case of :func:`atomic_outputs` (same guarantees): ``target`` is
    left as it was when the block raises or is interrupted, the disk fills up or
    another command created ``target`` meanwhile (without ``overwrite``).
    """
    with atomic_outputs([target], overwrite=overwrite) as (tmp,):
        yield tmp


@contextmanager
def atomic_directory(target: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` in one rename.

    With ``overwrite`` an existing ``target`` is moved aside first and deleted only
    after the new folder is in place; without it, a ``target`` created meanwhile by
    another command is refused, not replaced. On failure (an OSError such as a full
    disk becomes a one-line InputError) the temporary folder is removed.
    """
    target = Path(target)
    _check_target(target, overwrite)
    remove_stale_partials(target, "")
    tmp = new_partial(target, directory=True)
    try:
        yield tmp
        for item in tmp.rglob("*"):
            if item.is_file():
                _finish(item, target / item.relative_to(tmp))
        os.chmod(tmp, _default_mode(directory=True))
        if overwrite and target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, target)  # fails on a non-empty folder or a file of that name
            except (FileExistsError, NotADirectoryError, IsADirectoryError):
                raise _exists_error(target) from None
            except OSError as error:
                if error.errno != errno.ENOTEMPTY:
                    raise
                raise _exists_error(target) from None
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(target, error) from None
    except BaseException as error:
        full = isinstance(error, Exception) and not isinstance(error, MedSegSuiteError) and _disk_full(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise write_error(target, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None
        raise


def _disk_full(folder: Path, margin: int = 1 << 20) -> bool:
    """Whether the file system holding ``folder`` has (almost) no room left: writers that report a full
    disk in their own words (torch.save, safetensors) are recognised by it."""
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    return stats.f_bavail * stats.f_frsize < margin
