"""Where the batched PPO backend's time goes: the wall time of one worker's collection, by phase.

    python bench/collect_phases.py                       # darkroom, 41 tasks (one of two workers' share)
    python bench/collect_phases.py --env dark_key_to_door --tasks 41
    AD_TOOLKIT_ROOT=/tmp/base python bench/collect_phases.py   # the same for another checkout (before/after)

Runs one `ChunkLearner` in this process with one torch thread, as a worker process does
(`n_process` workers split the tasks; each is single-threaded), for --rollouts rollouts
(all but the last trained, as in a real run), and times each phase by wrapping the
learner's own functions:
- rollout: `env_step` (the numpy batched env), `history_record` (copying into the
  recorded arrays), `forward_rollout` (the network acting), `sample` (actions), `gae`,
  and `rollout_other` (the rest of the rollout loop);
- update: `forward`, `loss_gradients` (dPPO-loss/dlogits, dvalues), `backward`,
  `clip` (per-task gradient norms and scaling), `adam`, `normalize_advantages`, and
  `update_other` (permutations, shuffling, minibatch slicing, the loop itself).
Each phase is one JSON line (seconds, share of the wall time); the last line gives
env-steps/s and the network FLOPs per second against a 1024x1024 fp32 matmul on one
thread of this machine (the practical peak of a core). Network FLOPs count the dense
layers as a matmul would (the first layer as if its one-hot input were dense), forward
and backward, so before/after numbers count the same work. Wrapping adds a few
microseconds per call, so phase shares are a little off for the smallest phases.
"""
import argparse
import collections
import json
import os
import time

import torch
from _toolkit import ROOT  # noqa: E402  (first: puts the toolkit, not bench/ siblings, on sys.path)

import env as envs
from algorithm import batched_ppo
from cli import load_config

CONFIGS = {"darkroom": ["config/algorithm/ppo_darkroom.yaml", "config/env/darkroom.yaml"],
           "dark_key_to_door": ["config/algorithm/ppo_dark_key_to_door.yaml",
                                "config/env/dark_key_to_door_9x9_650.yaml"]}


class PhaseTimer:
    """Seconds per phase; `wrap(name, fn)` returns fn timed under that name."""

    def __init__(self):
        self.seconds = collections.Counter()

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return timed


def instrument(learner, timer: PhaseTimer):
    """Wrap the learner's phases; the network's forward counts as rollout or update by caller."""
    in_update = [False]
    forward = learner.net.forward

    def forward_by_phase(hot):
        start = time.perf_counter()
        out = forward(hot)
        timer.seconds["forward" if in_update[0] else "forward_rollout"] += time.perf_counter() - start
        return out

    def train(data, _train=learner.train):
        in_update[0] = True
        try:
            return timer.wrap("update", _train)(data)
        finally:
            in_update[0] = False

    learner.net.forward = forward_by_phase
    learner.net.backward = timer.wrap("backward", learner.net.backward)
    learner.net.clip_grad_norm_ = timer.wrap("clip", learner.net.clip_grad_norm_)
    learner.adam.step = timer.wrap("adam", learner.adam.step)
    learner.env.step = timer.wrap("env_step", learner.env.step)
    learner.history.record = timer.wrap("history_record", learner.history.record)
    learner.rollout = timer.wrap("rollout", learner.rollout)
    learner.train = train
    # module-level functions the learner calls by name
    for name, phase in (("ppo_loss_gradients", "loss_gradients"), ("normalize_advantages", "normalize_advantages"),
                        ("_gae", "gae"), ("_sample", "sample")):
        setattr(batched_ppo, name, timer.wrap(phase, getattr(batched_ppo, name)))


def network_flops(cfg: dict, obs_dim: int, n_actions: int) -> int:
    """FLOPs of one sample through one update (forward and backward, both branches), dense."""
    H = batched_ppo.HIDDEN
    first, second, heads = 2 * (2 * obs_dim * H), 2 * (2 * H * H), 2 * H * (n_actions + 1)
    forward = first + second + heads
    return forward + forward + (second + heads)  # + weight gradients + input gradients (none for the input)


def matmul_peak_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start, n = time.perf_counter(), 5
    for _ in range(n):
        a @ b
    return 2 * 1024 ** 3 * n / (time.perf_counter() - start) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--env", default="darkroom", choices=sorted(CONFIGS))
    parser.add_argument("--tasks", type=int, default=41,
                        help="tasks in this worker (default 41: half of darkroom's 81)")
    parser.add_argument("--rollouts", type=int, default=3, help="rollouts, all but the last trained (default 3)")
    args = parser.parse_args()
    if args.rollouts < 2:
        parser.error("--rollouts must be at least 2: the last rollout is never trained")
    torch.set_num_threads(1)
    cfg = load_config([ROOT / c for c in CONFIGS[args.env]], {"device": "cpu"})
    cfg["total_source_timesteps"] = args.rollouts * cfg["n_steps"] * cfg["n_stream"]
    learner = batched_ppo.ChunkLearner(cfg, list(range(args.tasks)), envs.task_list(cfg), torch.device("cpu"))
    timer = PhaseTimer()
    instrument(learner, timer)
    start = time.perf_counter()
    learner.run()
    wall = time.perf_counter() - start

    t = timer.seconds
    phases = {"rollout": ["env_step", "history_record", "forward_rollout", "sample", "gae"],
              "update": ["forward", "loss_gradients", "backward", "clip", "adam", "normalize_advantages"]}
    settings = {"env": args.env, "tasks": args.tasks, "n_stream": cfg["n_stream"], "n_steps": cfg["n_steps"],
                "batch_size": cfg["batch_size"], "n_epochs": cfg["n_epochs"], "rollouts": args.rollouts,
                "toolkit_root": str(ROOT)}
    for group, names in phases.items():
        for name in names + [f"{group}_other"]:
            seconds = t[name] if name in t else t[group] - sum(t[n] for n in names)
            print(json.dumps({"phase": name, "group": group, "seconds": round(seconds, 3),
                              "share": round(seconds / wall, 4), **settings}))
    env_steps = args.tasks * cfg["n_stream"] * cfg["n_steps"] * args.rollouts
    trained_samples = args.tasks * cfg["n_stream"] * cfg["n_steps"] * (args.rollouts - 1) * cfg["n_epochs"]
    flops = trained_samples * network_flops(cfg, learner.net.obs_dim, envs.n_actions(cfg))
    peak = matmul_peak_gflops()
    print(json.dumps({"result": "total", "wall_seconds": round(wall, 2), "env_steps_per_s": round(env_steps / wall),
                      "network_gflops_per_s": round(flops / wall / 1e9, 1), "matmul_peak_gflops_per_s": round(peak, 1),
                      "fraction_of_peak": round(flops / wall / 1e9 / peak, 3),
                      "load_avg_1min": round(os.getloadavg()[0], 2), **settings}))


if __name__ == "__main__":
    main()
