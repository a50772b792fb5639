"""A command checks everything it can before it writes or starts work; a full disk during a
collection ends in one line and a rerun finishes the file; reports never combine runs or data
that do not belong together.

1. refusals before the run folder exists (train.py) and before the collection (pipeline.py);
2. the collection's memory estimate holds a scripted source's state (the Q tables), and a file
   with no finished task does not block a rerun with other sizes;
3. a full disk, a damaged task in source_curve.py, an unwritable page for config_docs.py: one line;
4. a source curve from data re-collected with other settings, a comparison plot of runs of other
   data, a table of runs made with other settings: refused or left out, never drawn;
5. messages: non-finite floats, --plot with one run, a source's keys set for another source.
"""
import errno
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_in_process import assert_one_line_error, run_in_process
from fixtures_history import build_history_file, cli_sets, config_files, make_cfg

import collect
import train
from algorithm import history, journal
from algorithm.history import dataset_path
from cli import check_training, load_config
from config.loading import parse_set
from errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
Q_K2D = [ROOT / "config/algorithm/q_learning_dark_key_to_door.yaml", ROOT / "config/env/dark_key_to_door_9x9_all.yaml"]
Q_TINY = ["grid_size=3", "horizon=10", "n_stream=2", "n_steps=10", "total_source_timesteps=80", "task_chunk=4",
          "n_process=1", "device=cpu"]


def tree(folder: Path) -> dict:
    """Every file under `folder` with its bytes: what a refused command must leave as it was."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


# ----------------------------------------------------------------------------- 1. refused before the run folder


@pytest.mark.parametrize("extra, words", [
    (["n_stream=1", "total_source_timesteps=200"], ["test_stream_ratio", "n_stream=1"]),
    (["val_env_ratio=0", "test_stream_ratio=0", "eval_interval=0"], ["test_stream_ratio=0", "val_env_ratio"]),
    (["n_transit=400"], ["n_transit=400", "200 steps"]),
    (["val_env_ratio=0"], ["eval_interval", "val_env_ratio"]),
])
def test_training_refused_by_its_config_before_the_run_folder(tmp_path, monkeypatch, capsys, extra, words):
    """The combinations the config alone decides: refused by the config check, with no data read."""
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError):
        check_training(make_cfg(tmp_path / "data", runs, extra=extra))
    code, err = run_in_process(monkeypatch, capsys, "train.py", train.main,
                               [*config_files(), "--set", *cli_sets(tmp_path / "data", runs, extra=extra)])
    assert_one_line_error(code, err, *words)
    assert not runs.exists() and not (tmp_path / "data").exists()


def test_training_refused_by_its_data_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    """The data's checks (a missing task, other settings) run before the run folder is claimed."""
    cfg = make_cfg(tmp_path / "data", tmp_path / "runs")
    build_history_file(cfg, task_indices=[0, 1])  # most training tasks missing
    code, err = run_in_process(monkeypatch, capsys, "train.py", train.main,
                               [*config_files(), "--set", *cli_sets(tmp_path / "data", tmp_path / "runs")])
    assert_one_line_error(code, err, "lacks", "collect.py")
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- 2. the pipeline checks first


@pytest.mark.parametrize("sets, words", [
    (["n_transit=100000"], ["n_transit=100000"]),
    (["eval_tasks=99999"], ["eval_tasks", "out of range"]),
    (["eval_split=val", "val_env_ratio=0"], ["val_env_ratio"]),
])
def test_pipeline_refuses_what_its_trainings_and_evaluations_would_before_collecting(tmp_path, monkeypatch,
                                                                                     capsys, sets, words):
    sys.path.insert(0, str(ROOT / "scripts"))
    import pipeline
    monkeypatch.setattr(pipeline, "run", lambda argv: pytest.fail(f"work started: {argv}"))
    code, err = run_in_process(monkeypatch, capsys, "pipeline.py", pipeline.main,
                               ["--size", "smoke", "--set", f"dataset_dir={tmp_path}/d", f"run_dir={tmp_path}/r",
                                *sets])
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "d").exists() and not (tmp_path / "r").exists()


def test_collection_memory_estimate_counts_the_q_tables(tmp_path, monkeypatch, capsys):
    """Q tables of 17 x 17 cells x 3 stages x actions per stream: refused before the file exists,
    with task_chunk (which leaves the data as it is) named first."""
    sets = ["grid_size=17", "n_stream=20000", "n_steps=50", "total_source_timesteps=1000000", "max_tasks=300",
            f"dataset_dir={tmp_path}"]
    monkeypatch.setattr(collect.registry, "collect", lambda *a: pytest.fail("work started"))
    code, err = run_in_process(monkeypatch, capsys, "collect.py", collect.main, [*Q_K2D, "--set", *sets])
    assert_one_line_error(code, err, "QLearning", "task_chunk")
    assert tree(tmp_path) == {}


def test_a_file_with_no_finished_task_does_not_block_a_rerun_with_other_sizes(tmp_path):
    big = load_config(Q_K2D, parse_set([*Q_TINY, "n_stream=4", f"dataset_dir={tmp_path}"]))
    small = load_config(Q_K2D, parse_set([*Q_TINY, f"dataset_dir={tmp_path}"]))
    import env as envs
    history.create_if_missing(dataset_path(big), big, envs.task_list(big), envs.task_split(big))  # then out of memory
    collect.collect(small, dataset_path(small), [0, 1])
    header = history.read_header(dataset_path(small))
    assert header["done"] == [0, 1] and header["collection_config"]["n_stream"] == 2


# ----------------------------------------------------------------------------- 3. a full disk is one line


def arrays(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {(g, k): f[g][k][()] for g in f for k in f[g]}


@pytest.mark.parametrize("where", ["journal", "create_dataset"])
def test_full_disk_during_collection_is_one_line_and_the_rerun_finishes_the_same_file(tmp_path, monkeypatch,
                                                                                     capsys, where):
    """The disk fills during the second append (simulated: an h5py write raises ENOSPC): one line,
    exit 2, the first chunk's tasks kept; rerun after freeing space: the arrays of a run never stopped."""
    argv = lambda d: [*Q_K2D, "--set", *Q_TINY, f"dataset_dir={d}", "max_tasks=12"]  # noqa: E731
    code, err = run_in_process(monkeypatch, capsys, "collect.py", collect.main, argv(tmp_path / "ref"))
    assert code == 0, err
    appends, writes = [], []
    real_append = history.append_tasks
    monkeypatch.setattr(history, "append_tasks", lambda *a, **k: appends.append(1) or real_append(*a, **k))

    def full(*a, **k):  # from the second append's sixth write on, the disk is full
        writes.append(len(appends))
        if len(appends) > 1 and writes.count(len(appends)) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)
    if where == "journal":  # the bytes h5py writes through the journal's file object
        real = journal.JournaledFile._write
        monkeypatch.setattr(journal.JournaledFile, "_write", lambda self, data: full(self, data))
    else:  # an h5py call that writes a dataset
        real = h5py.Group.create_dataset
        monkeypatch.setattr(h5py.Group, "create_dataset", full)
    code, err = run_in_process(monkeypatch, capsys, "collect.py", collect.main, argv(tmp_path / "full"))
    last = [ln for ln in err.splitlines() if ln.strip()][-1]  # after the progress bar
    assert_one_line_error(code, last, "the disk is full while writing", "safe", "rerun")
    assert "Traceback" not in err and "HDF5" not in err and len(appends) == 2
    path = next((tmp_path / "full").glob("*.hdf5"))
    assert 0 < len(history.read_header(path)["done"]) < 12 and not history.has_leftovers(path)
    monkeypatch.undo()
    code, err = run_in_process(monkeypatch, capsys, "collect.py", collect.main, argv(tmp_path / "full"))
    assert code == 0, err
    ref, got = arrays(next((tmp_path / "ref").glob("*.hdf5"))), arrays(path)
    assert ref.keys() == got.keys() and all(np.array_equal(ref[k], got[k]) for k in ref)


def test_source_curve_script_refuses_a_damaged_task_in_one_line(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import source_curve
    path = build_history_file(make_cfg(tmp_path))
    with h5py.File(path, "r+") as f:
        del f["3"]["rewards"]
    code, err = run_in_process(monkeypatch, capsys, "source_curve.py", source_curve.main, [path])
    assert_one_line_error(code, err, "damaged", "task 3", "collect.py")


def test_docs_generator_refuses_a_page_it_may_not_write_before_writing(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import config_docs

    import files
    before = config_docs.PAGE.read_bytes()
    real_access = files.os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if Path(p) == config_docs.PAGE
                        else real_access(p, mode))
    code, err = run_in_process(monkeypatch, capsys, "config_docs.py", lambda: sys.exit(config_docs.main()), [])
    assert_one_line_error(code, err, "read-only", "configuration.md")
    assert config_docs.PAGE.read_bytes() == before


# ----------------------------------------------------------------------------- 4. never mix data silently

TINY_RUN = ["eval_interval=0", "train_timesteps=4", "ckpt_interval=4", "eval_episodes=2"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Tiny trained runs of one variant on two datasets that differ in one collection key."""
    base = tmp_path_factory.mktemp("two_runs")
    out = {}
    for name, extra in (("a", []), ("b", ["source_lr=0.01"])):
        cfg = make_cfg(base / f"data_{name}", base / f"runs_{name}", extra=TINY_RUN + extra)
        build_history_file(cfg)
        out[name] = (cfg, train.train(cfg))
    return out


def test_source_curve_is_left_out_when_the_data_was_collected_again_with_other_settings(tmp_path, two_runs, capsys):
    import shutil

    import env as envs
    import evaluate
    cfg, _ = two_runs["a"]
    cfg = {**cfg, "dataset_dir": str(tmp_path)}
    tasks = envs.tasks_of_split(cfg, "test")
    shutil.copy(dataset_path(two_runs["a"][0]), dataset_path(cfg))
    assert evaluate.source_curve(cfg, tasks) is not None
    shutil.copy(dataset_path(two_runs["b"][0]), dataset_path(cfg))  # collected again at the same path
    assert evaluate.source_curve(cfg, tasks) is None
    assert "other settings" in capsys.readouterr().out


def test_comparison_plot_refuses_runs_of_other_data_before_any_evaluation(tmp_path, two_runs, monkeypatch, capsys):
    import evaluate
    (_, run_a), (_, run_b) = two_runs["a"], two_runs["b"]
    before = tree(run_a.parent) | tree(run_b.parent)
    code, err = run_in_process(monkeypatch, capsys, "evaluate.py", evaluate.main,
                               [run_a, run_b, "--plot", tmp_path / "cmp.png"])
    assert_one_line_error(code, err, "comparison plot", "source_lr")
    assert tree(run_a.parent) | tree(run_b.parent) == before and not (tmp_path / "cmp.png").exists()


def test_plot_asked_for_one_run_is_drawn(tmp_path, two_runs, monkeypatch, capsys):
    import evaluate
    code, err = run_in_process(monkeypatch, capsys, "evaluate.py", evaluate.main,
                               [two_runs["a"][1], "--plot", tmp_path / "one.png", "--set", "eval_rollouts=1"])
    assert code == 0, err
    assert (tmp_path / "one.png").read_bytes()[:4] == b"\x89PNG"


def test_table_of_finished_runs_refuses_a_run_made_with_other_settings(two_runs):
    sys.path.insert(0, str(ROOT / "scripts"))
    import pipeline

    from errors import UserError
    cfg, run = two_runs["a"]
    pipeline.check_made_with(run, cfg, eval_tag="T1")  # the run's own settings: fine
    with pytest.raises(UserError, match="other settings.*n_transit=40 \\(now 20\\)"):
        pipeline.check_made_with(run, {**cfg, "n_transit": 20}, eval_tag="T1")


# ----------------------------------------------------------------------------- 5. messages


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_named_as_such(value):
    for key in ("lr", "n_stream"):
        with pytest.raises(ConfigError, match=f"{key}=.*infinite and NaN values"):
            load_config([], parse_set([f"{key}={value}"]))


@pytest.mark.parametrize("alg, key, owner", [
    ("PPO", "q_alpha=0.5", "alg=QLearning"), ("QLearning", "noise_decay_episodes=10", "alg=NoisyExpert"),
    ("QLearning", "learners_per_task=2", "alg=PPO"), ("NoisyExpert", "q_replay=false", "alg=QLearning")])
def test_a_sources_key_set_for_another_source_is_refused_naming_its_source(alg, key, owner):
    with pytest.raises(ConfigError, match=f"{key.split('=')[0]}=.*applies to {owner} only"):
        load_config([], parse_set([f"alg={alg}", "env=dark_key_to_door", key]))


def test_tables_say_n_a_instead_of_nan():
    sys.path.insert(0, str(ROOT / "scripts"))
    import pipeline
    row = {"variant": "AD", "seeds": 1, "final": 0.0, "optimal": 0.0, "fraction": float("nan"),
           "per_seed": [float("nan")], "iqm": pipeline.report.format_iqm((float("nan"),) * 3), "first": 0.0,
           "episodes_to_80": [None], "source_episodes_to_80": None, "context": 4, "train_seconds": 1.0,
           "hardware": "CPU"}
    assert "nan" not in pipeline.result_table([row]) and "n/a" in pipeline.result_table([row])
