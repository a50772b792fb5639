"""The one place for each way a command touches the disk: reading a text file a user gave,
writing an output atomically, checking a directory is writable, locking a run directory or a
dataset, loading a checkpoint. Every failure there ends as one UserError line.
"""
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from errors import UserError, first_line


def read_text(path: Path, what: str = "file") -> str:
    """A UTF-8 text file's content, or a UserError that says why not. The one place that
    reads a text file a user may have given or damaged (a checkpoint or an HDF5 file passed
    as a config, a Latin-1 file, a directory, a file that is gone)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a {what}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not a UTF-8 text {what} (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                        "give a YAML text file (save it as UTF-8)") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or first_line(e)}") from None


@contextmanager
def atomic_write(path: Path, mode: str = "wb"):
    """Write `path` through a temporary file beside it that replaces it only once the block
    has finished: a crash, a kill or a full disk leaves the previous file whole (and no
    half-written temporary behind, except after kill -9, which the next write overwrites)."""
    path = Path(path)
    if path.exists() and not path.is_file():  # never replace a directory or a device (--plot /dev/null)
        raise UserError(f"{path} exists and is not a regular file; give another path")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_writable_dir(path: Path, what: str = "output directory") -> Path:
    """Create `path` (and its parents) if needed and check that files can be written there,
    before any work whose result would go there."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{what} {path}: a file is in the way (it or a parent is a file, not a "
                        "directory); move it or choose another path") from None
    except OSError as e:
        raise UserError(f"cannot create {what} {path}: {e.strerror or first_line(e)}") from None
    if not path.is_dir():
        raise UserError(f"{what} {path} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {what} {path}: {e.strerror or first_line(e)}; "
                        "choose another directory or fix its permissions") from None
    return path


def check_output_path(path: Path, what: str = "output file") -> Path:
    """Check, before any work, that `path` can be written at the end: its folder can be created
    and written to, and it is not a folder, a device or a read-only file."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise UserError(f"{what} {path} exists and is not a regular file; give another path")
    ensure_writable_dir(path.parent, f"the folder of {what} {path.name}")
    check_writable_file(path, what, "give another path or fix its permissions")
    return path


def check_writable_file(path: Path, what: str, fix: str):
    """A file that exists but cannot be written (read-only), found before any work."""
    path = Path(path)
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what} {path} is read-only; {fix}")


@contextmanager
def locked(path: Path, what: str):
    """Hold an exclusive lock on the file `path` (created if missing) during the block, or
    refuse at once with a UserError naming the holder, so that two processes never write
    one run directory or dataset. The kernel releases a flock lock when its holder dies,
    even by kill -9, so a lock file left behind never blocks; the file is removed on exit."""
    import fcntl
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            raise UserError(f"{what} is in use by another process ({holder}); wait for it to finish "
                            "or stop it, then rerun") from None
        try:  # the previous holder removes the file on exit: make sure ours is still the one on disk
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:200]}".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def claim_run_dir(run_dir: Path, create: bool = True, job: str = "training"):
    """The one check of a run directory before work: it exists (or is created), is writable,
    and no other process does the same job there; held for the block. Jobs that write
    different files (training; an evaluation per output tag) may run side by side."""
    run_dir = Path(run_dir)
    if not create and not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory of a training run")
    ensure_writable_dir(run_dir, "run directory")
    name = ".lock" if job == "training" else f".{job.replace(' ', '_')}.lock"
    with locked(run_dir / name, f"run directory {run_dir} ({job})"):
        yield run_dir


def load_checkpoint(path: Path, map_location, need: tuple = ("model",)) -> dict:
    """A checkpoint written by train.py, or a UserError for any file that is not one: empty,
    truncated, a bare tensor or another object, a dict without the expected entries."""
    import torch
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever fails to load is not a usable checkpoint
        raise UserError(f"cannot load {path} ({first_line(e)}): the file is damaged or not a checkpoint "
                        "of this toolkit; move it away (train.py then starts over)") from None
    missing = [k for k in need if k not in state] if isinstance(state, dict) else list(need)
    if missing:
        got = f"a dict without {missing}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise UserError(f"{path} is not a checkpoint of this toolkit (it holds {got}); move it away "
                        "(train.py then starts over)")
    return state
