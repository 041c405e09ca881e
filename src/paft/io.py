"""Atomic output writing, provenance (versions, seeds, input hashes)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Iterator

from paft.errors import PaftError


def cache_root() -> Path:
    """Converted models and reference log-prob caches live here (``$PAFT_CACHE``, else ``~/.cache/paft``)."""
    root = Path(os.environ.get("PAFT_CACHE", Path.home() / ".cache" / "paft"))
    for p in (root, *root.parents):  # the nearest existing part must be a folder, or every cache write fails later
        if p.exists():
            if not p.is_dir():
                where = "PAFT_CACHE" if "PAFT_CACHE" in os.environ else "the cache folder"
                raise PaftError(f"{where} {root}: {p} is a file, not a folder; point PAFT_CACHE at a folder "
                                "(unset: ~/.cache/paft)")
            break
    return root


def _disk_full(path: str | os.PathLike) -> PaftError:
    return PaftError(f"disk full writing {path}; free space and run the same command again (a run resumes "
                     "from its last complete checkpoint)")


def write_error(path: str | os.PathLike, exc: OSError) -> PaftError:
    """An OSError met while writing ``path`` as one line with the fix (disk full, read-only, a file in the way)."""
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return _disk_full(path)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PaftError(f"{path}: not writable ({exc.strerror}); fix the folder's permissions or choose another "
                         "--out")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return PaftError(f"{path}: a file is in the way of a folder ({exc.filename}); choose another --out")
    return PaftError(f"{path}: cannot write ({exc.strerror or exc})")


# what torch.save's RuntimeError ("PytorchStreamWriter failed writing file data/0: file write failed", or
# "unexpected pos N vs M") and safetensors' SafetensorError ("IoError(Os { code: 28, kind: StorageFull ...")
# say when the OSError underneath was a full disk; they keep no errno
_WRITE_FAILED = ("file write failed", "unexpected pos", "no space left", "storagefull", "quota")
LOW_FREE_BYTES = 64 << 20  # a disk with less free is taken as full when a library's write fails


def save_error(path: str | os.PathLike, exc: Exception, folder: str | os.PathLike) -> PaftError | None:
    """A failed save of ``path`` (under ``folder``) as one line with the fix; None when it is not a write failure
    (a bug: the caller re-raises it). Call it before removing the half-written files: they hold the space."""
    if isinstance(exc, OSError):
        return write_error(path, exc)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if any(m in str(exc).lower() for m in _WRITE_FAILED) or (free is not None and free < LOW_FREE_BYTES):
        return _disk_full(path)
    return None


def read_json(path: str | os.PathLike, fix: str) -> Any:
    """A JSON file paft wrote; damaged (cut short, edited, unreadable), one line naming it and ``fix``."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = (exc.strerror if isinstance(exc, OSError) else str(exc).splitlines()[0]) or type(exc).__name__
        raise PaftError(f"{path}: damaged or unreadable ({reason}); {fix}") from None


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), 0o666 & ~umask())  # mkstemp makes 0600; a plain open() would not
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temp file in the same folder and a rename."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _refuse_file(folder: Path) -> None:
    """An output folder's path must not name a file: paft never replaces one (it is not a paft output)."""
    if folder.exists() and not folder.is_dir():
        raise PaftError(f"{folder}: is a file, not a folder; choose another --out")


def check_output_dir(final: str | os.PathLike, force: bool = False) -> None:
    """``final`` can become an output folder: not a file (never replaced, --force or not: it is not a paft
    output), and absent unless ``force``. ``atomic_dir`` checks it; long jobs call it first, to fail before
    the work."""
    final = Path(final)
    _refuse_file(final)
    if output_exists(final) and not force:
        raise PaftError(f"{final}: output exists; pass --force to overwrite")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; rename it to ``final`` on success.

    Nothing half-written is ever visible at ``final``: a crash leaves only a
    ``.tmp-*`` folder, which is removed on the next attempt.
    """
    final = Path(final)
    check_output_dir(final, force)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    except OSError as exc:
        raise write_error(final, exc) from None
    try:
        try:
            yield tmp
        except OSError as exc:  # the caller's writes into tmp: disk full, and the like
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
                raise write_error(final, exc) from None
            raise
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; a plain mkdir() would not
        if final.exists():
            if (final / LOCK_NAME).is_file():  # the folder's lock moves with it (same inode: still held)
                os.replace(final / LOCK_NAME, tmp / LOCK_NAME)
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


LOCK_NAME = ".paft.lock"
_held: dict[tuple[int, int], IO[str]] = {}  # folders this process has locked -> the open lock file (the lock lives with it)


def lock_folder(folder: str | os.PathLike, command: str | None = None) -> Path:
    """Take an exclusive lock on an output folder (``FOLDER/.paft.lock``) for the life of this process.

    A second paft process on the same folder fails at once with one line naming the holder's PID. The
    lock is an ``flock``, released by the kernel when its holder exits however it ends, so a lock file
    left by a dead process is simply taken over (and rewritten). Re-entrant within a process; spawned
    workers do not inherit it.
    """
    folder = Path(folder)
    _refuse_file(folder)
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise write_error(folder, exc) from None
    st = os.fstat(fh.fileno())
    key = (st.st_dev, st.st_ino)  # the lock file itself, however the folder is spelled or renamed
    held = _held.get(key)
    if held is not None and os.fstat(held.fileno()).st_nlink:  # not a deleted lock file whose inode came back
        fh.close()
        return path
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "pid unknown"
        fh.close()
        raise PaftError(f"{folder}: in use by another paft process ({holder}); wait for it to end, "
                        "or choose another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}: {command or ' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}\n")
    fh.flush()
    _held[key] = fh
    return path


def unlock_folder(folder: str | os.PathLike) -> None:
    """Release a lock taken by ``lock_folder`` (process exit releases it too)."""
    try:
        st = os.stat(Path(folder) / LOCK_NAME)
    except OSError:
        return
    fh = _held.pop((st.st_dev, st.st_ino), None)
    if fh is not None:
        fh.close()


def output_exists(folder: str | os.PathLike) -> bool:
    """``folder`` exists and holds more than its lock file (``lock_folder`` creates the folder it locks)."""
    folder = Path(folder)
    if not folder.is_dir():
        return folder.exists()
    return any(p.name != LOCK_NAME for p in folder.iterdir())


@contextlib.contextmanager
def locked_output(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder``'s lock (``lock_folder``) while a command writes into it, then release it (unless this
    process held it already); a folder that the lock created and that is still empty at the end (the command
    failed first) is removed again."""
    folder = Path(folder)
    created, before = not folder.exists(), set(_held)
    st = os.stat(lock_folder(folder))
    key = (st.st_dev, st.st_ino)  # the lock file's inode, the same after an atomic_dir swap moved it
    try:
        yield folder
    finally:
        if key not in before and (fh := _held.pop(key, None)) is not None:
            fh.close()
        if created and not output_exists(folder):
            with contextlib.suppress(OSError):
                (folder / LOCK_NAME).unlink()
                folder.rmdir()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_PACKAGES = ("paft", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors",
             "bitsandbytes", "trl", "pydantic", "numpy")


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
