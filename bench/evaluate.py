"""In-context rollout speed: KV cache vs recomputing the whole context, for all three variants.

    .venv/bin/python bench/evaluate.py              # default size, about 1-3 min on 2 CPU cores
    .venv/bin/python bench/evaluate.py --quick      # ~10 s smoke run
    .venv/bin/python bench/evaluate.py --measure-full   # + one real 100-episode cached AD evaluation

What is timed: `model.rollout.rollout(model, cfg, tasks, n_episodes, n_rollouts, seed,
use_cache=...)`, the function evaluate.py runs, on the darkroom configs
(config/algorithm/ppo_darkroom.yaml config/env/darkroom.yaml + a model config, as those
files are at run time: the JSON lines state n_transit and the model dims; --ad-n-transit
overrides AD's window) with an untrained model (speed does not depend on the weights), on the 8 held-out goals x
`--rollouts` (eval_rollouts, 10) rollouts = 80 environments stepped as one batch, for
`--episodes` episodes of 20 steps. rollout() runs on one CPU thread by design.

Variants, interleaved within one process (A, B, C, D, A, C, D, ...), medians reported; the
uncached variants are ~20x slower, so by default they run in the first repetition only
(`--nocache-reps`), between cached runs of the same variant:
  ad_cache           AD (ad_dr.yaml: window of n_transit steps sliding by n_transit // 4), KV cache
  ad_nocache         same, use_cache=False: every step re-encodes the whole context
  tworegion_cache    two-region AD (ad_dr_compressed.yaml), KV cache; regions end every
                     compress_interval steps (eval_markers=interval: an untrained
                     token-type head would end regions at random)
  compressed_cache   CompressedAD (ppo_base.yaml + ad_compressed_dr.yaml), KV cache
  (--uncached-all adds tworegion_nocache and compressed_nocache)
Both AD variants draw the same actions (same seed, same outputs), so they do the same work.

Reported per variant: env-steps/s over the whole rollout (env-steps = environments x
steps); steady-state env-steps/s over the episodes after the context has filled up
(all variants: after n_transit steps) and the projected wall time of the full evaluation
(8 goals x `--project-episodes` (100) episodes x 10 rollouts) = measured time of the
episodes run + the remaining episodes at the steady-state mean episode time. With
n_transit=240 the default 15 episodes put exactly one 60-step slide of the AD window
(3 episodes, one re-encode) into the steady state; `episode_s_median` shows the per-episode
times (the re-encode spikes are visible there). Targets from the task:
cache >= 10x faster than recomputing, and the projected evaluation < 60 s.
Timings are never asserted; compare ratios from one run only.
"""
import argparse
import json
import statistics
import sys
import time

from _toolkit import ROOT  # noqa: E402  (first: puts the toolkit, not bench/ siblings, on sys.path)

CONFIGS = {
    "ad": (["config/algorithm/ppo_darkroom.yaml", "config/env/darkroom.yaml", "config/model/ad_dr.yaml"], {}),
    "tworegion": (["config/algorithm/ppo_darkroom.yaml", "config/env/darkroom.yaml",
                   "config/model/ad_dr_compressed.yaml"], {"eval_markers": "interval"}),
    "compressed": (["config/algorithm/ppo_base.yaml", "config/env/darkroom.yaml",
                    "config/model/ad_compressed_dr.yaml"], {}),
}


def build_variant(name: str, device: str, seed: int, extra: dict | None = None):
    import torch

    import env as envs
    from cli import load_config
    from model import build
    from runtime import pick_device
    files, overrides = CONFIGS[name]
    cfg = load_config([ROOT / f for f in files], {"device": device, **overrides, **(extra or {})})
    torch.manual_seed(seed)
    model = build(cfg, envs.model_inputs(cfg)).to(pick_device(cfg["device"]))
    return cfg, model.eval()


def timed_rollout(model, cfg, tasks, episodes: int, rollouts: int, use_cache: bool, seed: int) -> dict:
    """Wall time of each episode of one rollout() call (the progress callback runs after each)."""
    import torch

    from model.rollout import rollout
    device = next(model.parameters()).device
    stamps = []

    def progress(_):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    tic = time.perf_counter()
    _, stats = rollout(model, cfg, tasks, episodes, rollouts, seed, use_cache=use_cache, progress=progress)
    episode_s = [b - a for a, b in zip([tic] + stamps[:-1], stamps)]
    return {"episode_s": episode_s, "total_s": stamps[-1] - tic, "stats": stats}


def summarise(name: str, runs: list[dict], cfg: dict, n_env: int, args) -> dict:
    steps_per_ep = cfg["horizon"]
    fill = -(-cfg["n_transit"] // steps_per_ep)  # episodes until the context is full
    total = statistics.median(r["total_s"] for r in runs)
    steady = None
    if args.episodes > fill:
        steady = statistics.median(statistics.mean(r["episode_s"][fill:]) for r in runs)
    out = {"bench": "evaluate", "variant": name, "goals": args.goals, "rollouts_per_goal": args.rollouts,
           "envs": n_env, "episodes": args.episodes, "horizon": steps_per_ep, "reps": len(runs),
           "n_transit": cfg["n_transit"], "model": cfg["model"],
           "dims": {k: cfg[k] for k in ("tf_n_embd", "tf_n_layer", "tf_n_head", "state_embedding")},
           "use_compressed_context": cfg["use_compressed_context"],
           "env_steps_per_s": round(n_env * steps_per_ep * args.episodes / total, 1),
           "seconds": round(total, 3), "seconds_reps": [round(r["total_s"], 2) for r in runs],
           "max_context_tokens": runs[0]["stats"]["max_context_tokens"]}
    if steady is not None:
        out["steady_from_episode"] = fill
        out["steady_env_steps_per_s"] = round(n_env * steps_per_ep / steady, 1)
        # projection: the measured episodes (median over runs) + the rest at the steady episode time
        done = min(args.episodes, args.project_episodes)
        out[f"projected_{args.project_episodes}ep_s"] = round(
            statistics.median(sum(r["episode_s"][:done]) for r in runs) + (args.project_episodes - done) * steady, 1)
    out["episode_s_median"] = [round(statistics.median(ep), 3) for ep in zip(*(r["episode_s"] for r in runs))]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--episodes", type=int, default=15, help="episodes per timed rollout (20 steps each)")
    p.add_argument("--goals", type=int, default=8, help="held-out goals used (the darkroom test split has 8)")
    p.add_argument("--rollouts", type=int, default=10, help="rollouts per goal (eval_rollouts)")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions of the cached variants; "
                   "medians reported")
    p.add_argument("--nocache-reps", type=int, default=1, help="repetitions of the uncached variants (the first "
                   "ones of the --reps rounds; each takes ~100 s at the default size on 2 busy cores)")
    p.add_argument("--project-episodes", type=int, default=100, help="episodes of the projected evaluation")
    p.add_argument("--uncached-all", action="store_true",
                   help="also time two-region and CompressedAD without the cache")
    p.add_argument("--measure-full", action="store_true",
                   help="also run one real cached AD evaluation of --project-episodes episodes")
    p.add_argument("--ad-n-transit", type=int, default=0,
                   help="AD window in steps (0 = as config/model/ad_dr.yaml has it)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 goals x 2 rollouts, 4 episodes, 1 rep")
    args = p.parse_args()
    if args.quick:
        args.episodes, args.goals, args.rollouts, args.reps, args.nocache_reps = 4, 2, 2, 1, 1

    import env as envs
    variants = [("ad_cache", "ad", True), ("ad_nocache", "ad", False), ("tworegion_cache", "tworegion", True),
                ("compressed_cache", "compressed", True)]
    if args.uncached_all:
        variants += [("tworegion_nocache", "tworegion", False), ("compressed_nocache", "compressed", False)]
    ad_extra = {"n_transit": args.ad_n_transit} if args.ad_n_transit else {}
    models = {name: build_variant(name, args.device, args.seed, ad_extra if name == "ad" else None)
              for name in CONFIGS}
    runs = {v: [] for v, _, _ in variants}
    for rep in range(max(args.reps, args.nocache_reps)):
        for v, name, use_cache in variants:
            if rep >= (args.reps if use_cache else args.nocache_reps):
                continue
            cfg, model = models[name]
            tasks = envs.tasks_of_split(cfg, "test")[:args.goals]
            r = timed_rollout(model, cfg, tasks, args.episodes, args.rollouts, use_cache, args.seed)
            runs[v].append(r)
            print(f"[rep {rep + 1}/{args.reps}] {v}: {r['total_s']:.1f} s", file=sys.stderr, flush=True)
    n_env = args.goals * args.rollouts
    rows = {}
    for v, name, _ in variants:
        rows[v] = summarise(v, runs[v], models[name][0], n_env, args)
        print(json.dumps(rows[v]))

    ratios = {}
    for x, y in (("ad_cache", "ad_nocache"), ("tworegion_cache", "tworegion_nocache"),
                 ("compressed_cache", "compressed_nocache"), ("tworegion_cache", "ad_cache"),
                 ("compressed_cache", "ad_cache")):
        if x in runs and y in runs:  # ratio of the medians of interleaved repetitions
            ratios[f"speed_{x}/{y}"] = round(rows[y]["seconds"] / rows[x]["seconds"], 2)
            if "steady_env_steps_per_s" in rows[x] and "steady_env_steps_per_s" in rows[y]:
                ratios[f"steady_speed_{x}/{y}"] = round(
                    rows[x]["steady_env_steps_per_s"] / rows[y]["steady_env_steps_per_s"], 2)
    key = f"projected_{args.project_episodes}ep_s"
    summary = {"bench": "evaluate", "ratios": ratios, "of": "speed: ratio of the median wall times of "
               "interleaved repetitions; steady_speed: ratio of the steady-state medians",
               "goals": args.goals, "rollouts_per_goal": args.rollouts, "episodes": args.episodes,
               "reps": args.reps, "nocache_reps": args.nocache_reps}
    if key in rows["ad_cache"]:
        summary[f"ad_cache_{key}"] = rows["ad_cache"][key]
        summary["targets"] = {"cache_speedup_>=10x": ratios.get("speed_ad_cache/ad_nocache", 0) >= 10,
                              "projected_eval_<60s": rows["ad_cache"][key] < 60}
    print(json.dumps(summary))

    if args.measure_full:
        cfg, model = models["ad"]
        tasks = envs.tasks_of_split(cfg, "test")[:args.goals]
        r = timed_rollout(model, cfg, tasks, args.project_episodes, args.rollouts, True, args.seed)
        print(json.dumps({"bench": "evaluate", "variant": "ad_cache_full", "goals": args.goals,
                          "rollouts_per_goal": args.rollouts, "episodes": args.project_episodes,
                          "measured_s": round(r["total_s"], 1),
                          "env_steps_per_s": round(n_env * cfg["horizon"] * args.project_episodes / r["total_s"], 1),
                          "projected_s_this_run": rows["ad_cache"].get(key)}))


if __name__ == "__main__":
    main()
