"""Atomic outputs: each output is written to a temporary sibling and renamed into place.

A killed run never leaves a half-written file that a later run would take as complete. A folder
output is replaced in two renames: the previous folder to ``.<name>.old<pid>``, then the new one
(``.<name>.tmp<pid>.<random>``) into place; the previous one is then renamed ``.<name>.del<pid>``
and removed. A crash between the two renames leaves the output missing beside its previous copy:
``recover``, run before an output is written and when a reader finds one missing, puts that copy
back (the run that crashed did not finish, so the previous output is the one DVC recorded) and
removes what the interrupted swap left; it logs what it did.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import DataError

log = logging.getLogger(__name__)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _read_umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, at import, before any thread writes
    os.umask(mask)
    return mask


UMASK = _read_umask()
FILE_MODE, DIR_MODE = 0o666 & ~UMASK, 0o777 & ~UMASK  # what open() and mkdir() give under this umask


def _readable_like_any_output(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) at least the permissions any file written
    under this umask gets: some writers (safetensors, tempfile) create theirs 0600, which other users
    of a shared checkout (GPU workers) could not read. Links are left alone."""

    def widen(p: str, want: int) -> None:
        mode = os.lstat(p).st_mode
        if (mode & want) != want and not os.path.islink(p):
            os.chmod(p, (mode & 0o7777) | want)

    if not path.is_dir():
        widen(str(path), FILE_MODE)
        return
    widen(str(path), DIR_MODE)
    for folder, dirs, files in os.walk(path):
        for d in dirs:
            widen(os.path.join(folder, d), DIR_MODE)
        for f in files:
            widen(os.path.join(folder, f), FILE_MODE)


def _check_kind(path: Path, is_dir: bool) -> None:
    """A folder where a file output goes (or a file where a folder goes) is another output, or the
    user's: an error naming it, never removed."""
    if path.exists() and path.is_dir() != is_dir:
        there, goes = ("a folder", "a file") if path.is_dir() else ("a file", "a folder")
        raise DataError(
            f"{path}: {there} stands where this stage writes {goes} of that name; it was left as it "
            "is (another output with the same path?). Move it away, or delete it if nothing needs it, "
            "and run again."
        )


def _leftovers(path: Path) -> dict[str, dict[int, list[Path]]]:
    """What swaps of ``path`` left beside it: kind (old, del, tmp) -> pid -> paths."""
    found: dict[str, dict[int, list[Path]]] = {"old": {}, "del": {}, "tmp": {}}
    try:
        names = os.listdir(path.parent)
    except OSError:
        return found
    pattern = re.compile(re.escape(f".{path.name}.") + r"(old|del|tmp)(\d+)(\..+)?")
    for name in names:
        m = pattern.fullmatch(name)
        if m and (m[1] == "tmp") == bool(m[3]):  # tmp<pid>.<random>: a folder's; tmp<pid> alone: a file's, not a swap
            found[m[1]].setdefault(int(m[2]), []).append(path.parent / name)
    return found


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _recover_one(path: Path) -> bool:
    left = _leftovers(path)
    for pid, gone in left["del"].items():  # previous folders of finished swaps, their removal cut short
        for p in gone:
            log.warning(
                "%s: removing %s, the previous copy a finished swap (process %d) did not finish removing",
                path,
                p.name,
                pid,
            )
            _remove(p)
    restored = False
    for pid, olds in sorted(left["old"].items(), key=lambda kv: -max(p.stat().st_mtime for p in kv[1])):
        for old in olds:
            if not path.exists() and not path.is_symlink():
                os.replace(old, path)
                restored = True
                log.warning(
                    "%s: restored the previous copy from %s: replacing it was interrupted between its two "
                    "renames (process %d ended there); the run that wrote it did not finish, run it again",
                    path,
                    old.name,
                    pid,
                )
            else:
                log.warning(
                    "%s: removing %s, the previous copy an interrupted swap (process %d) left", path, old.name, pid
                )
                _remove(old)
        for tmp in left["tmp"].get(pid, []):  # that swap's new folder: its run did not finish
            log.warning("%s: removing %s, the unfinished new copy of an interrupted swap", path, tmp.name)
            _remove(tmp)
    return restored


def recover(path: str | os.PathLike) -> bool:
    """Undo what an interrupted replacement of ``path``, or of the folder output it lies in, left:
    the previous copy put back where the output is missing, leftovers removed (each logged).
    True when something was put back."""
    restored = False
    for p in (Path(path), *Path(path).parents):
        if p == p.parent:
            break
        restored |= _recover_one(p)
        if p.exists():
            break
    return restored


def _mkdtemp(path: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp{os.getpid()}.", dir=path.parent))


def _swap(tmp: Path, path: Path) -> None:
    """Replace the folder ``path`` by ``tmp``: either done, or the previous folder back in place."""
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    dead = path.with_name(f".{path.name}.del{os.getpid()}")
    _remove(dead)
    try:
        os.replace(old, dead)  # a name that says "garbage" before any of it is removed
    except FileNotFoundError:  # another process's recover() removed it
        return
    shutil.rmtree(dead, ignore_errors=True)


@contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``. A symlinked output
    is written where it points (the link stays). A full disk is a DataError naming the output; the
    earlier output stays as it was. What an interrupted earlier swap of ``path`` left is recovered
    first; a file where a folder output goes (or the reverse) is an error, not removed."""
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    _check_kind(path, is_dir)
    tmp = _mkdtemp(path) if is_dir else path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        _check_kind(path, is_dir)
        if tmp.exists():
            _readable_like_any_output(tmp)
        if is_dir and path.exists():
            _swap(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError as err:
        if err.errno in NO_SPACE:
            raise DataError(
                f"{path}: no space left on the device while writing it ({err.strerror}); the earlier "
                "version is intact. Free some space (or point the project at a larger disk) and "
                "run again."
            ) from None
        raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
