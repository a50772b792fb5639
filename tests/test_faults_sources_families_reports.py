"""Bad inputs and faults of the sources other than PPO, the bandit and point-robot families,
max_tasks, the memory study and the report scripts: each ends in one line and exit code 2,
before any long work, with nothing on disk changed. One section per class of fault."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_in_process import assert_one_line_error, run_in_process

import collect
from cli import load_config
from config.schema import FAMILIES
from env import bandit
from env.family import MAX_TASKS
from errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
ALG, ENV = ROOT / "config/algorithm/ppo_darkroom.yaml", ROOT / "config/env/darkroom.yaml"
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))



def script(*args, timeout=120):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stderr, proc.stdout


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. sizes and draw loops

BANDIT = {"env": "bandit", "horizon": 1}
# family settings at the largest sizes allowed, and far beyond them
AT_BOUNDS = [
    {"env": "darkroom", "grid_size": 64},
    {"env": "dark_key_to_door", "grid_size": 17},
    {**BANDIT, "bandit_tasks": MAX_TASKS, "n_arms": 2},
    {**BANDIT, "bandit_tasks": 50_000, "n_arms": 50, "bandit_min_gap": 0.99 * bandit.largest_gap(50_000, 50)},
    {**BANDIT, "bandit_tasks": 2_500, "n_arms": 1000, "bandit_min_gap": 0.99 * bandit.largest_gap(2_500, 1000)},
    {"env": "point_robot", "robot_goals": MAX_TASKS},
    {"env": "darkroom", "max_tasks": 10**15},
]
ABSURD = [
    ({"env": "dark_key_to_door", "grid_size": 64}, "grid_size <= 17"),
    ({**BANDIT, "bandit_tasks": 10**12}, "bandit_tasks <="),
    ({**BANDIT, "n_arms": 10**9}, "n_arms <="),
    ({**BANDIT, "n_arms": 1000}, "bandit_min_gap <="),           # the gap of 0.1 is (almost) never drawn
    ({**BANDIT, "n_arms": 50, "bandit_min_gap": 0.89}, "bandit_min_gap <="),
    ({**BANDIT, "bandit_min_gap": 1.0}, "bandit_min_gap"),
    ({"env": "point_robot", "robot_goals": 10**12}, "robot_goals <="),
]


@pytest.mark.parametrize("sets", AT_BOUNDS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_config_check_at_the_bounds_ends_without_a_hang(sets):
    # CPU time of this process, not wall time: other processes on the machine do not count;
    # a draw loop that cannot end, or billions of tasks built, take far longer than this
    tic = time.process_time()
    load_config([ALG], sets)
    assert time.process_time() - tic < 5.0


@pytest.mark.slow
@pytest.mark.parametrize("sets", AT_BOUNDS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_config_check_at_the_bounds_returns_within_a_second(sets):
    tic = time.process_time()  # 0.6 s at most on a 2-core machine (the 50-arm bandit at its largest gap)
    load_config([ALG], sets)
    assert time.process_time() - tic < 1.0


@pytest.mark.parametrize("sets, fix", ABSURD, ids=[f"{i}" for i in range(len(ABSURD))])
def test_absurd_family_sizes_are_refused_fast_with_the_value_that_works(sets, fix):
    tic = time.process_time()
    with pytest.raises(ConfigError) as e:
        load_config([ALG], sets)
    assert time.process_time() - tic < 5.0
    assert fix in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_every_built_in_family_counts_its_tasks_without_building_them():
    """The size bound needs the count before the list exists."""
    for name, family in FAMILIES.items():
        cfg = load_config([ALG], {"env": name, "horizon": 1} if name == "bandit" else {"env": name})
        assert family.n_tasks(cfg) == len(family.tasks(cfg)), name
        assert family.size_keys, name


def test_bandit_task_draw_ends_even_where_the_estimate_is_wrong(monkeypatch):
    monkeypatch.setattr(bandit, "DRAW_BUDGET", 1000)
    tic = time.perf_counter()
    with pytest.raises(ConfigError, match="bandit_min_gap <="):
        bandit.draw_tasks(500, 20, 0.5)
    assert time.perf_counter() - tic < 1.0


def test_bandit_task_list_is_the_one_datasets_were_made_with():
    """The block-wise draw gives the list the row-by-row draw gave (checked against its first tasks)."""
    rng = np.random.default_rng(bandit.TASK_SEED)
    old = []
    while len(old) < 20:
        means = np.round(rng.random(5), 3)
        top2 = np.sort(means)[-2:]
        if top2[1] - top2[0] >= 0.1 - 1e-9:
            old.append(means.tolist())
    assert bandit.draw_tasks(20, 5, 0.1) == old


# ----------------------------------------------------------------------------- 9. PPO's rules and the other sources

SCRIPTED = [ROOT / "config/algorithm/noisy_expert_dark_key_to_door.yaml",
            ROOT / "config/algorithm/posterior_sampling_dark_key_to_door.yaml"]


@pytest.mark.parametrize("alg", SCRIPTED, ids=lambda p: p.stem)
def test_other_sources_skip_ppo_minibatch_checks(alg):
    cfg = load_config([alg, ROOT / "config/env/dark_key_to_door_5x5.yaml"], {"batch_size": 7, "n_stream": 5})
    assert cfg["batch_size"] == 7


@pytest.mark.parametrize("alg", SCRIPTED, ids=lambda p: p.stem)
def test_other_sources_refuse_learners_per_task(alg):
    with pytest.raises(ConfigError, match="learners_per_task=2 applies to alg=PPO only"):
        load_config([alg, ROOT / "config/env/dark_key_to_door_5x5.yaml"], {"learners_per_task": 2})


def test_ppo_still_checks_minibatches():
    with pytest.raises(ConfigError, match="batch_size"):
        load_config([ALG, ENV], {"batch_size": 7})


def test_data_identity_holds_only_keys_that_change_the_data():
    from config.loading import collection_config
    env = ROOT / "config/env/dark_key_to_door_5x5.yaml"
    expert = collection_config(load_config([SCRIPTED[0], env]))
    psrl = collection_config(load_config([SCRIPTED[1], env]))
    ppo = collection_config(load_config([ALG, env]))
    for key in ("batch_size", "n_epochs", "source_lr", "learners_per_task"):
        assert key not in expert and key not in psrl and key in ppo
    assert "noise_decay_episodes" in expert and "noise_decay_episodes" not in psrl | ppo


def test_other_source_dataset_recorded_with_ppo_keys_still_matches(tmp_path):
    """A file collected when the PPO keys were part of every identity is the same data."""
    from algorithm import history
    from config.loading import collection_config
    cfg = load_config([SCRIPTED[1], ROOT / "config/env/dark_key_to_door_5x5.yaml"], {"dataset_dir": str(tmp_path)})
    stored = collection_config(cfg) | {"batch_size": 40, "n_epochs": 20, "learners_per_task": 1}
    history.check_matches(tmp_path / "x.hdf5", {"collection_config": stored}, cfg)
    with pytest.raises(UserError, match="n_stream"):
        history.check_matches(tmp_path / "x.hdf5", {"collection_config": stored | {"n_stream": 3}}, cfg)


# ----------------------------------------------------------------------------- 2. the memory study's budgets

@pytest.mark.parametrize("args, words", [
    (["--env", "bandit"], ["ladders", "--env bandit"]),
    (["--env", "point_robot", "--budgets", "10"], ["ladders"]),
    (["--budgets", "0"], ["--budgets 0", "at least 2"]),
    (["--budgets", "10", "100000"], ["--budgets 100000", "longer than a training stream"]),
])
def test_memory_study_refuses_before_collecting(tmp_path, args, words):
    code, err, out = script(SCRIPTS / "pipeline.py", "--study", "memory", *args, "--set", f"dataset_dir={tmp_path}/d",
                            f"run_dir={tmp_path}/r")
    assert_one_line_error(code, err, *words)
    assert "collect.py" not in out and not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- 6. flags that would be ignored

@pytest.mark.parametrize("args, words", [
    (["--study", "memory", "--table-only"], ["--table-only", "--study"]),
    (["--budgets", "10"], ["--budgets", "--study memory"]),
])
def test_pipeline_refuses_flags_it_would_ignore(tmp_path, args, words):
    code, err, out = script(SCRIPTS / "pipeline.py", *args, "--set", f"dataset_dir={tmp_path}/d", f"run_dir={tmp_path}/r")
    assert_one_line_error(code, err, *words)
    assert not any(tmp_path.iterdir())


def test_collect_refuses_tasks_with_merge(tmp_path, monkeypatch, capsys):
    code, err = run_in_process(monkeypatch, capsys, "collect.py", collect.main,
                               [ALG, ENV, "--set", f"dataset_dir={tmp_path}", "--tasks", "0:3", "--merge", "a.hdf5"])
    assert_one_line_error(code, err, "--tasks", "--merge")
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- 11. argument errors are one line

@pytest.mark.parametrize("argv", [
    ["scripts/pipeline.py", "--jobs", "x"], ["scripts/pipeline.py", "--env", "nope"], ["scripts/pipeline.py", "--bogus"],
    ["collect.py", "--tasks"], ["collect.py", "--bogus"], ["scripts/compare_runs.py"],
    ["scripts/source_curve.py", "a", "--split", "nope"], ["scripts/key_to_door_outcomes.py", "--episodes", "x"],
    ["scripts/bandit_baselines.py"],
], ids=lambda a: "-".join(a).replace("/", "_"))
def test_argument_errors_are_one_line(argv):
    code, err, _ = script(*argv)
    assert_one_line_error(code, err, "--help")


# ----------------------------------------------------------------------------- 7. silent wrong inputs

def test_duplicate_key_in_a_config_file_is_refused_with_its_line(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("env: darkroom\ngrid_size: 5\nhorizon: 10\ngrid_size: 7\n")
    with pytest.raises(ConfigError) as e:
        load_config([path])
    assert "grid_size" in str(e.value) and "line 4" in str(e.value) and "line 2" in str(e.value)


def test_duplicate_key_in_a_nested_mapping_or_included_file_is_refused(tmp_path):
    (tmp_path / "inc.yaml").write_text("horizon: 10\nhorizon: 12\n")
    (tmp_path / "main.yaml").write_text("include: inc.yaml\n")
    with pytest.raises(ConfigError, match="inc.yaml.*horizon"):
        load_config([tmp_path / "main.yaml"])


@pytest.mark.parametrize("sets", [{"eval_tasks": "3"}, {"eval_tasks": "3,3"},
                                  {"grid_size": 3, "train_env_ratio": 0.9, "eval_split": "test"}])
def test_shuffle_ablation_with_one_task_is_refused(sets):
    with pytest.raises(ConfigError, match="eval_memory=shuffle needs at least 2"):
        load_config([ALG, ENV], {"eval_memory": "shuffle", **sets})


def test_shuffle_ablation_with_two_tasks_is_allowed():
    load_config([ALG, ENV], {"eval_memory": "shuffle", "eval_tasks": "3,4"})


# ----------------------------------------------------------------------------- 10. messages that name the cause

@pytest.mark.parametrize("sets, words", [
    ({"max_tasks": 1}, ["max_tasks=1", "raise max_tasks"]),
    ({"env": "point_robot", "robot_goals": 2, "val_env_ratio": 0.5}, ["robot_goals=2", "raise robot_goals"]),
    ({"grid_size": 2, "train_env_ratio": 1.0}, ["no held-out test task", "lower train_env_ratio"]),
])
def test_split_message_names_the_real_cause(sets, words):
    with pytest.raises(ConfigError) as e:
        load_config([ALG], sets)
    for w in words:
        assert w in str(e.value), str(e.value)
    if "max_tasks" in sets or "robot_goals" in sets:
        assert "lower train_env_ratio" not in str(e.value)


# ----------------------------------------------------------------------------- 3. damaged evaluation outputs

def fake_evaluation(run: Path, tag: str = "", n_tasks: int = 3, n_rollouts: int = 2, n_episodes: int = 12):
    """An evaluated run as evaluate.py leaves it (the parts the report scripts read)."""
    import report
    run.mkdir(parents=True, exist_ok=True)
    (run / "ckpt-last.pt").write_bytes(b"x")
    summary_path, returns_path = report.evaluation_files(run, tag)
    summary = {"per_task": [{"optimal": 2.0} for _ in range(n_tasks)], "n_rollouts": n_rollouts,
               "optimal_return": [2.0] * n_tasks * n_rollouts, "n_episodes": n_episodes, "tasks": list(range(n_tasks)),
               "eval_split": "test", "temperature": 0.5, "greedy": False, "seed": 0, "memory": "keep"}
    summary_path.write_text(json.dumps(summary))
    np.save(returns_path, np.ones((n_tasks * n_rollouts, n_episodes), dtype=np.float32))
    return summary_path, returns_path


DAMAGE = {
    "summary_empty": lambda s, r: s.write_text(""),
    "summary_truncated": lambda s, r: s.write_text(s.read_text()[:30]),
    "summary_not_json": lambda s, r: s.write_bytes(b"\x89PNG\r\n\x1a\n\xff"),
    "summary_a_list": lambda s, r: s.write_text("[1, 2]"),
    "summary_missing_keys": lambda s, r: s.write_text(json.dumps({"n_rollouts": 2})),  # no per_task
    "result_empty": lambda s, r: r.write_bytes(b""),
    "result_truncated": lambda s, r: r.write_bytes(r.read_bytes()[:100]),
    "result_not_npy": lambda s, r: r.write_text("not numpy"),
    "result_wrong_shape": lambda s, r: np.save(r, np.ones((5, 12))),
    "result_one_dim": lambda s, r: np.save(r, np.ones(72)),
    "result_object": lambda s, r: np.save(r, np.array([{"a": 1}] * 6, dtype=object).reshape(6, 1)),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_evaluation_is_one_user_error_naming_file_and_fix(tmp_path, kind):
    import report
    run = tmp_path / "AD-darkroom-seed0"
    summary, returns = fake_evaluation(run)
    DAMAGE[kind](summary, returns)
    with pytest.raises(UserError) as e:
        report.load_evaluation(run)
    msg = str(e.value)
    assert "\n" not in msg and f"evaluate.py {run}" in msg, msg
    assert (summary.name if kind.startswith("summary") else returns.name) in msg, msg


def test_missing_run_folder_and_unfinished_run_say_so(tmp_path):
    import report
    with pytest.raises(UserError, match="run folder not found"):
        report.load_evaluation(tmp_path / "nope")
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(UserError, match="no checkpoint yet: finish its training"):
        report.load_evaluation(tmp_path / "unfinished")


@pytest.mark.parametrize("tool", ["compare_runs", "key_to_door_outcomes"])
def test_report_scripts_turn_damage_into_one_line(tmp_path, tool):
    base, new = tmp_path / "base" / "AD-dark_key_to_door-seed0", tmp_path / "new" / "AD-dark_key_to_door-seed0"
    for run in (base, new):
        fake_evaluation(run)
        (run / "config.yaml").write_text("env: dark_key_to_door\n")
    DAMAGE["result_truncated"](None, new / "eval_result.npy")
    args = [base.parent, new.parent] if tool == "compare_runs" else [new, "--no-source"]
    code, err, _ = script(SCRIPTS / f"{tool}.py", *args)
    assert_one_line_error(code, err, "eval_result.npy", "evaluate.py")


# ----------------------------------------------------------------------------- 4. output paths checked first

def test_bandit_baselines_checks_out_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err, _ = script(SCRIPTS / "bandit_baselines.py", tmp_path / "no_run", "--out", blocker / "table.md")
    assert_one_line_error(code, err, "table.md")


def test_output_path_probe_refuses_directories_and_read_only_files(tmp_path, monkeypatch):
    import files
    with pytest.raises(UserError, match="not a regular file"):
        files.check_output_path(tmp_path)
    out = tmp_path / "t.md"
    out.write_text("old")
    monkeypatch.setattr(files.os, "access", lambda *a: False)  # tests may run as root
    with pytest.raises(UserError, match="read-only"):
        files.check_output_path(out)


def test_read_only_dataset_is_refused_before_any_task(tmp_path, monkeypatch, capsys):
    from fixtures_history import build_history_file, make_cfg

    import files
    cfg = make_cfg(tmp_path)
    path = build_history_file(cfg, task_indices=[0])
    before = path.read_bytes()
    real_access = files.os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if Path(p) == path else real_access(p, mode))
    monkeypatch.setattr(collect.registry, "collect", lambda *a: pytest.fail("work started"))
    with pytest.raises(UserError, match="read-only"):
        collect.collect(cfg, path, list(range(3)))
    assert path.read_bytes() == before


# ----------------------------------------------------------------------------- 5. a failed append leaves no journal

@pytest.mark.parametrize("fail_at", ["fsync", "journal"])
def test_failed_commit_rolls_back_and_leaves_no_journal(tmp_path, monkeypatch, fail_at):
    from fixtures_history import build_history_file, make_cfg, random_histories

    from algorithm import history, journal
    cfg = make_cfg(tmp_path)
    path = build_history_file(cfg, task_indices=[0])
    before = path.read_bytes()
    header = history.read_header(path)

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    if fail_at == "fsync":
        real = journal.os.fsync
        calls = []
        monkeypatch.setattr(journal.os, "fsync", lambda fd: calls.append(fd) or (full() if len(calls) == 2 else real(fd)))
    else:
        real_write = journal._write_journal
        monkeypatch.setattr(journal, "_write_journal",
                            lambda p, data, flags: full() if flags == journal.os.O_APPEND else real_write(p, data, flags))
    with pytest.raises(OSError):
        history.append_tasks(path, random_histories(cfg, [1]), header["tasks"], header["split"], "random")
    monkeypatch.undo()
    assert not journal.journal_path(path).exists() and not history.has_leftovers(path)
    assert path.read_bytes() == before
    assert history.read_header(path)["done"] == [0]


# ----------------------------------------------------------------------------- 8. messages never ask to delete what was passed

@pytest.mark.parametrize("kind", ["config", "folder"])
def test_merge_of_a_config_file_or_folder_does_not_say_delete(tmp_path, monkeypatch, capsys, kind):
    given = tmp_path / ("env.yaml" if kind == "config" else "slices")
    given.write_text("env: darkroom\n") if kind == "config" else given.mkdir()
    code, err = run_in_process(monkeypatch, capsys, "collect.py", collect.main,
                               [ALG, ENV, "--set", f"dataset_dir={tmp_path}/out", "--merge", given])
    line = assert_one_line_error(code, err, str(given), "collect.py wrote")
    assert "delete" not in line and "move it away" not in line
    assert given.exists()
