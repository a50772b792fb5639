"""The learning-history HDF5 file: layout, crash-safe appends, validation and merging.

Layout (docs/file-formats.md): file attrs `format_version`, `config` (resolved config, JSON),
`collection_config` (the keys that define the data, JSON), `tasks` and `split` (JSON lists);
one group per task named by its index, attrs `task` (JSON), `split`, `backend`; time-major
datasets of shape (T, n_stream, ...).

Crash safety: finished tasks are appended in place through a write-ahead journal
(`algorithm/journal.py`), so an append costs what it writes, and a collection killed at
any moment leaves the file as it was before or after a whole append: a group that exists
is a finished task. The next open (`recover`, called by collect.py and `read_header`)
finishes or undoes an append that a dead process left. A group damaged afterwards (a
dataset missing, a wrong shape, a chunk that no longer decompresses) is found by
`damaged_tasks`: training refuses it and collect.py collects it again. One collection
writes a file at a time (`lock`).
"""
import json
import os
from pathlib import Path

import h5py
import numpy as np

import env as envs
from algorithm import journal
from config.loading import collection_config
from config.schema import COLLECTION_KEYS_ADDED_LATER, SCHEMA, applies
from errors import UserError, first_line
from files import locked

FORMAT_VERSION = 1
FIELDS = ("states", "actions", "rewards", "next_states", "dones", "compress_markers")
DTYPES = {"states": np.float32, "actions": np.int16, "rewards": np.float32,
          "next_states": np.float32, "dones": np.bool_, "compress_markers": np.int8}
MARK_START, MARK_END = 1, 2


def dataset_path(cfg: dict) -> Path:
    """datasets/history_{env}_{alg}_alg-seed{alg_seed}.hdf5 under the config's dataset_dir."""
    return Path(cfg["dataset_dir"]) / f"history_{cfg['env']}_{cfg['alg']}_alg-seed{cfg['alg_seed']}.hdf5"


def n_rollouts(cfg: dict) -> int:
    """Rollouts (n_steps per stream) per task: total_source_timesteps rounded up to whole rollouts."""
    per_rollout = cfg["n_steps"] * cfg["n_stream"]
    return -(-cfg["total_source_timesteps"] // per_rollout)


def steps_per_stream(cfg: dict) -> int:
    return n_rollouts(cfg) * cfg["n_steps"]


def episode_returns(rewards: np.ndarray, horizon: int) -> np.ndarray:
    """A stream's rewards (T, n_stream) -> the return of each whole episode (episodes, n_stream);
    a last, unfinished episode is left out."""
    n_ep = rewards.shape[0] // horizon
    return rewards[:n_ep * horizon].reshape(n_ep, horizon, -1).sum(1)


def compress_markers(n_steps_total: int, n_steps: int, n_stream: int) -> np.ndarray:
    """(T, S) int8: 1 on the first step of every rollout region, 2 on its last step."""
    t = np.arange(n_steps_total)
    marks = np.zeros(n_steps_total, dtype=np.int8)
    marks[t % n_steps == n_steps - 1] = MARK_END
    marks[t % n_steps == 0] = MARK_START  # a 1-step region is a start (its end is implied)
    return np.repeat(marks[:, None], n_stream, axis=1)


def check_history(h: dict, cfg: dict, state_dim: int):
    """Shapes and dtypes of one task's arrays, before they go to disk."""
    T, S = steps_per_stream(cfg), cfg["n_stream"]
    want = {"states": (T, S, state_dim), "next_states": (T, S, state_dim)}
    for f in FIELDS:
        shape = want.get(f, (T, S))
        if h[f].shape != shape:
            raise ValueError(f"{f}: shape {h[f].shape}, expected {shape}")


def _write_group(f: h5py.File, index: int, h: dict, task: dict, split: str, backend: str):
    g = f.create_group(str(index))
    g.attrs["task"] = json.dumps(task)
    g.attrs["split"] = split
    g.attrs["backend"] = backend
    for name in FIELDS:
        data = np.asarray(h[name], dtype=DTYPES[name])
        # one stream per chunk: a training window reads one stream, not all of them
        chunks = (min(len(data), 1024), 1, *data.shape[2:])
        g.create_dataset(name, data=data, chunks=chunks, compression="gzip", compression_opts=4,
                         shuffle=True)


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def create_if_missing(path: Path, cfg: dict, tasks: list, split: list):
    path = Path(path)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with h5py.File(tmp, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["config"] = json.dumps(cfg, sort_keys=True)
        f.attrs["collection_config"] = json.dumps(collection_config(cfg), sort_keys=True)
        f.attrs["tasks"] = json.dumps(tasks)
        f.attrs["split"] = json.dumps(split)
    journal.journal_path(path).unlink(missing_ok=True)  # one left beside a file since deleted is not ours
    os.replace(tmp, path)


def append_tasks(path: Path, results: dict, tasks: list, split: list, backend: str, replace=()):
    """Add finished tasks {index: arrays} to the file as one crash-safe append (see module
    doc). A group already there is kept, unless its index is in `replace` (a damaged task
    collected again: its old bytes stay in the file, unreferenced)."""
    with journal.appending(path) as fobj, h5py.File(fobj, "r+") as f:
        for index, h in sorted(results.items()):
            if str(index) in f:
                if index not in replace:  # already there (e.g. a merge input): keep the first
                    continue
                del f[str(index)]
            _write_group(f, index, h, tasks[index], split[index], backend)


def lock(path: Path):
    """Hold the dataset file `path` against other collections or merges (see files.locked)."""
    path = Path(path)
    return locked(path.with_name(path.name + ".lock"), f"dataset {path}")


def recover(path: Path):
    """Finish or undo an append that a killed collection left (journal.recover), and remove
    the `.tmp` copy that versions before the journal left."""
    _tmp(Path(path)).unlink(missing_ok=True)
    journal.recover(path)


def has_leftovers(path: Path) -> bool:
    """Whether a killed collection left a journal or a `.tmp` copy that a writer must clear."""
    return journal.journal_path(Path(path)).exists() or _tmp(Path(path)).exists()


def _recover_for_reader(path: Path):
    """A reader finishes an append that a killed collection left; a running collection
    (holding the lock) finishes its own, and until then the file's old part is intact."""
    if not journal.journal_path(path).exists():
        return
    try:
        with lock(path):
            journal.recover(path)
    except UserError:
        pass  # a collection is writing the file right now
    except OSError as e:
        raise UserError(f"{path}: cannot finish the append a killed collection left ({e.strerror or e}): "
                        "rerun the collect.py command with write access to the dataset directory") from None


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _looks_like_hdf5(path: Path) -> bool:
    """The HDF5 signature at offset 0 or a power of two from 512 on (a user block), read
    without h5py; an empty file (a collection killed before its first write) is not HDF5."""
    with open(path, "rb") as f:
        offset = 0
        while True:
            f.seek(offset)
            head = f.read(8)
            if head == HDF5_SIGNATURE:
                return True
            if len(head) < 8:
                return False
            offset = 512 if offset == 0 else offset * 2


def read_header(path: Path) -> dict:
    """File attrs and the finished task indices; a user error for anything unreadable."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"dataset not found: {path}; collect it first with python collect.py "
                        "<algorithm.yaml> <env.yaml> (same configs and --set as here)")
    if not path.is_file():  # a folder (or a device) passed for a dataset: nothing to move away
        raise UserError(f"{path} is not a file: give a learning-history file that collect.py wrote "
                        "(datasets/history_<env>_<alg>_alg-seed<seed>.hdf5)")
    if not _looks_like_hdf5(path):
        if path.suffix in (".hdf5", ".h5"):  # in a dataset's place (e.g. empty after a crash): recollect it
            why = "empty" if not path.stat().st_size else "no HDF5 signature"
            raise UserError(f"{path} is not a readable HDF5 file ({why}): move it away and rerun collect.py "
                            "to recollect it")
        # e.g. a config file given in a dataset's place: the path is wrong, not the file
        raise UserError(f"{path} is not an HDF5 file: give a learning-history file that collect.py wrote "
                        "(datasets/history_<env>_<alg>_alg-seed<seed>.hdf5)")
    _recover_for_reader(path)
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            groups = list(f.keys())
    except (OSError, ValueError, RuntimeError) as e:
        if journal.journal_path(path).exists():  # opened in the instant a running append rewrote its metadata
            raise UserError(f"{path} is being appended to by a running collect.py: retry when it is done") from None
        raise UserError(f"{path} is a damaged HDF5 file ({str(e).splitlines()[0]}): move it away and rerun "
                        "collect.py to recollect it") from None
    missing = [k for k in ("format_version", "config", "collection_config", "tasks", "split") if k not in attrs]
    if missing:
        raise UserError(f"{path} is not a learning-history file of this toolkit (attrs {missing} are "
                        "missing): move it away and rerun collect.py")
    if not all(g.isdigit() for g in groups):
        raise UserError(f"{path} is not a learning-history file of this toolkit (groups "
                        f"{[g for g in groups if not g.isdigit()][:3]} are not task indices): move it away")
    done = sorted(int(g) for g in groups)
    try:
        if int(attrs["format_version"]) != FORMAT_VERSION:
            raise UserError(f"{path} has format_version {attrs['format_version']}, this toolkit reads "
                            f"{FORMAT_VERSION}: recollect it with this version of collect.py")
        stored = json.loads(attrs["collection_config"])
        later = {k: v for k, v in COLLECTION_KEYS_ADDED_LATER.items()  # only the keys that mean something here
                 if not isinstance(stored, dict) or "env" not in stored or applies(k, stored)}
        header = {"config": json.loads(attrs["config"]),
                  "collection_config": later | stored if isinstance(stored, dict) else stored,
                  "tasks": json.loads(attrs["tasks"]), "split": json.loads(attrs["split"]), "done": done}
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: its header attributes are damaged ({first_line(e)}): move it away and "
                        "rerun collect.py") from None
    cc = header["collection_config"]
    if (not isinstance(cc, dict) or not all(k in cc for k in ("env", "n_steps", "n_stream", "total_source_timesteps"))
            or not isinstance(header["split"], list) or not isinstance(header["tasks"], list)):
        raise UserError(f"{path}: its header attributes are damaged: move it away and rerun collect.py")
    return header


_checked = {}  # (file identity, indices, read_data) -> result: the train and test parts check the same tasks


def damaged_tasks(path: Path, header: dict, indices, read_data: bool = True) -> dict:
    """{task index: what is wrong} for the finished tasks among `indices` that cannot be
    used: a dataset missing, a shape or dtype other than the file's settings give, or
    (read_data) data that cannot be read back, e.g. a chunk that does not decompress.
    Reading every chunk costs about as much as loading the data once; a file is
    checked once per process."""
    st = os.stat(path)  # every append changes the size and mtime (and merge/recollection the inode)
    key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, tuple(indices), read_data)
    if key not in _checked:
        _checked[key] = _damaged_tasks(path, header, indices, read_data)
    return dict(_checked[key])


def _damaged_tasks(path: Path, header: dict, indices, read_data: bool) -> dict:
    cc = header["collection_config"]
    T, S, ds = steps_per_stream(cc), cc["n_stream"], envs.state_dim(cc)
    want = {f: (T, S, ds) if f in ("states", "next_states") else (T, S) for f in FIELDS}
    bad = {}
    with h5py.File(path, "r") as f:
        for i in indices:
            try:
                g = f[str(i)]
                for name in FIELDS:
                    if name not in g:
                        if name == "compress_markers":  # a file from before the markers: dataset.py falls back
                            continue
                        raise ValueError(f"{name} is missing")
                    d = g[name]
                    if d.shape != want[name] or d.dtype != DTYPES[name]:
                        raise ValueError(f"{name} is {d.dtype}{list(d.shape)}, expected "
                                         f"{np.dtype(DTYPES[name])}{list(want[name])}")
                    if read_data:
                        d[()]
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
                bad[i] = first_line(e)
    return bad


def describe(damaged: dict, n: int = 3) -> str:
    """'task 5: actions is missing; task 7: ...' for the first n of {index: reason}."""
    text = "; ".join(f"task {i}: {why}" for i, why in list(damaged.items())[:n])
    return text + (f"; {len(damaged) - n} more" if len(damaged) > n else "")


def config_differences(stored: dict, wanted: dict, asked: str = "asked") -> list[str]:
    """'key=stored (asked wanted)' for the data-defining keys that differ (`asked` names the second
    side); a key that means nothing to one side's family or source (e.g. PPO's batch_size, which
    files of another source collected before SOURCE_KEYS still record) is not compared."""
    keys = sorted(k for k in set(stored) | set(wanted)
                  if k not in SCHEMA or "env" not in stored or (applies(k, stored) and applies(k, wanted)))
    return [f"{k}={stored.get(k)!r} ({asked} {wanted.get(k)!r})" for k in keys if stored.get(k) != wanted.get(k)]


def check_matches(path: Path, header: dict, cfg: dict):
    diff = config_differences(header["collection_config"], collection_config(cfg))
    if diff:
        raise UserError(f"{path} was collected with other settings: {', '.join(diff)}; use those "
                        "settings, another dataset_dir, or move the file away to recollect")


def read_task(f: h5py.File, index: int, fields=FIELDS) -> dict:
    g = f[str(index)]
    return {name: g[name][()] for name in fields}


MERGE_CHUNK = 16  # tasks per append when merging slices


def merge(out: Path, inputs: list[Path]):
    """Combine slice files with identical collection configs into `out` (kept if it exists)."""
    out = Path(out)
    headers = [(p, read_header(p)) for p in inputs]
    for p, h in headers:
        damaged = damaged_tasks(p, h, h["done"])
        if damaged:
            raise UserError(f"cannot merge {p}: it has damaged tasks ({describe(damaged)}); rerun the "
                            "collect.py command of that slice to repair it")
    first_path, first = headers[0]
    for p, h in headers[1:]:
        diff = config_differences(first["collection_config"], h["collection_config"])
        if diff:
            raise UserError(f"cannot merge {p} into {first_path}: collected with other settings "
                            f"({', '.join(diff)})")
    if out.exists():
        h = read_header(out)
        diff = config_differences(h["collection_config"], first["collection_config"])
        if diff:
            raise UserError(f"cannot merge into {out}: it was collected with other settings ({', '.join(diff)})")
    else:
        create_if_missing(out, first["config"], first["tasks"], first["split"])
    have = set(read_header(out)["done"])
    added = 0
    for p, h in headers:
        new = [i for i in h["done"] if i not in have]
        # a few tasks per append: memory stays at one chunk however large the slice, and a
        # merge killed half-way keeps the chunks it finished (rerunning adds the rest)
        for start in range(0, len(new), MERGE_CHUNK):
            chunk = new[start:start + MERGE_CHUNK]
            with h5py.File(p, "r") as f:
                backend = f[str(chunk[0])].attrs.get("backend", "unknown")
                results = {i: read_task(f, i) for i in chunk}
            append_tasks(out, results, first["tasks"], first["split"], backend)
            have.update(chunk)
            added += len(chunk)
    return added, len(have), len(first["tasks"])
