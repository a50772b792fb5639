"""collect.py end to end with the Stable-Baselines3 backend (tiny sizes), checked against
the dataset format (docs/file-formats.md); kill-and-resume, mismatched settings, corrupt files,
slices and --merge."""
import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_in_process import assert_one_line_error

import env as envs
from algorithm import journal
from algorithm.history import DTYPES, FIELDS, dataset_path, read_header, read_task, steps_per_stream
from cli import load_config
from config.loading import collection_config, parse_set
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ALG = "config/algorithm/ppo_darkroom.yaml"
ENV = "config/env/darkroom.yaml"
MOVES = {0: (0, 0), 1: (0, 1), 2: (0, -1), 3: (-1, 0), 4: (1, 0)}  # the documented actions

# one SB3 rollout region = 2 darkroom episodes; 2 regions per stream (T = 80)
E2E_SET = ["backend=sb3", "grid_size=5", "n_stream=4", "total_source_timesteps=320", "n_process=1",
           "n_steps=40", "batch_size=40"]
E2E_TASKS = "11:14"  # goals (2,1), (2,2)=start, (2,3): rewards are frequent even for a random policy
# 9 tasks on a 3x3 grid: a full dataset stays small
SMALL_SET = ["backend=sb3", "grid_size=3", "n_stream=4", "total_source_timesteps=320", "n_process=1",
             "n_steps=40", "batch_size=40"]



def assert_refused(proc, *words) -> str:
    """A subprocess's refusal (see cli_in_process.assert_one_line_error)."""
    return assert_one_line_error(proc.returncode, proc.stderr, *words, stdout=proc.stdout)

def cmd(dataset_dir, sets, *extra):
    return [sys.executable, str(ROOT / "collect.py"), ALG, ENV, "--set", *sets, f"dataset_dir={dataset_dir}",
            *extra]


def run(args, timeout=120):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def cfg_of(dataset_dir, sets):
    return load_config([ROOT / ALG, ROOT / ENV], parse_set(sets + [f"dataset_dir={dataset_dir}"]))


def assert_ok(proc):
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr



def snapshot(path: Path):
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, st.st_size


def tmp_of(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    proc = run(cmd(d, E2E_SET, "--tasks", E2E_TASKS))
    assert_ok(proc)
    cfg = cfg_of(d, E2E_SET)
    full = dataset_path(cfg)
    assert full == d / "history_darkroom_PPO_alg-seed42.hdf5"
    path = full.with_name("history_darkroom_PPO_alg-seed42.tasks11-14.hdf5")
    return {"dir": d, "cfg": cfg, "path": path, "proc": proc}


def test_e2e_file_and_header(e2e):
    cfg, path, proc = e2e["cfg"], e2e["path"], e2e["proc"]
    assert path.is_file() and not tmp_of(path).exists()
    assert "0 of 3 tasks already collected" in proc.stdout
    h = read_header(path)
    assert h["done"] == [11, 12, 13]
    assert h["config"] == cfg
    assert h["collection_config"] == collection_config(cfg)
    assert h["tasks"] == envs.task_list(cfg) and len(h["tasks"]) == 25
    assert h["split"] == envs.task_split(cfg)
    with h5py.File(path, "r") as f:
        assert int(f.attrs["format_version"]) == 1
        assert sorted(f.keys(), key=int) == ["11", "12", "13"]
        for i in (11, 12, 13):
            g = f[str(i)]
            assert json.loads(g.attrs["task"]) == envs.task_list(cfg)[i]
            assert g.attrs["split"] == envs.task_split(cfg)[i]
            assert g.attrs["backend"] == "sb3"
            assert set(g) == set(FIELDS)
            for name in FIELDS:
                assert g[name].dtype == DTYPES[name], name


def _tasks(e2e):
    cfg = e2e["cfg"]
    with h5py.File(e2e["path"], "r") as f:
        for i in (11, 12, 13):
            yield envs.task_list(cfg)[i], read_task(f, i)


def test_e2e_shapes_markers_and_dones(e2e):
    cfg = e2e["cfg"]
    T, S, H, n_steps = 80, 4, 20, 40
    assert steps_per_stream(cfg) == T
    t = np.arange(T)
    want_markers = np.where(t % n_steps == 0, 1, np.where(t % n_steps == n_steps - 1, 2, 0))
    want_dones = (t + 1) % H == 0
    for _, h in _tasks(e2e):
        assert h["states"].shape == (T, S, 2) and h["next_states"].shape == (T, S, 2)
        for name in ("actions", "rewards", "dones", "compress_markers"):
            assert h[name].shape == (T, S), name
        for s in range(S):
            np.testing.assert_array_equal(h["compress_markers"][:, s], want_markers)
            np.testing.assert_array_equal(h["dones"][:, s], want_dones)


def test_e2e_transitions_are_consistent(e2e):
    start = np.array([2, 2])
    n_end_not_start = 0
    total_reward = 0.0
    for task, h in _tasks(e2e):
        s, a, r, ns, d = (h[k] for k in ("states", "actions", "rewards", "next_states", "dones"))
        assert set(np.unique(a)) <= set(range(5))
        # episodes start at the centre
        np.testing.assert_array_equal(s[::20], np.broadcast_to(start, s[::20].shape))
        # within an episode the next state is the next step's state
        inner = ~d[:-1]
        np.testing.assert_array_equal(ns[:-1][inner], s[1:][inner])
        # the next state is the true one everywhere, episode ends included (not the reset state)
        delta = np.array([MOVES[int(x)] for x in a.reshape(-1)]).reshape(*a.shape, 2)
        np.testing.assert_array_equal(ns, np.clip(s + delta, 0, 4))
        n_end_not_start += int((d & (ns != start).any(-1)).sum())
        # reward 1 exactly when the next state is the goal
        np.testing.assert_array_equal(r, (ns == np.array(task["goal"])).all(-1).astype(np.float32))
        total_reward += r.sum()
        # streams are independent histories
        assert len({a[:, i].tobytes() for i in range(a.shape[1])}) == a.shape[1]
    assert n_end_not_start > 0  # otherwise the reset-state check above could not fail
    assert total_reward > 0


def test_e2e_rerun_collects_nothing_and_removes_stale_tmp(e2e):
    before = snapshot(e2e["path"])
    tmp_of(e2e["path"]).write_bytes(b"left by a run killed while writing")
    proc = run(cmd(e2e["dir"], E2E_SET, "--tasks", E2E_TASKS))
    assert_ok(proc)
    assert "3 of 3 tasks already collected, 0 to go" in proc.stdout
    assert snapshot(e2e["path"]) == before
    assert not tmp_of(e2e["path"]).exists()


def test_e2e_mismatched_settings_refused(e2e):
    before = snapshot(e2e["path"])
    sets = [s for s in E2E_SET if not s.startswith("n_stream=")] + ["n_stream=2"]
    proc = run(cmd(e2e["dir"], sets, "--tasks", E2E_TASKS))
    assert_refused(proc, "n_stream", str(e2e["path"]))
    assert snapshot(e2e["path"]) == before


def test_corrupt_dataset_refused_and_untouched(tmp_path):
    cfg = cfg_of(tmp_path, SMALL_SET)
    path = dataset_path(cfg)
    garbage = b"\x89not an hdf5 file\x00" * 64
    path.write_bytes(garbage)
    st = path.stat()
    proc = run(cmd(tmp_path, SMALL_SET))
    assert_refused(proc, str(path))
    assert path.read_bytes() == garbage and path.stat().st_mtime_ns == st.st_mtime_ns
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# ----------------------------------------------------------------------------- kill and resume

def test_kill_and_resume(tmp_path):
    sets = SMALL_SET + ["n_epochs=5"]
    cfg = cfg_of(tmp_path, sets)
    path = dataset_path(cfg)
    n_tasks = len(envs.task_list(cfg))
    assert n_tasks == 9
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd(tmp_path, sets), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 90
        done = []
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists():
                try:
                    done = read_header(path)["done"]
                except UserError:
                    done = []  # transient: keep polling
                if done:
                    break
            time.sleep(0.02)
        assert done, "no task was finished in time"
        proc.kill()  # SIGKILL: no cleanup
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -9

    header = read_header(path)  # readable after the kill
    k = len(header["done"])
    assert 1 <= k < n_tasks, f"the kill came after all {k} tasks were done"
    first = header["done"][0]
    with h5py.File(path, "r") as f:
        kept = read_task(f, first)
        for i in header["done"]:
            read_task(f, i)
    # a kill during an append leaves its journal and new bytes past the file's old end
    journal._begin(path, path.stat().st_size)
    with open(path, "ab") as fh:
        fh.write(b"half-written task" * 100)
    tmp_of(path).write_bytes(b"half-written copy")  # what versions before the journal left

    proc2 = run(cmd(tmp_path, sets))
    assert_ok(proc2)
    assert f"{k} of {n_tasks} tasks already collected, {n_tasks - k} to go" in proc2.stdout
    assert f"collected {n_tasks - k} tasks" in proc2.stdout
    assert not tmp_of(path).exists() and not path.with_name(path.name + ".journal").exists()
    final = read_header(path)
    assert final["done"] == list(range(n_tasks))
    with h5py.File(path, "r") as f:
        again = read_task(f, first)
        for i in range(n_tasks):
            assert read_task(f, i)["actions"].shape == (80, 4)
    for name in FIELDS:  # finished tasks were not recollected
        np.testing.assert_array_equal(kept[name], again[name])


# ----------------------------------------------------------------------------- slices and merge

def test_slices_and_merge(tmp_path):
    sets = SMALL_SET + ["n_epochs=2"]
    cfg = cfg_of(tmp_path, sets)
    full = dataset_path(cfg)
    procs = [subprocess.Popen(cmd(tmp_path, sets, "--tasks", sl), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for sl in ("0:4", "4:")]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    a = full.with_name("history_darkroom_PPO_alg-seed42.tasks0-4.hdf5")
    b = full.with_name("history_darkroom_PPO_alg-seed42.tasks4-9.hdf5")
    assert read_header(a)["done"] == [0, 1, 2, 3]
    assert read_header(b)["done"] == [4, 5, 6, 7, 8]
    assert not full.exists()

    proc = run(cmd(tmp_path, sets, "--merge", str(a), str(b)))
    assert_ok(proc)
    assert "9 of 9" in proc.stdout
    h = read_header(full)
    assert h["done"] == list(range(9))
    assert h["collection_config"] == collection_config(cfg)
    assert h["split"] == envs.task_split(cfg) and h["tasks"] == envs.task_list(cfg)
    with h5py.File(full, "r") as f, h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for i in range(9):
            src = fa if i < 4 else fb
            got, want = read_task(f, i), read_task(src, i)
            for name in FIELDS:
                np.testing.assert_array_equal(got[name], want[name])
            assert f[str(i)].attrs["split"] == src[str(i)].attrs["split"]
            assert json.loads(f[str(i)].attrs["task"]) == envs.task_list(cfg)[i]
    # the full file is now complete: collecting it again does nothing
    before = snapshot(full)
    proc = run(cmd(tmp_path, sets))
    assert_ok(proc)
    assert "9 of 9 tasks already collected" in proc.stdout
    assert snapshot(full) == before


def test_split_collects_only_that_splits_tasks_beside_the_full_file(tmp_path):
    sets = SMALL_SET + ["n_epochs=2"]
    cfg = cfg_of(tmp_path, sets)
    val = envs.tasks_of_split(cfg, "val")
    assert 0 < len(val) < len(envs.task_list(cfg))
    proc = run(cmd(tmp_path, sets, "--split", "val"))
    assert_ok(proc)
    full = dataset_path(cfg)
    part = full.with_name(f"{full.stem}.val{full.suffix}")
    assert read_header(part)["done"] == val and not full.exists()
    curve = run([sys.executable, str(ROOT / "scripts/source_curve.py"), str(part), "--split", "val"])
    assert_ok(curve)
    assert f"{len(val)} val tasks x 4 streams" in curve.stdout
    refused = run(cmd(tmp_path, sets, "--split", "val", "--tasks", "0:2"))
    assert_refused(refused, "--tasks", "--split")


def test_merge_refuses_slice_with_other_settings(e2e, tmp_path):
    # the e2e slice was collected on a 5x5 grid; these settings say 3x3
    sets = SMALL_SET + ["n_epochs=2"]
    other = e2e["path"]
    before_other = snapshot(other)
    proc = run(cmd(tmp_path, sets, "--merge", str(other)))
    assert_refused(proc, "grid_size", str(other))
    assert not dataset_path(cfg_of(tmp_path, sets)).exists()
    assert snapshot(other) == before_other
    # and with matching settings otherwise, a differing n_stream is named
    sets5 = [s for s in E2E_SET if not s.startswith("n_stream=")] + ["n_stream=2"]
    proc = run(cmd(tmp_path, sets5, "--merge", str(other)))
    assert_refused(proc, "n_stream")
    assert not dataset_path(cfg_of(tmp_path, sets5)).exists()
