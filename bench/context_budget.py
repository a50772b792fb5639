"""Cost of each context on Dark Key-to-Door 9x9: training step time, rollout speed, memory per rollout.

    .venv/bin/python bench/context_budget.py            # about 2-4 min on 2 CPU cores
    .venv/bin/python bench/context_budget.py --quick    # a smoke run

The 9x9 model configs of `scripts/pipeline.py --size 9x9-q` at their token budgets: AD with its
200-step window and cut to 50 steps, CompressedAD with 10 accumulated latent sets (50 tokens) and
with one overwritten set (50 recent steps + 8 latents, 58 tokens), SummaryAD (49 tokens). Untrained
models (speed does not depend on the weights) on one CPU thread, in one process, interleaved
(A, B, C, ..., A, B, C, ...):
- `train_step_s`: forward + backward + AdamW step on a batch of the config's train_batch_size
  from the Q-learning history file (the first `--reps` batches of its sampler, built before
  timing: CompressedAD's batches each hold one compression depth, so they differ in cost);
  `targets_per_s` divides the mean action targets per batch by it, the fair unit across
  variants with different targets per sample.
- `rollout_env_steps_per_s`: model.rollout.rollout (what evaluate.py runs) on 8 test tasks x 4
  rollouts for `--episodes` episodes, KV cache on; the median of `--rounds`.
- `rollout_memory_bytes`: per rollout, the KV cache of the most tokens attended plus the
  variant's own state (latents, summaries), float32.
Needs the history file: `python collect.py config/algorithm/q_learning_dark_key_to_door.yaml
config/env/dark_key_to_door_9x9_650.yaml` (1 min). One JSON object per variant.
"""
import argparse
import json
import statistics
import time

from _toolkit import ROOT  # noqa: E402  (first: puts the toolkit, not bench/ siblings, on sys.path)

DATA = ["config/algorithm/q_learning_dark_key_to_door.yaml", "config/env/dark_key_to_door_9x9_650.yaml"]
VARIANTS = {
    "AD-200": ("config/model/ad_k2d9.yaml", {}),
    "AD-50": ("config/model/ad_k2d9.yaml", {"n_transit": 50, "train_batch_size": 64}),
    "CompressedAD-sets-50": ("config/model/compressed_ad_k2d9_sets.yaml", {}),
    "CompressedAD-overwrite-58": ("config/model/compressed_ad_k2d9_short_streams.yaml", {}),
    "SummaryAD-49": ("config/model/summary_ad_k2d9.yaml", {}),
}


def setup(name: str, n_batches: int, seed: int = 0):
    """(cfg, model, optimiser, the first n_batches training batches) of a variant, on CPU."""
    import torch

    import env as envs
    from algorithm.history import dataset_path
    from cli import load_config
    from errors import UserError
    from model import build, variant_of
    model_cfg, sets = VARIANTS[name]
    cfg = load_config([ROOT / f for f in DATA + [model_cfg]], {"device": "cpu", **sets})
    if not dataset_path(cfg).exists():
        raise UserError(f"no history file at {dataset_path(cfg)}: collect it first (see --help)")
    torch.manual_seed(seed)
    model = build(cfg, envs.model_inputs(cfg))
    variant = variant_of(cfg)
    data = variant.dataset(dataset_path(cfg), cfg, "train")
    batches = [variant.collate([data[i] for i in indices])
               for indices in variant.batches(data, cfg["train_batch_size"], seed, 0, 1, 0, n_batches)]
    return cfg, model, torch.optim.AdamW(model.parameters(), lr=1e-4), batches


def train_step_seconds(model, optimiser, batch) -> float:
    import torch
    tokens, targets = batch
    tic = time.perf_counter()
    _, loss = model(tokens, targets)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimiser.step()
    return time.perf_counter() - tic


def rollout_steps_per_second(model, cfg, episodes: int) -> tuple[float, int]:
    import env as envs
    from model.rollout import rollout
    tasks = envs.tasks_of_split(cfg, "test")[:8]
    tic = time.perf_counter()
    _, stats = rollout(model.eval(), cfg, tasks, episodes, 4, seed=0)
    model.train()
    return len(tasks) * 4 * episodes * cfg["horizon"] / (time.perf_counter() - tic), stats["max_context_tokens"]


def memory_per_rollout(cfg: dict, tokens: int) -> int:
    from model import variant_of
    return 2 * cfg["tf_n_layer"] * tokens * cfg["tf_n_embd"] * 4 + variant_of(cfg).memory_state_bytes(cfg)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10, help="timed training steps per variant (default 10)")
    p.add_argument("--episodes", type=int, default=12, help="rollout episodes per repetition (default 12)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rollout repetitions (default 2)")
    p.add_argument("--quick", action="store_true", help="2 steps, 4 episodes, 1 round")
    args = p.parse_args()
    if args.quick:
        args.reps, args.episodes, args.rounds = 2, 4, 1
    import torch
    torch.set_num_threads(1)
    built = {name: setup(name, args.reps) for name in VARIANTS}
    steps = {name: [] for name in VARIANTS}
    speeds = {name: [] for name in VARIANTS}
    tokens = {}
    for rep in range(args.reps):
        for name, (_, model, optimiser, batches) in built.items():
            steps[name].append(train_step_seconds(model, optimiser, batches[rep]))
    for _ in range(args.rounds):
        for name, (cfg, model, _, _) in built.items():
            speed, tokens[name] = rollout_steps_per_second(model, cfg, args.episodes)
            speeds[name].append(speed)
    rows = {}
    for name, (cfg, _, _, batches) in built.items():
        targets = statistics.mean(int((targets["action"] >= 0).sum()) for _, targets in batches)
        step = statistics.mean(steps[name])  # a mean over the batches: their depths differ in cost
        rows[name] = {"bench": "context_budget", "variant": name, "context_tokens": tokens[name],
                      "train_batch_size": cfg["train_batch_size"], "action_targets": round(targets),
                      "train_step_s": round(step, 4), "targets_per_s": round(targets / step),
                      "rollout_env_steps_per_s": round(statistics.median(speeds[name])),
                      "rollout_memory_bytes": memory_per_rollout(cfg, tokens[name]),
                      "reps": args.reps, "episodes": args.episodes, "rounds": args.rounds, "threads": 1}
        print(json.dumps(rows[name]))
    base = rows["AD-200"]
    ratio = lambda name, key: round(rows[name][key] / base[key], 2)  # noqa: E731
    print(json.dumps({"bench": "context_budget", "ratios_to": "AD-200", **{
        name: {k: ratio(name, k) for k in ("train_step_s", "targets_per_s", "rollout_env_steps_per_s",
                                           "rollout_memory_bytes")} for name in rows if name != "AD-200"}}))


if __name__ == "__main__":
    main()
