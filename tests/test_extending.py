"""The extension points (docs/extending.md): a new environment family and a new model
variant, written in this file only against env.family.Family and model.variant.Variant, go
through collect.py, train.py and evaluate.py like the built-in ones.

- `corridor`: a 1-D darkroom. A line of `grid_size` cells, start in the middle, actions stay
  / left / right, an invisible goal cell with reward 1 on every step spent on it.
- `Memoryless`: a baseline variant that sees only the current step token (an embedding of
  the state and an MLP): no context at all. It reuses the AD windows for training.
"""
import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from cli_in_process import run_in_process

import collect
import env as envs
import evaluate
import model as variants
import train
from cli import run_path
from dataset import ADDataset, StepBatches
from env.family import Family
from model.ad import split_targets
from model.variant import Variant
from tokens import IGNORE

MOVES = np.array([0, -1, 1])  # stay, left, right


class BatchedCorridor:
    def __init__(self, goals, size: int, horizon: int):
        self.goals, self.size, self.horizon = np.asarray(goals), size, horizon

    def reset(self):
        self.pos, self.t = np.full(len(self.goals), self.size // 2), 0
        return self.pos[:, None].copy()

    def step(self, actions):
        self.pos = np.clip(self.pos + MOVES[np.asarray(actions)], 0, self.size - 1)
        self.t += 1
        rewards = (self.pos == self.goals).astype(np.float32)
        return self.pos[:, None].copy(), rewards, np.full(len(self.goals), self.t >= self.horizon)


class Corridor(Family):
    name = "corridor"

    def tasks(self, cfg):
        return [{"goal": g} for g in range(cfg["grid_size"])]

    def optimal_return(self, cfg, task):
        d = abs(task["goal"] - cfg["grid_size"] // 2)
        return float(min(cfg["horizon"], max(0, cfg["horizon"] - d + 1)))

    def n_actions(self, cfg):
        return len(MOVES)

    def observation_space(self, cfg):
        return gym.spaces.MultiDiscrete([cfg["grid_size"]])

    def make_batched_env(self, cfg, tasks):
        return BatchedCorridor([t["goal"] for t in tasks], cfg["grid_size"], cfg["horizon"])


class MemorylessModel(nn.Module):
    def __init__(self, inputs: dict, n_embd: int):
        super().__init__()
        self.state_emb = nn.Embedding(math.prod(inputs["state_cardinalities"]), n_embd)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(n_embd, inputs["n_actions"]))

    def forward(self, tokens, targets=None):
        logits = {"action": self.head(self.state_emb(tokens["state"]))}
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits["action"].flatten(0, 1), targets["action"].flatten(),
                                       ignore_index=IGNORE)

    @torch.no_grad()
    def metrics(self, tokens, logits, targets):
        valid = targets["action"] != IGNORE
        acc = (logits["action"].argmax(-1)[valid] == targets["action"][valid]).float().mean().item()
        return {"loss_action": self(tokens, targets)[1].item(), "acc_action": acc}


class NoMemory:
    """Rollout memory of Memoryless: the current step's token only."""
    max_tokens = 1

    def __init__(self, model):
        self.model = model

    def start_episode(self):
        return False

    def step(self, token):
        return self.model(token)[0]["action"][:, -1]


class Memoryless(Variant):
    name = "Memoryless"

    def build(self, cfg, inputs):
        return MemorylessModel(inputs, cfg["tf_n_embd"])

    def dataset(self, path, cfg, part):
        return ADDataset(path, cfg, part=part)

    def batches(self, dataset, batch_size, seed, rank, world, start, stop):
        return StepBatches(len(dataset), batch_size, seed, rank, start, stop)

    def collate(self, items):
        return split_targets(torch.utils.data.default_collate(items))

    def policy(self, model, cfg, batch, device, use_cache, memory, perm):
        memory = NoMemory(model)
        return memory, memory


@pytest.fixture
def registered(monkeypatch):
    """The family and the variant, registered for this test only (the registries are restored)."""
    monkeypatch.setitem(envs.FAMILIES, "corridor", Corridor())
    monkeypatch.setitem(variants.VARIANTS, "Memoryless", Memoryless())


DATA = ["env=corridor", "grid_size=7", "horizon=6", "n_stream=2", "n_steps=12", "batch_size=12",
        "total_source_timesteps=240", "n_epochs=2", "n_process=1", "test_stream_ratio=0.5",
        "train_env_ratio=0.6", "val_env_ratio=0.2", "device=cpu"]
TRAIN = ["model=Memoryless", "n_transit=12", "tf_n_embd=8", "train_batch_size=4", "train_timesteps=6",
         "warmup_steps=1", "log_interval=2", "test_interval=3", "eval_interval=3", "ckpt_interval=3",
         "eval_episodes=3", "eval_rollouts=2"]


def config_file(path, sets: list[str]):
    """A config file with these key=value items (what a user writes for the new family/variant)."""
    path.write_text("".join(f"{s.replace('=', ': ', 1)}\n" for s in sets))
    return path


def test_a_new_family_and_a_new_variant_run_through_collect_train_and_evaluate(registered, tmp_path, monkeypatch,
                                                                               capsys):
    data = [config_file(tmp_path / "corridor.yaml", DATA)]
    model = config_file(tmp_path / "memoryless.yaml", TRAIN)
    dirs = ["--set", f"dataset_dir={tmp_path / 'data'}", f"run_dir={tmp_path / 'runs'}"]
    code, err = run_in_process(monkeypatch, capsys, "collect.py", collect.main, [*data, *dirs])
    assert code == 0, err
    code, err = run_in_process(monkeypatch, capsys, "train.py", train.main, [*data, model, *dirs])
    assert code == 0, err
    run = tmp_path / "runs" / "Memoryless-corridor-seed0"
    assert (run / "ckpt-last.pt").is_file()
    code, err = run_in_process(monkeypatch, capsys, "evaluate.py", evaluate.main, [run])
    assert code == 0, err
    summary = json.loads((run / "eval_summary.json").read_text())
    goals = [t["goal"] for t in summary["tasks"]]
    assert set(goals) <= set(range(7)) and summary["split"] == ["test"] * len(goals)
    assert summary["optimal_return"] == [6.0 - abs(g - 3) + 1 if abs(g - 3) else 6.0 for g in goals]
    assert summary["max_context_tokens"] == 1 and np.load(run / "eval_result.npy").shape == (len(goals), 3)


def test_the_new_names_are_config_choices_and_the_old_ones_are_refused_without_them(registered, tmp_path,
                                                                                     monkeypatch, capsys):
    from cli import load_config
    from config.loading import parse_set
    cfg = load_config([], parse_set(DATA + TRAIN))
    assert run_path(cfg).name == "Memoryless-corridor-seed0"
    assert envs.model_inputs(cfg) == {"n_actions": 3, "state_cardinalities": [7]}
    monkeypatch.delitem(variants.VARIANTS, "Memoryless")
    files = [config_file(tmp_path / "corridor.yaml", DATA), config_file(tmp_path / "memoryless.yaml", TRAIN)]
    code, err = run_in_process(monkeypatch, capsys, "train.py", train.main, files)
    assert code == 2 and "model='Memoryless'" in err and "'AD'" in err and len(err.strip().splitlines()) == 1


class BatchedPointLine:
    """A point on [-1, 1] moved by 0.25 per step; reward 1 within 0.2 of the goal."""

    def __init__(self, goals, horizon: int):
        self.goals, self.horizon = np.asarray(goals, dtype=np.float32), horizon

    def reset(self):
        self.pos, self.t = np.zeros(len(self.goals), dtype=np.float32), 0
        return self.pos[:, None].copy()

    def step(self, actions):
        self.pos = np.clip(self.pos + 0.25 * MOVES[np.asarray(actions)], -1.0, 1.0).astype(np.float32)
        self.t += 1
        rewards = (np.abs(self.pos - self.goals) < 0.2).astype(np.float32)
        return self.pos[:, None].copy(), rewards, np.full(len(self.goals), self.t >= self.horizon)


class PointLine(Corridor):
    """A continuous-state family: the observation space is a Box, so the model projects the state."""
    name = "point_line"

    def tasks(self, cfg):
        return [{"goal": float(g)} for g in np.linspace(-1, 1, cfg["grid_size"])]

    def optimal_return(self, cfg, task):
        steps = max(0, math.ceil((abs(task["goal"]) - 0.2) / 0.25 - 1e-9))
        return float(max(0, cfg["horizon"] - steps + 1) if steps else cfg["horizon"])

    def observation_space(self, cfg):
        return gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def make_batched_env(self, cfg, tasks):
        return BatchedPointLine([t["goal"] for t in tasks], cfg["horizon"])


def test_a_continuous_state_family_is_embedded_by_a_learned_projection(monkeypatch, tmp_path):
    """AD (sliding window) on a Box observation space: trained and evaluated in context. (The
    data are random-policy histories: the batched PPO learner reads MultiDiscrete states only.)"""
    from fixtures_history import build_history_file

    from cli import load_config
    from config.loading import parse_set
    monkeypatch.setitem(envs.FAMILIES, "point_line", PointLine())
    sets = DATA + [s for s in TRAIN if not s.startswith("model=")] + [
        "env=point_line", "tf_n_layer=1", "tf_n_head=2", f"dataset_dir={tmp_path / 'data'}", f"run_dir={tmp_path}"]
    cfg = load_config([], parse_set(sets))
    assert envs.model_inputs(cfg) == {"n_actions": 3, "state_dim": 1}
    build_history_file(cfg)
    run = train.train(cfg)
    model = variants.build(cfg, envs.model_inputs(cfg))
    assert not hasattr(model, "state_emb") and model.state_proj.in_features == 1
    summary, returns, _ = evaluate.evaluate_run(run, {})
    assert returns.shape == (len(summary["tasks"]), 3) and summary["max_context_tokens"] == 12


def test_the_batched_learner_collects_a_continuous_family(monkeypatch, tmp_path, capsys):
    """A Box observation goes to PPO's network as floats (algorithm/batched_ppo.py, BoxEncoder)."""
    import h5py
    monkeypatch.setitem(envs.FAMILIES, "point_line", PointLine())
    sets = DATA + ["env=point_line", f"dataset_dir={tmp_path}"]
    code, err = run_in_process(monkeypatch, capsys, "collect.py", collect.main, ["--set", *sets])
    assert code == 0, err
    with h5py.File(next(tmp_path.glob("*.hdf5"))) as f:
        states = f["0"]["states"][()]
    assert states.dtype == np.float32 and np.isin(states, np.arange(-4, 5) * 0.25).all()


@pytest.mark.parametrize("sets", [["use_compressed_context=true", "n_transit=24", "compress_interval=12"],
                                  ["model=CompressedAD"]])
def test_variants_whose_tokens_hold_one_number_per_state_refuse_a_continuous_family(monkeypatch, sets):
    from cli import load_config
    from config.loading import parse_set
    from errors import ConfigError
    monkeypatch.setitem(envs.FAMILIES, "point_line", PointLine())
    with pytest.raises(ConfigError, match="continuous .Box. state; use model=AD with use_compressed_context=false"):
        load_config([], parse_set(DATA + ["env=point_line", *sets]))
