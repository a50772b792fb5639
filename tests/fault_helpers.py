"""What the fault tests share: the tiny darkroom configs, the commands run in this process, a
folder's snapshot, and a finished 4-step run on the shared `data_dir` dataset (tests/conftest.py)
to copy and damage (a module fixture: a test module imports it by name)."""
from pathlib import Path

import pytest
from cli_in_process import run_in_process
from fixtures_history import cli_sets, config_files, make_cfg

import collect
import evaluate
import train

ROOT = Path(__file__).resolve().parents[1]
ALG, ENV = ROOT / "config/algorithm/ppo_darkroom.yaml", ROOT / "config/env/darkroom.yaml"
TINY_RUN = ["train_timesteps=4", "ckpt_interval=4", "eval_interval=0"]
EVAL_SET = ["eval_episodes=2", "eval_rollouts=1", "device=cpu"]


def train_cli(monkeypatch, capsys, sets):
    return run_in_process(monkeypatch, capsys, "train.py", train.main, [*config_files(), "--set", *sets])


def evaluate_cli(monkeypatch, capsys, *args):
    return run_in_process(monkeypatch, capsys, "evaluate.py", evaluate.main, list(args))


def collect_cli(monkeypatch, capsys, *args):
    return run_in_process(monkeypatch, capsys, "collect.py", collect.main, list(args))


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes: what must not change when a command is refused."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A finished tiny run (4 steps) to copy and damage."""
    runs = tmp_path_factory.mktemp("faults_runs")
    return train.train(make_cfg(data_dir, runs, extra=TINY_RUN))


def resume_sets(data_dir, runs):
    return cli_sets(data_dir, runs, extra=TINY_RUN)
