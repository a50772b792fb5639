"""The learning-history HDF5 file: markers, schema, crash-safe appends (killed at every write),
appends that cost what they write, header checks, merge."""
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import env as envs
from algorithm import history, journal
from algorithm.history import (
    DTYPES,
    FIELDS,
    append_tasks,
    check_history,
    check_matches,
    compress_markers,
    create_if_missing,
    merge,
    read_header,
    read_task,
    recover,
    steps_per_stream,
)
from cli import load_config
from config.loading import collection_config
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def small_cfg(**kw):
    over = {"grid_size": 3, "n_steps": 5, "batch_size": 5, "n_stream": 3, "total_source_timesteps": 30,
            "horizon": 4}
    over.update(kw)
    return load_config([], over)


def fake_history(cfg, seed):
    """Arrays with the documented shapes, distinct per seed so copies can be told apart."""
    rng = np.random.default_rng(seed)
    T, S, ds = steps_per_stream(cfg), cfg["n_stream"], envs.state_dim(cfg)
    return {"states": rng.integers(0, 3, (T, S, ds)).astype(np.float64),
            "actions": rng.integers(0, 5, (T, S)),
            "rewards": rng.integers(0, 2, (T, S)).astype(np.float64),
            "next_states": rng.integers(0, 3, (T, S, ds)),
            "dones": rng.random((T, S)) < 0.2,
            "compress_markers": compress_markers(T, cfg["n_steps"], S)}


def new_file(path, cfg, indices=(), seed=0):
    tasks, split = envs.task_list(cfg), envs.task_split(cfg)
    create_if_missing(path, cfg, tasks, split)
    results = {i: fake_history(cfg, seed + i) for i in indices}
    if results:
        append_tasks(path, results, tasks, split, "sb3")
    return results


def tmp_of(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def journal_of(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


# ----------------------------------------------------------------------------- markers

@pytest.mark.parametrize("T,n_steps,S", [(17, 5, 3), (160, 80, 4), (6, 2, 1), (9, 3, 2)])
def test_compress_markers_positions(T, n_steps, S):
    m = compress_markers(T, n_steps, S)
    assert m.shape == (T, S) and m.dtype == np.int8
    for s in range(S):
        for t in range(T):
            want = 1 if t % n_steps == 0 else 2 if t % n_steps == n_steps - 1 else 0
            assert m[t, s] == want, (t, s)
    # one start and one end per full region, in every stream
    assert ((m == 1).sum(0) == -(-T // n_steps)).all()
    assert ((m == 2).sum(0) == T // n_steps).all()


def test_compress_markers_are_per_rollout_region_not_per_episode():
    m = compress_markers(40, 20, 2)[:, 0]
    assert np.flatnonzero(m == 1).tolist() == [0, 20]
    assert np.flatnonzero(m == 2).tolist() == [19, 39]


def test_steps_per_stream_rounds_up_to_whole_rollouts():
    assert steps_per_stream(small_cfg()) == 10            # 30 / (5*3) = 2 rollouts
    assert steps_per_stream(small_cfg(total_source_timesteps=31)) == 15
    assert steps_per_stream(load_config([], {"n_stream": 100})) == 1040  # the documented 100k example


# ----------------------------------------------------------------------------- schema round trip

def test_round_trip(tmp_path):
    cfg = small_cfg()
    path = tmp_path / "sub" / "h.hdf5"
    results = new_file(path, cfg, indices=(0, 4, 7))
    assert not tmp_of(path).exists() and not journal_of(path).exists()
    tasks, split = envs.task_list(cfg), envs.task_split(cfg)

    header = read_header(path)
    assert header["done"] == [0, 4, 7]
    assert header["config"] == cfg
    assert header["collection_config"] == collection_config(cfg)
    assert header["tasks"] == tasks and header["split"] == split

    T, S = steps_per_stream(cfg), cfg["n_stream"]
    with h5py.File(path, "r") as f:
        assert int(f.attrs["format_version"]) == history.FORMAT_VERSION == 1
        assert json.loads(f.attrs["config"]) == cfg
        assert sorted(f.keys()) == ["0", "4", "7"]
        for i in (0, 4, 7):
            g = f[str(i)]
            assert json.loads(g.attrs["task"]) == tasks[i]
            assert g.attrs["split"] == split[i] and g.attrs["split"] in ("train", "val", "test")
            assert g.attrs["backend"] == "sb3"
            assert set(g.keys()) == set(FIELDS)
            for name in FIELDS:
                ds = g[name]
                shape = (T, S, 2) if name in ("states", "next_states") else (T, S)
                assert ds.shape == shape, name
                assert ds.dtype == DTYPES[name], name
                assert ds.chunks is not None and ds.compression == "gzip", name
            back = read_task(f, i)
            for name in FIELDS:
                np.testing.assert_array_equal(back[name], np.asarray(results[i][name]).astype(DTYPES[name]))
            assert back["dones"].dtype == np.bool_ and back["compress_markers"].dtype == np.int8
        assert set(read_task(f, 4, fields=("actions",))) == {"actions"}


def test_both_splits_are_labelled(tmp_path):
    cfg = small_cfg(train_env_ratio=0.5)
    split = envs.task_split(cfg)
    train, test = split.index("train"), split.index("test")
    path = tmp_path / "h.hdf5"
    new_file(path, cfg, indices=(train, test))
    with h5py.File(path, "r") as f:
        assert f[str(train)].attrs["split"] == "train" and f[str(test)].attrs["split"] == "test"


def test_create_if_missing_keeps_existing_file(tmp_path):
    cfg = small_cfg()
    path = tmp_path / "h.hdf5"
    new_file(path, cfg, indices=(1,))
    before = path.read_bytes()
    create_if_missing(path, small_cfg(n_stream=5, batch_size=5), envs.task_list(cfg), envs.task_split(cfg))
    assert path.read_bytes() == before
    assert read_header(path)["done"] == [1]


def test_append_keeps_existing_group(tmp_path):
    cfg = small_cfg()
    path = tmp_path / "h.hdf5"
    first = new_file(path, cfg, indices=(2,), seed=0)
    append_tasks(path, {2: fake_history(cfg, 99), 3: fake_history(cfg, 3)}, envs.task_list(cfg),
                 envs.task_split(cfg), "sb3")
    with h5py.File(path, "r") as f:
        assert sorted(f.keys()) == ["2", "3"]
        np.testing.assert_array_equal(read_task(f, 2)["actions"], first[2]["actions"])


def test_check_history_rejects_wrong_shapes():
    cfg = small_cfg()
    h = fake_history(cfg, 0)
    check_history(h, cfg, 2)
    for name, bad in [("actions", h["actions"][:-1]), ("states", h["states"][..., :1]),
                      ("dones", h["dones"][:, :1])]:
        with pytest.raises(ValueError, match=name):
            check_history({**h, name: bad}, cfg, 2)


# ----------------------------------------------------------------------------- crash safety

def _assert_intact(path, before_bytes, done):
    assert path.read_bytes() == before_bytes
    assert read_header(path)["done"] == done
    with h5py.File(path, "r") as f:
        for i in done:
            read_task(f, i)


def test_append_failing_while_writing_leaves_original_intact(tmp_path, monkeypatch):
    cfg = small_cfg()
    path = tmp_path / "h.hdf5"
    new_file(path, cfg, indices=(0,))
    before = path.read_bytes()

    real_write_group = history._write_group
    calls = []

    def failing_write_group(f, index, *a, **kw):
        calls.append(index)
        if len(calls) == 2:  # the second new task dies half-written
            g = f.create_group(str(index))
            g.create_dataset("states", data=np.zeros(3))
            raise OSError("disk on fire")
        return real_write_group(f, index, *a, **kw)

    monkeypatch.setattr(history, "_write_group", failing_write_group)
    with pytest.raises(OSError, match="disk on fire"):
        append_tasks(path, {1: fake_history(cfg, 1), 2: fake_history(cfg, 2)}, envs.task_list(cfg),
                     envs.task_split(cfg), "sb3")
    assert calls == [1, 2]
    _assert_intact(path, before, [0])  # the whole append is undone, task 1 too
    assert not journal_of(path).exists()

    monkeypatch.setattr(history, "_write_group", real_write_group)
    append_tasks(path, {1: fake_history(cfg, 1), 2: fake_history(cfg, 2)}, envs.task_list(cfg),
                 envs.task_split(cfg), "sb3")
    assert read_header(path)["done"] == [0, 1, 2]


def test_append_dying_after_its_journal_is_finished_by_the_next_reader(tmp_path, monkeypatch):
    cfg = small_cfg()
    path = tmp_path / "h.hdf5"
    new_file(path, cfg, indices=(0, 5))
    before = path.read_bytes()

    def no_apply(*a, **kw):
        raise OSError("killed before the metadata reached the file")

    monkeypatch.setattr(journal, "_apply", no_apply)
    with pytest.raises(OSError, match="killed before"):
        append_tasks(path, {6: fake_history(cfg, 6)}, envs.task_list(cfg), envs.task_split(cfg), "sb3")
    monkeypatch.undo()
    assert journal_of(path).exists()
    assert path.read_bytes()[:len(before)] == before  # the old part untouched: only new bytes after it
    assert read_header(path)["done"] == [0, 5, 6]  # the reader finished the committed append
    assert not journal_of(path).exists()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(read_task(f, 6)["actions"], fake_history(cfg, 6)["actions"])


CRASH_SCRIPT = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from algorithm import history
import env as envs
from cli import load_config
cfg = load_config([], {"grid_size": 3, "n_steps": 5, "batch_size": 5, "n_stream": 3,
                       "total_source_timesteps": 30, "horizon": 4})
real = history._write_group
def dying(f, index, h, *a, **kw):
    real(f, index, h, *a, **kw)
    f.flush()
    os._exit(9)   # like kill -9: no cleanup, no finally, no close
history._write_group = dying
T = history.steps_per_stream(cfg)
h = {n: np.zeros((T, 3, 2) if n in ("states", "next_states") else (T, 3)) for n in history.FIELDS}
history.append_tasks(sys.argv[2], {3: h, 4: h}, envs.task_list(cfg), envs.task_split(cfg), "sb3")
"""


def test_process_dying_mid_append_leaves_readable_file(tmp_path):
    cfg = small_cfg()
    path = tmp_path / "h.hdf5"
    new_file(path, cfg, indices=(1,))
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(ROOT), str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    assert journal_of(path).exists()
    assert len(path.read_bytes()) > len(before)  # task 3 reached the disk past the old end ...
    assert path.read_bytes()[:len(before)] == before  # ... and nothing before it changed
    with h5py.File(path, "r") as f:  # readable as it is, without recovery: task 3 is not in it
        assert sorted(f.keys()) == ["1"]
    recover(path)
    assert not journal_of(path).exists()
    _assert_intact(path, before, [1])


class _KillAt:
    """`os` for algorithm/journal.py that exits like kill -9 at its k-th write, fsync,
    truncate or unlink (k=None: count them)."""
    POINTS = ("write", "pwrite", "fsync", "ftruncate", "unlink")

    def __init__(self, k):
        self.k, self.n = k, 0

    def __getattr__(self, name):
        real = getattr(os, name)
        if name not in self.POINTS:
            return real

        def point(*a, **kw):
            self.n += 1
            if self.n == self.k:
                os._exit(9)
            return real(*a, **kw)
        return point


def _append_in_child(path, cfg, k) -> int:
    """Run one append of tasks 3 and 4 in a forked child killed at I/O point k; its exit code."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            journal.os = _KillAt(k)
            append_tasks(path, {3: fake_history(cfg, 3), 4: fake_history(cfg, 4)}, envs.task_list(cfg),
                         envs.task_split(cfg), "sb3")
            os._exit(0)
        finally:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_append_killed_at_every_write_is_all_or_nothing(tmp_path):
    """kill -9 at each I/O point of an append, then the next open: the file is the state
    before the append (byte for byte) or after it (both tasks, their data exact)."""
    cfg = small_cfg()
    path, fresh = tmp_path / "h.hdf5", tmp_path / "fresh.hdf5"
    new_file(fresh, cfg, indices=(1,))
    before = fresh.read_bytes()
    outcomes, k = [], 1
    while True:
        path.write_bytes(before)
        code = _append_in_child(path, cfg, k)
        done = read_header(path)["done"]  # a reader recovers first
        assert not journal_of(path).exists()
        if done == [1]:
            assert path.read_bytes() == before, k
        else:
            assert done == [1, 3, 4], (k, done)
            with h5py.File(path, "r") as f:
                for i in (1, 3, 4):
                    np.testing.assert_array_equal(read_task(f, i)["states"], fake_history(cfg, i)["states"])
        outcomes.append(done == [1, 3, 4])
        if code == 0:
            break
        assert code == 9, code
        k += 1
    assert k > 20  # the append was killed at each of its k - 1 points ...
    assert not outcomes[0] and outcomes[-1] and outcomes[-2]  # ... undone early, finished late


def _bytes_written_by_one_append(path, cfg, index) -> int:
    written = []
    real_write, real_pwrite = os.write, os.pwrite

    class Count:
        def __getattr__(self, name):
            return getattr(os, name)

        def write(self, fd, data):
            written.append(len(data))
            return real_write(fd, data)

        def pwrite(self, fd, data, offset):
            written.append(len(data))
            return real_pwrite(fd, data, offset)

    journal.os = Count()
    try:
        append_tasks(path, {index: fake_history(cfg, index)}, envs.task_list(cfg), envs.task_split(cfg), "sb3")
    finally:
        journal.os = os
    return sum(written)


def test_append_costs_what_it_writes_not_the_file_size(tmp_path):
    cfg = small_cfg(grid_size=9)  # 81 tasks
    path = tmp_path / "h.hdf5"
    new_file(path, cfg, indices=(0,))
    early = _bytes_written_by_one_append(path, cfg, 1)
    new_file(path, cfg, indices=range(2, 60))
    size = path.stat().st_size
    late = _bytes_written_by_one_append(path, cfg, 60)
    one_task = path.stat().st_size - size
    assert size > 20 * one_task
    # the task's own bytes plus a few metadata pages (twice: journal and file), however big the file
    assert late < one_task + 6 * journal.PAGE and abs(late - early) < 3 * journal.PAGE, (early, late, one_task)


def test_journal_left_by_a_deleted_file_is_not_applied_to_a_new_one(tmp_path):
    cfg = small_cfg()
    path = tmp_path / "h.hdf5"
    new_file(path, cfg, indices=(0,))
    journal._begin(path, 10)  # a journal of a run killed mid-append ...
    path.unlink()  # ... whose file the user then deleted
    new_file(path, cfg, indices=(1,))
    assert read_header(path)["done"] == [1]


def test_recover_removes_a_tmp_copy_of_older_versions_and_only_that(tmp_path):
    path = tmp_path / "h.hdf5"
    path.write_bytes(b"keep me")
    tmp_of(path).write_bytes(b"half written")
    recover(path)
    assert not tmp_of(path).exists() and path.read_bytes() == b"keep me"
    recover(path)  # nothing to remove: no error
    recover(tmp_path / "absent.hdf5")


# ----------------------------------------------------------------------------- read_header errors

def test_read_header_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_header(tmp_path / "nope.hdf5")


@pytest.mark.parametrize("content", [b"this is not hdf5 at all\n" * 10, b""])
def test_read_header_non_hdf5(tmp_path, content):
    p = tmp_path / "garbage.hdf5"
    p.write_bytes(content)
    with pytest.raises(UserError, match="not a readable HDF5"):
        read_header(p)
    assert p.read_bytes() == content


def test_read_header_hdf5_without_attrs(tmp_path):
    p = tmp_path / "other.hdf5"
    with h5py.File(p, "w") as f:
        f.create_group("0")
    with pytest.raises(UserError, match="format_version") as ei:
        read_header(p)
    assert "config" in str(ei.value)
    q = tmp_path / "empty.hdf5"
    h5py.File(q, "w").close()
    with pytest.raises(UserError, match="format_version"):
        read_header(q)


def test_read_header_foreign_hdf5_is_a_user_error(tmp_path):
    p = tmp_path / "other.hdf5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    with pytest.raises(UserError):
        read_header(p)


def test_read_header_foreign_hdf5_names_missing_attrs(tmp_path):
    p = tmp_path / "other.hdf5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    with pytest.raises(UserError, match="format_version"):
        read_header(p)


def test_read_header_wrong_format_version(tmp_path):
    cfg = small_cfg()
    p = tmp_path / "h.hdf5"
    new_file(p, cfg, indices=(0,))
    with h5py.File(p, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(UserError, match="format_version 99"):
        read_header(p)


def test_read_header_errors_are_one_line(tmp_path):
    p = tmp_path / "garbage.hdf5"
    p.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(UserError) as ei:
        read_header(p)
    assert "\n" not in str(ei.value)


# ----------------------------------------------------------------------------- check_matches

def test_check_matches_names_differing_keys(tmp_path):
    cfg = small_cfg()
    p = tmp_path / "h.hdf5"
    new_file(p, cfg)
    header = read_header(p)
    check_matches(p, header, cfg)  # same settings: fine
    # keys outside the collection config (backend, model, run) do not matter
    check_matches(p, header, {**cfg, "backend": "batched" if cfg["backend"] == "sb3" else "sb3",
                              "lr": 0.5, "n_process": 7, "dataset_dir": "elsewhere", "seed": 3})
    with pytest.raises(UserError) as ei:
        check_matches(p, header, {**cfg, "n_stream": 7, "horizon": 9})
    msg = str(ei.value)
    assert "n_stream" in msg and "horizon" in msg and "7" in msg and "9" in msg
    assert "grid_size" not in msg and "n_steps" not in msg
    with pytest.raises(UserError, match="alg_seed"):
        check_matches(p, header, {**cfg, "alg_seed": 1})


# ----------------------------------------------------------------------------- merge

def test_merge_two_slices(tmp_path):
    cfg = small_cfg()
    a, b, out = tmp_path / "a.hdf5", tmp_path / "b.hdf5", tmp_path / "full.hdf5"
    ra = new_file(a, cfg, indices=range(0, 5), seed=0)
    rb = new_file(b, cfg, indices=range(5, 9), seed=100)
    added, have, total = merge(out, [a, b])
    assert (added, have, total) == (9, 9, 9)
    h = read_header(out)
    assert h["done"] == list(range(9)) and h["collection_config"] == collection_config(cfg)
    assert h["split"] == envs.task_split(cfg)
    with h5py.File(out, "r") as f:
        for i, r in {**ra, **rb}.items():
            back = read_task(f, i)
            for name in FIELDS:
                np.testing.assert_array_equal(back[name], np.asarray(r[name]).astype(DTYPES[name]))
            assert f[str(i)].attrs["backend"] == "sb3"
    # merging again adds nothing and keeps the file valid
    assert merge(out, [a, b]) == (0, 9, 9)


def test_merge_keeps_duplicates_once(tmp_path):
    cfg = small_cfg()
    a, b, out = tmp_path / "a.hdf5", tmp_path / "b.hdf5", tmp_path / "full.hdf5"
    ra = new_file(a, cfg, indices=(0, 1, 2), seed=0)
    new_file(b, cfg, indices=(2, 3), seed=100)
    added, have, total = merge(out, [a, b])
    assert (added, have) == (4, 4)
    with h5py.File(out, "r") as f:
        assert sorted(f.keys()) == ["0", "1", "2", "3"]
        np.testing.assert_array_equal(read_task(f, 2)["states"], ra[2]["states"].astype(np.float32))


def test_merge_into_existing_partial_file(tmp_path):
    cfg = small_cfg()
    out, b = tmp_path / "full.hdf5", tmp_path / "b.hdf5"
    new_file(out, cfg, indices=(0,))
    new_file(b, cfg, indices=(0, 1))
    assert merge(out, [b]) == (1, 2, 9)
    assert read_header(out)["done"] == [0, 1]


def _merge_in_child(out, inputs, k) -> int:
    """Merge `inputs` into `out` (two tasks per append) in a forked child killed like kill -9
    at I/O point k of the journal; its exit code."""
    pid = os.fork()
    if pid == 0:
        try:
            history.MERGE_CHUNK = 2
            journal.os = _KillAt(k)
            merge(out, inputs)
            os._exit(0)
        finally:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_merge_killed_anywhere_keeps_whole_tasks_and_a_rerun_finishes_it(tmp_path):
    cfg = small_cfg()
    a, b, out = tmp_path / "a.hdf5", tmp_path / "b.hdf5", tmp_path / "full.hdf5"
    want = {**new_file(a, cfg, indices=range(0, 3), seed=0), **new_file(b, cfg, indices=range(3, 5), seed=100)}
    partial, k = set(), 1
    while True:
        out.unlink(missing_ok=True)
        code = _merge_in_child(out, [a, b], k)
        done = read_header(out)["done"]  # whatever the kill left: readable, whole chunks of tasks
        assert done in ([], [0, 1], [0, 1, 2], [0, 1, 2, 3, 4]), (k, done)  # appends: [0 1] [2] | [3 4]
        partial.add(len(done))
        with h5py.File(out, "r") as f:
            for i in done:
                np.testing.assert_array_equal(read_task(f, i)["states"], np.asarray(want[i]["states"], np.float32))
        assert merge(out, [a, b])[1] == 5  # the rerun adds what is missing
        assert read_header(out)["done"] == list(range(5))
        if code == 0:
            break
        assert code == 9, code
        k += 7  # every 7th of its ~230 I/O points (every point of one append is tested above)
    assert partial == {0, 2, 3, 5}  # killed before any append and inside each of the three


def test_merge_refuses_differing_configs(tmp_path):
    a, b, out = tmp_path / "a.hdf5", tmp_path / "b.hdf5", tmp_path / "full.hdf5"
    new_file(a, small_cfg(), indices=(0,))
    new_file(b, small_cfg(n_stream=5, batch_size=5), indices=(1,))
    with pytest.raises(UserError, match="n_stream"):
        merge(out, [a, b])
    assert not out.exists()


def test_merge_refuses_output_with_other_settings(tmp_path):
    a, out = tmp_path / "a.hdf5", tmp_path / "full.hdf5"
    new_file(a, small_cfg(), indices=(0,))
    new_file(out, small_cfg(alg_seed=7), indices=(1,))
    before = out.read_bytes()
    with pytest.raises(UserError, match="alg_seed"):
        merge(out, [a])
    assert out.read_bytes() == before


def test_merge_refuses_unreadable_input(tmp_path):
    a, bad, out = tmp_path / "a.hdf5", tmp_path / "bad.hdf5", tmp_path / "full.hdf5"
    new_file(a, small_cfg(), indices=(0,))
    bad.write_bytes(b"junk" * 50)
    with pytest.raises(UserError):
        merge(out, [a, bad])
    with pytest.raises(UserError, match="not found"):
        merge(out, [a, tmp_path / "missing.hdf5"])
    assert not out.exists() or read_header(out)["done"] in ([], [0])
