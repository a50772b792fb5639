"""One token builder (model/tokens.py) for training and rollouts: a recorded rollout, written
as a history stream and read back through the dataset path, gives the tokens the model saw
during the rollout."""
import numpy as np
import pytest
import torch
from fixtures_history import ALG, ENV, ROOT, make_cfg

import env as envs
from cli import load_config
from config.loading import parse_set
from dataset import _StreamView
from model import build
from model import rollout as rollout_mod
from tokens import TOKEN_FIELDS, window_tokens

N_EPISODES, N_ROLLOUTS = 3, 2


class RecordingEnv:
    """A batched env that records, per step, the state the policy saw and what the step gave."""

    def __init__(self, env):
        self.env, self.log = env, {"states": [], "actions": [], "rewards": [], "dones": []}

    def reset(self):
        self.states = self.env.reset()
        return self.states

    def step(self, actions):
        self.log["states"].append(self.states)
        states, rewards, dones = self.env.step(actions)
        for k, v in (("actions", actions), ("rewards", rewards), ("dones", dones)):
            self.log[k].append(np.asarray(v))
        self.states = states
        return states, rewards, dones


def recorded_rollout(monkeypatch, cfg):
    """(history stream {field: (T, rows, ...)}, tokens the policy got {field: (rows, T, ...)})."""
    torch.manual_seed(0)
    model = build(cfg, envs.model_inputs(cfg))
    recorders, tokens = [], []
    real_make_env, real_make_policy = envs.make_batched_env, rollout_mod.make_policy_context

    def make_env(c, tasks, seed=None):
        recorders.append(RecordingEnv(real_make_env(c, tasks, seed)))
        return recorders[-1]

    def make_policy(*a, **kw):
        ctx, policy = real_make_policy(*a, **kw)
        real_step = policy.step

        def step(token):
            tokens.append({k: v.clone() for k, v in token.items()})
            return real_step(token)
        policy.step = step
        return ctx, policy

    monkeypatch.setattr(envs, "make_batched_env", make_env)
    monkeypatch.setattr(rollout_mod, "make_policy_context", make_policy)
    rollout_mod.rollout(model, cfg, envs.tasks_of_split(cfg, "test")[:2], N_EPISODES, N_ROLLOUTS, seed=1)
    stream = {k: np.stack(v) for k, v in recorders[0].log.items()}
    seen = {k: torch.cat([t[k] for t in tokens], 1).numpy() for k in TOKEN_FIELDS}
    return stream, seen


@pytest.mark.parametrize("model_config", ["ad_dr.yaml", "ad_compressed_dr.yaml"])
def test_a_recorded_rollout_read_back_through_the_dataset_gives_the_same_tokens(tmp_path, monkeypatch,
                                                                                  model_config):
    cfg = make_cfg(tmp_path)
    cfg = load_config([ALG, ENV, ROOT / "config/model" / model_config],
                      {k: cfg[k] for k in ("grid_size", "horizon", "tf_n_embd", "tf_n_layer", "tf_n_head", "n_transit")}
                      | parse_set(["eval_temperature=1.0", "device=cpu"]))
    stream, seen = recorded_rollout(monkeypatch, cfg)
    T, rows = stream["actions"].shape
    assert T == N_EPISODES * cfg["horizon"] and rows == 2 * N_ROLLOUTS
    assert len(np.unique(stream["actions"])) > 1 and stream["dones"].any()  # a real history, episodes and all
    for r in range(rows):
        # the rollout's transitions as one stream of a history file (time-major, streams in columns)
        read = window_tokens(cfg, _StreamView(stream, r), 0, T)
        for k in TOKEN_FIELDS:
            np.testing.assert_array_equal(read[k], seen[k][r], err_msg=k)
            assert read[k].dtype == seen[k].dtype, k
        np.testing.assert_array_equal(read["action"], stream["actions"][:, r])  # the targets: what it did
    # a window from the middle of the stream gives the same tokens as the whole stream there
    middle = window_tokens(cfg, _StreamView(stream, 1), 7, 7 + cfg["horizon"])
    for k in TOKEN_FIELDS:
        np.testing.assert_array_equal(middle[k], seen[k][1, 7:7 + cfg["horizon"]], err_msg=k)
