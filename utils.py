"""Shared plumbing: config files, user errors, seeding, devices, paths, and the one place
for each way a script touches the disk (reading a text file, writing an output, locking a
run directory or dataset, loading a checkpoint) so that every failure there is one line.

Configs are YAML files merged left to right (later wins); a file may `include:` another
(path relative to the including file). `--set key=value` overrides come last. The merged
dict is checked against `config/schema.py` and filled with defaults, so what a script
saves next to its output is the whole resolved config.
"""
import argparse
import difflib
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml

from config.schema import COLLECTION_KEYS, SCHEMA, applies


class UserError(Exception):
    """A problem with what the user asked for; scripts print it in one line and exit 2."""


class ConfigError(UserError):
    pass


# ----------------------------------------------------------------------------- configs

def first_line(e: BaseException) -> str:
    """An exception's message as one short line; its type when it has none (EOFError())."""
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


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


def read_yaml_mapping(path: Path, what: str = "config file") -> dict:
    """A YAML file holding a mapping of names to values (empty file: {}), or a ConfigError."""
    text = read_text(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', None) or first_line(e)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of key: value, got {type(data).__name__}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{path}: config keys must be names, got {bad_keys!r}")
    return data


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    path = Path(path)
    if path.resolve() in seen:
        raise ConfigError(f"{path}: include cycle ({' -> '.join(str(p) for p in seen)})")
    try:
        data = read_yaml_mapping(path)
    except UserError as e:  # every config problem is a ConfigError
        raise ConfigError(str(e)) from None
    merged = {}
    include = data.pop("include", None)
    includes = [include] if isinstance(include, str) else (include or [])
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: include must be a file path or a list of file paths, got {include!r}")
    for inc in includes:
        merged.update(_read_yaml(path.parent / inc, seen + (path.resolve(),)))
    merged.update(data)
    return merged


def parse_set(items: list[str]) -> dict:
    """`--set a=1 b=x` -> {'a': 1, 'b': 'x'}; values are parsed as YAML scalars."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set n_stream=4")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); "
                              "quote it or fix it") from None
    return out


def _coerce(key: str, value, origin: str):
    spec = SCHEMA[key]
    allowed = spec.type.__name__
    bad = ConfigError(f"{key}={value!r} ({origin}): expected {allowed}" +
                      (f", one of {list(spec.allowed())}" if spec.allowed() else ""))
    if spec.type is bool:
        if not isinstance(value, bool):
            raise bad
    elif spec.type is int:
        # YAML reads 1e5 as a string and 1.0e5 as a float; accept both when integral
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, float):
            if not value.is_integer():
                raise bad
            value = int(value)
        if not isinstance(value, int):
            raise bad
    elif spec.type is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):  # YAML reads 3e-4 as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        value = float(value)
    elif spec.type is str:
        if isinstance(value, (bool, dict, list)) or value is None:
            raise bad
        value = str(value)
    if spec.allowed() and value not in spec.allowed():
        raise bad
    if spec.min is not None and value < spec.min:
        raise ConfigError(f"{key}={value} ({origin}): must be >= {spec.min}")
    if spec.max is not None and value > spec.max:
        raise ConfigError(f"{key}={value} ({origin}): must be <= {spec.max}")
    return value


def _check_known(key: str, origin: str):
    if key not in SCHEMA:
        close = difflib.get_close_matches(key, SCHEMA, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see --help for the list of keys"
        raise ConfigError(f"unknown config key '{key}' ({origin}){hint}")


def load_config(paths: list, overrides: dict | None = None) -> dict:
    """Merge config files and overrides, validate, fill defaults. Raises ConfigError."""
    import env  # noqa: F401 - here, not at the top (they import utils): family and variant
    import model  # noqa: F401   modules declare their own keys (add_keys) when imported
    cfg, origin = {}, {}
    for path in paths:
        for key, value in _read_yaml(Path(path)).items():
            _check_known(key, str(path))
            cfg[key], origin[key] = value, str(path)
    for key, value in (overrides or {}).items():
        _check_known(key, "--set")
        cfg[key], origin[key] = value, "--set"
    resolved = {}
    for key, spec in SCHEMA.items():
        resolved[key] = _coerce(key, cfg[key], origin[key]) if key in cfg else spec.default
    check_combinations(resolved)
    return resolved


def check_combinations(cfg: dict):
    """Combinations of individually valid values that cannot work together."""
    from model import variant_of  # here, not at the top: the model package imports utils
    import env  # likewise: family modules import utils
    variant_of(cfg).check_config(cfg)
    env.family(cfg).check_config(cfg)
    if env.state_cardinalities(cfg) is None and not variant_of(cfg).accepts_vector_states(cfg):
        what = "model=AD with use_compressed_context=true" if cfg["use_compressed_context"] else f"model={cfg['model']}"
        raise ConfigError(f"{what} builds tokens with one number per state, and env={cfg['env']} has a continuous "
                          "(Box) state; use model=AD with use_compressed_context=false")
    if cfg["tf_n_embd"] % cfg["tf_n_head"]:
        raise ConfigError(f"tf_n_embd={cfg['tf_n_embd']} must be divisible by tf_n_head={cfg['tf_n_head']}")
    if (cfg["tf_n_embd"] // cfg["tf_n_head"]) % 2:
        raise ConfigError(f"tf_n_embd / tf_n_head = {cfg['tf_n_embd'] // cfg['tf_n_head']} must be even "
                          "(rotary position embedding rotates pairs of channels)")
    check_learners(cfg)
    check_split(cfg)


def check_learners(cfg: dict):
    """A PPO learner's rollout is n_steps x its streams; its minibatches must tile it."""
    learners = cfg["learners_per_task"]
    if cfg["n_stream"] % learners:
        raise ConfigError(f"learners_per_task={learners} must divide n_stream={cfg['n_stream']} "
                          "(each learner gets the same number of streams)")
    if learners > 1 and cfg["backend"] != "batched":
        raise ConfigError(f"learners_per_task={learners} needs backend=batched (the sb3 backend trains one "
                          "learner per task); set backend=batched or learners_per_task=1")
    streams = cfg["n_stream"] // learners
    rollout = (f"n_steps x n_stream = {cfg['n_steps'] * streams}" if learners == 1 else
               f"n_steps x n_stream / learners_per_task = {cfg['n_steps'] * streams}")
    if cfg["batch_size"] > cfg["n_steps"] * streams:
        raise ConfigError(f"batch_size={cfg['batch_size']} is larger than one rollout ({rollout})")
    if cfg["n_steps"] * streams % cfg["batch_size"]:
        raise ConfigError(f"batch_size={cfg['batch_size']} must divide a rollout ({rollout}) so every "
                          "minibatch has the same size")


def check_split(cfg: dict):
    """Training needs a training task and evaluation a held-out one; a ratio of 0 or 1, or a
    tiny grid, can leave a part empty, which would fail (or average to NaN) much later."""
    import env as envs  # here, not at the top: env imports nothing from utils, keep it so
    split = envs.task_split(cfg)
    setting = (f"train_env_ratio={cfg['train_env_ratio']}, val_env_ratio={cfg['val_env_ratio']} with "
               f"{len(split)} tasks (grid_size={cfg['grid_size']})")
    if "train" not in split:
        raise ConfigError(f"{setting} leaves no training task; raise train_env_ratio or lower val_env_ratio")
    if "test" not in split:
        raise ConfigError(f"{setting} leaves no held-out test task; lower train_env_ratio")


def collection_keys(cfg: dict) -> list[str]:
    """The keys that define cfg's data: the common ones and its family's own (not another family's)."""
    return [k for k in COLLECTION_KEYS if applies(k, cfg)]


def collection_config(cfg: dict) -> dict:
    return {k: cfg[k] for k in collection_keys(cfg)}


def config_help() -> str:
    import env  # noqa: F401 - the family and variant modules' own keys (add_keys) first
    import model  # noqa: F401
    lines, section = [], None
    sections = list(dict.fromkeys(spec.section for spec in SCHEMA.values()))
    for key, spec in sorted(SCHEMA.items(), key=lambda item: sections.index(item[1].section)):  # stable
        if spec.section != section:
            section = spec.section
            lines.append(f"\n{section} keys:")
        choices = f" {{{','.join(spec.allowed())}}}" if spec.allowed() else ""
        lines.append(f"  {key} ({spec.type.__name__}{choices}, default {spec.default!r}): {spec.help}")
    return "\n".join(lines)


def config_arg_parser(description: str, config_files_help: str = "YAML config files, merged left to right") \
        -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, epilog="config keys (set in YAML files or with --set):" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help=config_files_help)
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set n_stream=4 device=cpu")
    return parser


def save_config(cfg: dict, path: Path):
    with atomic_write(path, "w") as f:
        f.write(yaml.safe_dump(cfg, sort_keys=False))


# ----------------------------------------------------------------------------- outputs

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


# ----------------------------------------------------------------------------- memory

def available_memory(device) -> int:
    """Free host memory in bytes, and the smaller of it and free GPU memory on CUDA."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        host = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if getattr(device, "type", device) == "cuda":
        import torch
        return min(host, torch.cuda.mem_get_info(device)[0])
    return host


def check_memory(what: str, parts: dict, device, hint: str):
    """Refuse up front a size whose estimated memory (bytes by part) exceeds what is free:
    otherwise it runs until the allocator or the kernel's OOM killer stops it, or it swaps."""
    need, have = sum(parts.values()), available_memory(device)
    if need > have:
        gb = lambda b: f"{b / 1e9:,.1f} GB"  # noqa: E731
        detail = ", ".join(f"{k} {gb(v)}" for k, v in parts.items())
        raise UserError(f"{what} needs about {gb(need)} of memory ({detail}) but {gb(have)} is free; {hint}")


# ----------------------------------------------------------------------------- processes

def exit_with_parent():
    """Call first in a worker process: exit as soon as the parent process is gone. A parent
    killed with kill -9 runs no cleanup, and an orphaned worker would go on computing and
    holding its memory for minutes. The sentinel is a pipe that closes when the parent dies."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


# ----------------------------------------------------------------------------- running

def _terminated(signum, frame):
    raise KeyboardInterrupt  # `kill` stops as cleanly as Ctrl-C: locks released, workers stopped


def run_cli(main):
    """Run a script's main(); user errors become one line on stderr and exit code 2."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the disk or the system failed (full disk, I/O error); writes are atomic
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or first_line(e)}{where}; finished work is saved, fix the cause and "
              "rerun the same command", file=sys.stderr)
        sys.exit(2)
    except MemoryError:
        print("error: out of memory; finished work is saved, rerun with smaller sizes", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished work is saved, rerun the same command to continue", file=sys.stderr)
        sys.exit(130)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    import torch
    torch.manual_seed(seed)


def pick_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use --set device=cpu or auto")
    return torch.device(name)


def dataset_path(cfg: dict) -> Path:
    return Path(cfg["dataset_dir"]) / f"history_{cfg['env']}_{cfg['alg']}_alg-seed{cfg['alg_seed']}.hdf5"


def run_name(cfg: dict) -> str:
    """{prefix}-{env}-seed{seed}: the prefix is the variant's (two-region AD: 'AD-tworegion')."""
    from model import variant_of
    return f"{variant_of(cfg).run_prefix(cfg)}-{cfg['env']}-seed{cfg['seed']}"


def run_path(cfg: dict) -> Path:
    return Path(cfg["run_dir"]) / run_name(cfg)
