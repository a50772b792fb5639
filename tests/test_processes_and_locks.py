"""No process outlives the command that started it, and one folder has one user at a time: a
killed collection takes its worker processes with it, a killed pipeline its running stage; a run
folder or dataset in use by another process is refused in one line (exit code 2) with nothing on
disk changed, and is free again once that process is gone."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_in_process import assert_one_line_error
from fault_helpers import (  # noqa: F401 (trained: a fixture)
    ALG,
    ENV,
    EVAL_SET,
    ROOT,
    collect_cli,
    evaluate_cli,
    resume_sets,
    snapshot,
    train_cli,
    trained,
)
from fixtures_history import build_history_file, make_cfg

import collect
import files
from algorithm.history import dataset_path
from cli import load_config
from errors import UserError

# ----------------------------------------------------------------------------- orphaned workers

def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # an exited orphan nobody reaps yet holds nothing


@pytest.mark.parametrize("backend, sig", [("batched", signal.SIGKILL), ("sb3", signal.SIGKILL),
                                         ("batched", signal.SIGTERM)], ids=["batched-kill9", "sb3-kill9", "batched-term"])
def test_collection_workers_exit_when_the_parent_is_killed(tmp_path, backend, sig):
    """Fault injection: kill the collection (-9, or plain kill) while its two worker processes train."""
    proc = subprocess.Popen([sys.executable, "collect.py", str(ALG), str(ENV), "--set", f"backend={backend}",
                             "n_process=2", "device=cpu", f"dataset_dir={tmp_path}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, workers = time.monotonic() + 120, []
        while time.monotonic() < deadline and len(workers) < 2:
            assert proc.poll() is None, "the collection ended before its workers started"
            workers = [c for c in children(proc.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
            time.sleep(0.2)
        assert len(workers) == 2, workers
        time.sleep(3)  # let them get to work
        proc.send_signal(sig)
        err = proc.communicate(timeout=30)[1]
        if sig == signal.SIGTERM:  # a plain kill stops like Ctrl-C: one line, the lock released
            assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err[-2000:]
            assert not list(tmp_path.glob("*.lock"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(w) for w in workers):
            time.sleep(0.2)
        left = [w for w in workers if alive(w)]
        for w in left:
            os.kill(w, signal.SIGKILL)
        assert not left, "worker processes outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_pipeline_stage_stops_when_the_pipeline_is_killed(tmp_path):
    """A stage left running after kill -9 of the pipeline would hold its dataset or run directory."""
    proc = subprocess.Popen([sys.executable, "scripts/pipeline.py", "--seeds", "0", "--variants", "AD", "--set",
                             f"dataset_dir={tmp_path}/data", f"run_dir={tmp_path}/runs", "device=cpu"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, stage = time.monotonic() + 120, []
        while time.monotonic() < deadline and not stage:
            assert proc.poll() is None, "the pipeline ended before its first stage started"
            stage = [c for c in children(proc.pid) if b"collect.py" in Path(f"/proc/{c}/cmdline").read_bytes()]
            time.sleep(0.2)
        assert stage
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and alive(stage[0]):
            time.sleep(0.2)
        if alive(stage[0]):
            os.kill(stage[0], signal.SIGKILL)
            pytest.fail("collect.py outlived the pipeline")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- concurrent use

HOLD = ("import sys, time; sys.path.insert(0, {root!r}); from files import locked; "
        "cm = locked({path!r}, 'x'); cm.__enter__(); print('held', flush=True); time.sleep(120)")


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the lock file `path`, as a running train.py or collect.py would."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), path=str(path))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_run_directory_in_use_is_refused_then_free_after_a_kill(data_dir, trained, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    run = runs / trained.name
    shutil.copytree(trained, run)
    holder = hold_lock(run / ".lock")
    try:
        before = snapshot(run)
        code, err = train_cli(monkeypatch, capsys, resume_sets(data_dir, runs))
        assert_one_line_error(code, err, "in use", f"pid {holder.pid}", "training")
        assert snapshot(run) == before
    finally:
        holder.kill()  # like kill -9: the lock file stays behind, the kernel drops the lock
        holder.wait()
    assert (run / ".lock").exists()
    code, err = train_cli(monkeypatch, capsys, resume_sets(data_dir, runs))
    assert code == 0, err
    assert not (run / ".lock").exists()


def test_same_evaluation_twice_at_once_is_refused_other_tags_and_training_are_not(trained, tmp_path, monkeypatch,
                                                                                    capsys):
    run = tmp_path / trained.name
    shutil.copytree(trained, run)
    holder = hold_lock(run / ".evaluation_keep.lock")  # an evaluate.py --tag keep at work
    try:
        before = snapshot(run)
        code, err = evaluate_cli(monkeypatch, capsys, run, "--tag", "keep", "--set", *EVAL_SET)
        assert_one_line_error(code, err, "in use", "evaluation keep")
        assert snapshot(run) == before
        with files.claim_run_dir(run):  # a training at work does not block an evaluation
            code, err = evaluate_cli(monkeypatch, capsys, run, "--tag", "drop", "--set", *EVAL_SET,
                                     "eval_memory=drop")
        assert code == 0, err
        assert (run / "eval_summary_drop.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_dataset_in_use_is_refused(tmp_path, monkeypatch, capsys):
    cfg = load_config([ALG, ENV], {"grid_size": 3, "dataset_dir": str(tmp_path)})
    path = dataset_path(cfg)
    holder = hold_lock(path.with_name(path.name + ".lock"))
    try:
        code, err = collect_cli(monkeypatch, capsys, ALG, ENV, "--set", "grid_size=3", f"dataset_dir={tmp_path}")
        assert_one_line_error(code, err, "in use", str(path))
        code, err = collect_cli(monkeypatch, capsys, ALG, ENV, "--set", "grid_size=3", f"dataset_dir={tmp_path}",
                                "--merge", path)
        assert code == 2
    finally:
        holder.kill()
        holder.wait()
    assert not path.exists()


def test_a_finished_dataset_in_use_is_read_not_refused(tmp_path, capsys):
    """Two pipelines on one finished dataset: the second's collect.py finds every task on
    disk without waiting for the lock the first one holds, and changes nothing."""
    cfg = make_cfg(tmp_path)
    path = build_history_file(cfg)
    before = snapshot(tmp_path)
    holder = hold_lock(path.with_name(path.name + ".lock"))
    try:
        collect.collect(cfg, path, list(range(25)))
        with pytest.raises(UserError, match="in use by another process"):  # a task missing: it must wait
            collect.collect(cfg, path, list(range(26)))
    finally:
        holder.kill()
        holder.wait()
    assert "25 of 25 tasks already collected, 0 to go" in capsys.readouterr().out
    # a killed run's leftover beside the finished file is the writer's to clear, under the lock
    stale = path.with_name(path.name + ".tmp")
    stale.write_bytes(b"left by a run killed while writing")
    collect.collect(cfg, path, list(range(25)))
    assert not stale.exists() and "25 of 25 tasks already collected" in capsys.readouterr().out
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.name.endswith(".lock")} == before


def test_memory_study_with_its_dataset_in_use_stops_in_one_line(tmp_path):
    """The study runs collect.py first; a refusal there ends the study with exit 2 and the
    stage's own message, not a traceback."""
    cfg = load_config([ALG, ENV], {"grid_size": 3, "dataset_dir": str(tmp_path)})
    path = dataset_path(cfg)
    holder = hold_lock(path.with_name(path.name + ".lock"))
    try:
        proc = subprocess.run([sys.executable, "scripts/pipeline.py", "--study", "memory", "--seeds", "0", "--variants",
                               "AD", "--budgets", "10", "--set", "grid_size=3", f"dataset_dir={tmp_path}",
                               f"run_dir={tmp_path / 'runs'}"], cwd=ROOT, capture_output=True, text=True)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "in use by another process" in proc.stderr and "Traceback" not in proc.stderr


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with files.locked(tmp_path / "l", "thing"):
        with pytest.raises(UserError, match="thing is in use"):
            with files.locked(tmp_path / "l", "thing"):
                pass
    assert not (tmp_path / "l").exists()
    with files.locked(tmp_path / "l", "thing"):
        pass
