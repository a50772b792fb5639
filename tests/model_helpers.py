"""Helpers shared by the model, rollout and training tests: a model whose outputs depend
strongly on its inputs, and a training run killed part-way and resumed."""
import pytest
import torch

import env as envs
import train
from cli import run_path
from model import build


def sensitive_model(cfg, seed=0):
    """Random weights large enough that outputs depend strongly on every input (with the
    default tiny init every action is nearly uniform, and a broken cache, mask or position
    could hide in the noise)."""
    torch.manual_seed(seed)
    model = build(cfg, envs.model_inputs(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


class Killed(Exception):
    pass


def interrupted_then_resumed(monkeypatch, cfg, kill_at_step) -> tuple[dict, dict]:
    """Run until `kill_at_step` steps are done (the last checkpoint is older), die, rerun.
    Returns (the checkpoint the kill left, the checkpoint of the finished rerun)."""
    real_lr_at = train.lr_at

    def dying_lr_at(step, c):
        if step == kill_at_step:
            raise Killed
        return real_lr_at(step, c)

    with monkeypatch.context() as m:
        m.setattr(train, "lr_at", dying_lr_at)
        with pytest.raises(Killed):
            train.train(cfg)
    left = torch.load(run_path(cfg) / "ckpt-last.pt", weights_only=True)
    assert 0 < left["step"] < kill_at_step  # the rerun must redo some steps
    train.train(cfg)
    return left, torch.load(run_path(cfg) / "ckpt-last.pt", weights_only=True)


def assert_same_state(a: dict, b: dict, steps: int):
    """Two checkpoints at `steps` with equal parameters and optimizer state."""
    assert a["step"] == b["step"] == steps
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, sa in a["optimizer"]["state"].items():
        sb = b["optimizer"]["state"][pid]
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (pid, k)
