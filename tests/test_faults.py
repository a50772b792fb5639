"""Bad inputs and faults end in one line and exit code 2, before any work, with nothing on disk
lost. One section per class of fault: unreadable config files, damaged checkpoints, empty
splits, seeds, sizes that cannot fit, damaged task groups, output paths, evaluate.py's up-front
checks, pipeline --set, and the collection progress bar. Processes that outlive their parent and
two users of one folder: tests/test_processes_and_locks.py."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from cli_in_process import assert_one_line_error, run_in_process
from fault_helpers import (  # noqa: F401 (trained: a fixture)
    ALG,
    ENV,
    EVAL_SET,
    ROOT,
    TINY_RUN,
    collect_cli,
    evaluate_cli,
    resume_sets,
    snapshot,
    train_cli,
    trained,
)
from fixtures_history import build_history_file, cli_sets, config_files, make_cfg, random_histories

import collect
import env as envs
import errors
import files
import runtime
import train
from algorithm import history
from algorithm.history import dataset_path
from cli import load_config, run_path
from errors import ConfigError, UserError

# ----------------------------------------------------------------------------- 1. config files

def write_hdf5(path):
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)


def write_checkpoint(path):
    torch.save({"model": {"w": torch.zeros(2)}, "step": 1}, path)


BAD_CONFIGS = {
    "binary": lambda p: p.write_bytes(bytes(range(256)) * 4),
    "latin1": lambda p: p.write_bytes("grid_size: 9  # caf\xe9\n".encode("latin-1")),
    "checkpoint": write_checkpoint,
    "hdf5": write_hdf5,
    "nul_bytes": lambda p: p.write_bytes(b"\x00" * 64),
    "list": lambda p: p.write_text("- grid_size\n- 9\n"),
    "directory": lambda p: p.mkdir(),
    "gone": lambda p: None,
}


@pytest.mark.parametrize("kind", list(BAD_CONFIGS))
def test_bad_config_file_is_one_config_error(tmp_path, kind):
    path = tmp_path / "config.yaml"
    BAD_CONFIGS[kind](path)
    with pytest.raises(ConfigError) as e:
        load_config([path])
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg


def test_bad_included_file_is_one_config_error(tmp_path):
    (tmp_path / "inc.yaml").write_bytes(b"\x89HDF\r\n\x1a\n\xff\xfe")
    (tmp_path / "main.yaml").write_text("include: inc.yaml\n")
    with pytest.raises(ConfigError, match="inc.yaml"):
        load_config([tmp_path / "main.yaml"])


@pytest.mark.parametrize("kind", ["binary", "latin1", "checkpoint", "hdf5", "list", "directory", "gone"])
def test_unreadable_run_config_on_resume_exits_2_and_keeps_the_run(data_dir, trained, tmp_path, monkeypatch,
                                                                    capsys, kind):
    runs = tmp_path / "runs"
    run = runs / trained.name
    shutil.copytree(trained, run)
    (run / "config.yaml").unlink()
    BAD_CONFIGS[kind](run / "config.yaml")
    before = snapshot(run)
    code, err = train_cli(monkeypatch, capsys, resume_sets(data_dir, runs))
    assert_one_line_error(code, err, "config.yaml")
    assert snapshot(run) == before


def test_evaluate_with_unreadable_run_config_exits_2(trained, tmp_path, monkeypatch, capsys):
    run = tmp_path / trained.name
    shutil.copytree(trained, run)
    BAD_CONFIGS["latin1"](run / "config.yaml")
    code, err = evaluate_cli(monkeypatch, capsys, run)
    assert_one_line_error(code, err, "config.yaml", "UTF-8")


# ----------------------------------------------------------------------------- 2. checkpoints

def save_other_objects(kind, path):
    objects = {"tensor": torch.zeros(3), "list": [1, 2, 3], "dict_without_keys": {"a": 1},
               "model_is_a_tensor": {"model": torch.zeros(2), "optimizer": {}, "step": 4,
                                     "torch_rng": torch.get_rng_state()},
               "step_is_a_string": None}
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x00" * 100)
    elif kind == "step_is_a_string":
        state = torch.load(path, weights_only=True)
        state["step"] = "four"
        torch.save(state, path)
    else:
        torch.save(objects[kind], path)


CKPT_KINDS = ["empty", "garbage", "tensor", "list", "dict_without_keys", "model_is_a_tensor", "step_is_a_string"]


@pytest.mark.parametrize("kind", CKPT_KINDS)
def test_damaged_checkpoint_on_resume_exits_2(data_dir, trained, tmp_path, monkeypatch, capsys, kind):
    runs = tmp_path / "runs"
    run = runs / trained.name
    shutil.copytree(trained, run)
    save_other_objects(kind, run / "ckpt-last.pt")
    before = snapshot(run)
    code, err = train_cli(monkeypatch, capsys, resume_sets(data_dir, runs))
    assert_one_line_error(code, err, "ckpt-last.pt")
    assert snapshot(run) == before


@pytest.mark.parametrize("kind", ["empty", "tensor", "dict_without_keys", "model_is_a_tensor"])
def test_damaged_checkpoint_in_evaluate_exits_2(trained, tmp_path, monkeypatch, capsys, kind):
    run = tmp_path / trained.name
    shutil.copytree(trained, run)
    save_other_objects(kind, run / "ckpt-last.pt")
    code, err = evaluate_cli(monkeypatch, capsys, run, "--set", *EVAL_SET)
    assert_one_line_error(code, err, "ckpt-last.pt")
    assert not (run / "eval_result.npy").exists()


def test_exception_without_message_still_gives_a_message():
    assert errors.first_line(EOFError()) == "EOFError"
    assert errors.first_line(ValueError("first\nsecond")) == "first"


# ----------------------------------------------------------------------------- 3. splits

@pytest.mark.parametrize("sets, word", [
    ({"train_env_ratio": 0.0}, "no training task"),
    ({"train_env_ratio": 1.0}, "no held-out test task"),
    ({"grid_size": 2, "train_env_ratio": 0.9}, "no held-out test task"),   # 4 tasks: round(3.6) = 4 train
    ({"grid_size": 2, "train_env_ratio": 0.1}, "no training task"),        # round(0.4) = 0
    ({"train_env_ratio": 0.2, "val_env_ratio": 0.2}, "no training task"),  # every non-test task validates
])
def test_split_without_training_or_held_out_task_is_refused(sets, word):
    with pytest.raises(ConfigError) as e:
        load_config([ALG, ENV], sets)
    assert word in str(e.value) and "train_env_ratio" in str(e.value)


def test_script_refuses_empty_split_before_any_work(tmp_path, monkeypatch, capsys):
    code, err = collect_cli(monkeypatch, capsys, ALG, ENV, "--set", "train_env_ratio=1.0", f"dataset_dir={tmp_path}")
    assert_one_line_error(code, err, "train_env_ratio")
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- 4. seeds

@pytest.mark.parametrize("key", ["seed", "alg_seed", "env_split_seed", "eval_seed"])
@pytest.mark.parametrize("value", [-1, 2**64, 10**30])
def test_seeds_numpy_or_torch_refuse_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config([], {key: value})


def test_largest_seed_works_everywhere():
    big = 2**63 - 1
    cfg = load_config([], {"seed": big, "alg_seed": big, "env_split_seed": big, "eval_seed": big})
    runtime.seed_everything(cfg["seed"])
    np.random.default_rng([cfg["seed"] + 1, 0, 5])  # the test-stream batches use seed + 1
    assert len(envs.task_split(cfg)) == 81


# ----------------------------------------------------------------------------- 5. sizes

def test_model_that_cannot_fit_is_refused_before_any_work(data_dir, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    code, err = train_cli(monkeypatch, capsys, cli_sets(data_dir, runs, extra=["tf_n_embd=65536"]))
    assert_one_line_error(code, err, "needs about", "GB", "tf_n_embd")
    assert not runs.exists()


def test_training_data_needs_no_memory_of_its_own(data_dir, tmp_path, monkeypatch, capsys):
    """Windows are read from the file on demand (dataset.py): only the model must fit."""
    monkeypatch.setattr(runtime, "available_memory", lambda device: 100_000)  # the data is ~0.6 MB
    monkeypatch.setattr(train, "check_memory", runtime.check_memory)
    monkeypatch.setattr(train, "memory_estimate", lambda *a, **k: {"model": 1})
    code, err = train_cli(monkeypatch, capsys, cli_sets(data_dir, tmp_path / "runs"))
    assert code == 0, err


@pytest.mark.parametrize("sets", [["n_stream=1000000000"], ["total_source_timesteps=100000000000000"],
                                  ["env=dark_key_to_door", "n_process=1000000", "backend=sb3"]])
def test_collection_that_cannot_fit_is_refused_before_any_work(tmp_path, monkeypatch, capsys, sets):
    code, err = collect_cli(monkeypatch, capsys, ALG, ENV, "--set", *sets, f"dataset_dir={tmp_path}")
    assert_one_line_error(code, err, "needs about", "n_stream")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("sets", [["eval_rollouts=1000000000"], ["eval_episodes=1000000000000"]])
def test_evaluation_that_cannot_fit_is_refused_before_any_work(trained, tmp_path, monkeypatch, capsys, sets):
    run = tmp_path / trained.name
    shutil.copytree(trained, run)
    code, err = evaluate_cli(monkeypatch, capsys, run, "--set", *sets, "device=cpu")
    assert_one_line_error(code, err, "needs about", "eval_rollouts")
    assert not (run / "eval_result.npy").exists()


# ----------------------------------------------------------------------------- 7. damaged task groups

def damage(path: Path):
    """Damage three training tasks (2, 3, 4) of a history file in three ways."""
    with h5py.File(path, "a") as f:
        del f["2"]["rewards"]                                   # a dataset missing
        del f["3"]["actions"]
        f["3"]["actions"] = np.zeros((7, 3), dtype=np.int16)   # a wrong shape
        chunk = f["4"]["states"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:                              # a chunk that no longer decompresses
        fh.seek(chunk.byte_offset)
        fh.write(b"\xff" * chunk.size)


@pytest.fixture
def damaged_data(tmp_path):
    cfg = make_cfg(tmp_path / "data", extra=["backend=batched", "n_process=1", "n_epochs=1"])
    path = build_history_file(cfg)
    damage(path)
    return cfg, path


def test_damaged_tasks_are_found(damaged_data):
    cfg, path = damaged_data
    header = history.read_header(path)
    bad = history.damaged_tasks(path, header, header["done"])
    assert sorted(bad) == [2, 3, 4]
    assert "rewards" in bad[2] and "missing" in bad[2]
    assert "actions" in bad[3] and "[7, 3]" in bad[3]
    assert bad[4]  # h5py's read error, e.g. "Can't synchronously read data (filter returned failure ...)"
    assert history.damaged_tasks(path, header, [0, 1, 5]) == {}


def test_training_on_damaged_tasks_exits_2_before_any_step(damaged_data, tmp_path, monkeypatch, capsys):
    cfg, path = damaged_data
    runs = tmp_path / "runs"
    sets = cli_sets(path.parent, runs, extra=["backend=batched", "n_process=1", "n_epochs=1"])
    code, err = train_cli(monkeypatch, capsys, sets)
    assert_one_line_error(code, err, "damaged", "task 2: rewards is missing", "collect.py")
    assert not (run_path(make_cfg(path.parent, runs)) / "ckpt-last.pt").exists()


def test_collect_repairs_damaged_tasks_and_keeps_the_others(damaged_data, capsys):
    cfg, path = damaged_data
    n = len(envs.task_list(cfg))
    with h5py.File(path, "r") as f:
        kept = {i: history.read_task(f, i) for i in (0, 1, 5, n - 1)}
    collect.collect(cfg, path, list(range(n)))
    out = capsys.readouterr().out
    assert "3 damaged tasks will be collected again" in out and f"{n - 3} of {n} tasks already collected" in out
    header = history.read_header(path)
    assert header["done"] == list(range(n))
    assert history.damaged_tasks(path, header, header["done"]) == {}
    with h5py.File(path, "r") as f:
        for i, arrays in kept.items():
            again = history.read_task(f, i)
            for name in history.FIELDS:
                np.testing.assert_array_equal(arrays[name], again[name])
        assert f["2"].attrs["backend"] == "batched" and f["0"].attrs["backend"] == "random"


def test_merge_refuses_a_slice_with_damaged_tasks(damaged_data, tmp_path, monkeypatch, capsys):
    cfg, path = damaged_data
    sets = cli_sets(tmp_path / "out", extra=["backend=batched", "n_process=1", "n_epochs=1"])
    code, err = collect_cli(monkeypatch, capsys, *config_files(), "--set", *sets, "--merge", path)
    assert_one_line_error(code, err, "damaged", str(path))
    assert not (tmp_path / "out" / path.name).exists()


@pytest.mark.parametrize("attr, value", [("split", "{not json"), ("collection_config", "{}"),
                                         ("collection_config", "[1, 2]"), ("format_version", "one")])
def test_damaged_header_attributes_are_one_error(tmp_path, attr, value):
    cfg = make_cfg(tmp_path)
    path = build_history_file(cfg, task_indices=[0])
    with h5py.File(path, "a") as f:
        f.attrs[attr] = value
    with pytest.raises(UserError, match="header"):
        history.read_header(path)


# ----------------------------------------------------------------------------- 8. output paths

def test_file_in_place_of_the_run_directory_exits_2_before_any_work(data_dir, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    runs.write_text("not a directory")
    code, err = train_cli(monkeypatch, capsys, cli_sets(data_dir, runs))
    assert_one_line_error(code, err, "run directory", str(runs))
    assert runs.read_text() == "not a directory"


def test_file_in_place_of_the_dataset_directory_exits_2(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "datasets"
    blocker.write_text("x")
    code, err = collect_cli(monkeypatch, capsys, ALG, ENV, "--set", "grid_size=3", f"dataset_dir={blocker}")
    assert_one_line_error(code, err, "dataset directory", str(blocker))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_read_only_run_directory_exits_2(data_dir, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o555)
    try:
        code, err = train_cli(monkeypatch, capsys, cli_sets(data_dir, runs))
    finally:
        runs.chmod(0o755)
    assert_one_line_error(code, err, "run directory")


def test_unwritable_directory_is_found_by_the_probe(tmp_path, monkeypatch):
    """What a read-only directory or file system does to the probe (simulated: tests may run as root)."""
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(files.tempfile, "TemporaryFile", refuse)
    with pytest.raises(UserError, match="cannot write to run directory .*Permission denied"):
        files.ensure_writable_dir(tmp_path, "run directory")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    with pytest.raises(OSError):
        with files.atomic_write(path, "w") as f:
            f.write("half")
            raise OSError(28, "No space left on device")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


def test_atomic_write_never_replaces_a_directory_or_device(tmp_path):
    for path in (tmp_path, Path("/dev/null")):
        with pytest.raises(UserError, match="not a regular file"):
            with files.atomic_write(path) as f:
                f.write(b"x")
    assert Path("/dev/null").is_char_device()


def test_os_error_is_one_line_and_exit_2(monkeypatch, capsys):
    def main():
        raise OSError(28, "No space left on device", "/data/x.hdf5")
    code, err = run_in_process(monkeypatch, capsys, "x.py", main, [])
    assert_one_line_error(code, err, "No space left on device", "/data/x.hdf5")


# ----------------------------------------------------------------------------- 9. evaluate.py checks first

@pytest.mark.parametrize("problem", ["missing", "no_checkpoint", "damaged_checkpoint", "bad_plot_suffix",
                                     "plot_is_a_directory", "plot_is_a_device"])
def test_evaluate_checks_every_run_and_the_plot_before_evaluating(trained, tmp_path, monkeypatch, capsys, problem):
    first, second = tmp_path / "a" / trained.name, tmp_path / "b" / trained.name
    shutil.copytree(trained, first)
    shutil.copytree(trained, second)
    plot = tmp_path / "cmp.png"
    if problem == "missing":
        shutil.rmtree(second)
    elif problem == "no_checkpoint":
        (second / "ckpt-last.pt").unlink()
    elif problem == "damaged_checkpoint":
        (second / "ckpt-last.pt").write_bytes(b"")
    elif problem == "bad_plot_suffix":
        plot = tmp_path / "cmp.notaformat"
    elif problem == "plot_is_a_device":
        plot = Path("/dev/null")  # must never be replaced by a file
    else:
        plot = tmp_path / "plots"
        plot.mkdir()
    before = snapshot(first)
    code, err = evaluate_cli(monkeypatch, capsys, first, second, "--plot", plot, "--set", *EVAL_SET)
    assert_one_line_error(code, err)
    assert snapshot(first) == before  # the first run was not evaluated


def test_evaluate_creates_a_missing_plot_directory(trained, tmp_path, monkeypatch, capsys):
    first, second = tmp_path / "a" / trained.name, tmp_path / "b" / trained.name
    shutil.copytree(trained, first)
    shutil.copytree(trained, second)
    plot = tmp_path / "new" / "dir" / "cmp.pdf"
    code, err = evaluate_cli(monkeypatch, capsys, first, second, "--plot", plot, "--set", *EVAL_SET)
    assert code == 0, err
    assert plot.read_bytes()[:4] == b"%PDF"
    assert (first / "eval_summary.json").exists() and (second / "eval_summary.json").exists()


# ----------------------------------------------------------------------------- 10. pipeline --set

def test_pipeline_accumulates_repeated_set(tmp_path):
    """With only the last --set kept, the error would name n_stream, not the unknown key."""
    proc = subprocess.run([sys.executable, "scripts/pipeline.py", "--set", "n_trasnit=10", f"dataset_dir={tmp_path}",
                           "--set", "n_stream=0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "n_trasnit")
    assert not any(tmp_path.iterdir())


def test_pipeline_checks_output_directories_before_collecting(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, "scripts/pipeline.py", "--seeds", "0", "--variants", "AD",
                           "--set", f"dataset_dir={tmp_path}/data", "--set", f"run_dir={blocker}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "run directory")
    assert "collect.py" not in proc.stdout


# ----------------------------------------------------------------------------- 13. progress bar

def test_collection_progress_counts_env_steps(tmp_path, monkeypatch, capsys):
    """All tasks trained together finish at the very end: the bar must move with env steps."""
    cfg = make_cfg(tmp_path)
    path = dataset_path(cfg)
    todo = list(range(len(envs.task_list(cfg))))
    per_task = history.steps_per_stream(cfg) * cfg["n_stream"]
    bars, seen = [], []

    class Recorder(collect.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bars.append(self)

    def backend(cfg, indices, tasks, on_done, progress):
        for _ in range(history.n_rollouts(cfg)):  # like the batched backend: every rollout of every task
            progress(0, len(indices) * cfg["n_steps"] * cfg["n_stream"])
            seen.append(bars[0].n)
        on_done(random_histories(cfg, indices))
        progress(len(indices), 0)

    monkeypatch.setattr(collect, "tqdm", Recorder)
    monkeypatch.setattr(collect.registry, "collect", backend)
    collect.collect(cfg, path, todo)
    bar = bars[0]
    assert bar.total == len(todo) * per_task and bar.n == bar.total
    assert seen[0] > 0 and seen == sorted(seen)  # moving before any task finished
    assert bar.unit == "step"
    assert f"tasks={len(todo)}/{len(todo)}" in capsys.readouterr().err
