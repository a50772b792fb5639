"""The whole pipeline for one environment: collect, train every variant, evaluate, print the result table.

    python scripts/pipeline.py                           # darkroom, CPU size (about 30 min on 2 cores)
    python scripts/pipeline.py --size full               # darkroom at paper scale, for a GPU box
    python scripts/pipeline.py --seeds 0 1 2 --variants AD
    python scripts/pipeline.py --env dark_key_to_door    # 5x5 Dark Key-to-Door (CPU size)
    python scripts/pipeline.py --env dark_key_to_door --size 9x9-psrl   # 9x9, posterior-sampling histories (about 1-1.5 h on 2 cores, --jobs 2)
    python scripts/pipeline.py --env bandit              # 5-armed bandits: regret vs UCB1 / Thompson / PPO
    python scripts/pipeline.py --env point_robot         # 2-D point robot (continuous state)
    python scripts/pipeline.py --study memory            # return vs context size, memory on/off (scripts/memory_study.py)

Each stage is the user-facing command (collect.py, train.py, evaluate.py) run as a
subprocess, so this script does nothing a user could not do by hand. Rerunning it
resumes: finished collections and trainings are reused; evaluations run again
(deterministic, seconds to a minute each).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import report  # noqa: E402
from jobs import run, run_jobs  # noqa: E402
from utils import (UserError, atomic_write, ensure_writable_dir, load_config, parse_set, run_cli,  # noqa: E402
                   run_path)

# Transformer scale for a GPU box; the model configs hold the CPU size. Full runs get their
# own folder, so they never try to resume a CPU-size run of the same name.
FULL_MODEL = ["run_dir=runs/full", "tf_n_embd=128", "tf_n_layer=4", "tf_n_head=4", "train_batch_size=64", "train_timesteps=20000",
              "lr=5.0e-4", "warmup_steps=500", "eval_interval=2000", "num_workers=4"]
# Per environment and size: the collection configs, one model config per variant, and the
# --set overrides every stage gets (collect / train / evaluate must agree on the data keys).
SETUPS = {
    "darkroom": {
        "cpu": {"data": ["config/algorithm/ppo_darkroom.yaml", "config/env/darkroom.yaml"], "train": []},
        "full": {"data": ["config/algorithm/ppo_darkroom.yaml", "config/env/darkroom.yaml"], "train": FULL_MODEL},
        "variants": {"AD": "config/model/ad_dr.yaml",
                     "AD-tworegion": "config/model/ad_dr_compressed.yaml",
                     "CompressedAD": "config/model/ad_compressed_dr.yaml"},
    },
    "dark_key_to_door": {
        # 5x5 grid, 25-step episodes, 625 tasks; the 9x9 / 50-step setting of DESIGN.md is `full`
        "cpu": {"data": ["config/algorithm/ppo_dark_key_to_door_5x5.yaml", "config/env/dark_key_to_door_5x5.yaml"],
                "train": []},
        # the AD paper's 9x9 grid (50-step episodes) at a 2-core size: 650 of its 6,561 tasks
        "9x9": {"data": ["config/algorithm/ppo_dark_key_to_door.yaml", "config/env/dark_key_to_door_9x9.yaml"],
                "train": [],
                "variants": {"AD": "config/model/ad_k2d9.yaml",
                             "AD-tworegion": "config/model/ad_k2d9_compressed.yaml",
                             "CompressedAD": "config/model/ad_compressed_k2d9.yaml"}},
        # the same 650 tasks, histories from posterior sampling instead of PPO: 64 streams of 20
        # episodes per task (algorithm/posterior_sampling.py; its own run folder)
        "9x9-psrl": {"data": ["config/algorithm/posterior_sampling_dark_key_to_door.yaml",
                              "config/env/dark_key_to_door_9x9.yaml"],
                     "train": ["run_dir=runs/dark_key_to_door_9x9_psrl"],
                     "variants": {"AD": "config/model/ad_k2d9.yaml",
                                  "AD-tworegion": "config/model/ad_k2d9_compressed.yaml",
                                  "CompressedAD": "config/model/ad_compressed_k2d9_short_streams.yaml"}},
        "full": {"data": ["config/algorithm/ppo_dark_key_to_door.yaml", "config/env/dark_key_to_door.yaml"],
                 "train": FULL_MODEL + ["n_transit=200", "compress_interval=100"]},
        "variants": {"AD": "config/model/ad_k2d.yaml",
                     "AD-tworegion": "config/model/ad_k2d_compressed.yaml",
                     "CompressedAD": "config/model/ad_compressed_k2d.yaml"},
    },
}
SETUPS.update({
    "bandit": {
        # 5-armed Bernoulli bandits, 500 tasks; AD with a 150-pull window, its short-window
        # ablation (10 pulls; own folder, same run name) and CompressedAD with AD-10's window
        # plus latents; the regret table against UCB1, Thompson sampling and the source PPO
        # comes from the report script
        "cpu": {"data": ["config/algorithm/ppo_bandit.yaml", "config/env/bandit.yaml"], "train": []},
        "full": {"data": ["config/algorithm/ppo_bandit.yaml", "config/env/bandit.yaml"], "train": FULL_MODEL},
        "variants": {"AD": "config/model/ad_bandit.yaml",
                     "AD-10": ("config/model/ad_bandit_short.yaml", "ad10"),
                     "CompressedAD": "config/model/ad_compressed_bandit.yaml"},
        "report": "scripts/bandit_baselines.py",
    },
    "point_robot": {
        # 2-D point robot with a Box observation: plain AD only (the two-region markers and
        # CompressedAD's stages refuse a vector state, see their check_config)
        "cpu": {"data": ["config/algorithm/ppo_point_robot.yaml", "config/env/point_robot.yaml"], "train": []},
        "full": {"data": ["config/algorithm/ppo_point_robot.yaml", "config/env/point_robot.yaml"],
                 "train": FULL_MODEL},
        "variants": {"AD": "config/model/ad_point_robot.yaml"},
    },
})
VARIANTS = list(dict.fromkeys(v for setup in SETUPS.values() for v in setup["variants"]))  # every name


def sizes_of(setup: dict) -> list[str]:
    """The sizes an environment's setup offers (the entries with a `data` list)."""
    return [k for k, v in setup.items() if isinstance(v, dict) and "data" in v]


SIZES = list(dict.fromkeys(k for setup in SETUPS.values() for k in sizes_of(setup)))


def variant_configs(setup: dict, size: dict) -> dict:
    """{variant: model config} of one size (a size may have its own, e.g. a longer window)."""
    return size.get("variants", setup["variants"])


def variant_config(setup: dict, variant: str) -> tuple[str, str | None]:
    """(model config file, sub-folder of run_dir or None): a setup gives a variant its own
    folder when its run name would be another's (AD at two window sizes)."""
    entry = setup["variants"][variant]
    return (entry, None) if isinstance(entry, str) else entry


def variant_sets(setup: dict, variant: str, size: dict, sets: list[str]) -> list[str]:
    """The --set items of one variant's training: `sets`, then its own folder under the run_dir
    they resolve to (last, so that it wins)."""
    config, subdir = variant_config(setup, variant)
    if subdir is None:
        return sets
    base = train_config(size["data"] + [config], sets)["run_dir"]
    return sets + [f"run_dir={Path(base) / subdir}"]


def run_stage(commands: dict[str, list[str]], n_jobs: int, log_dir: Path) -> dict:
    """{name: argv} one after another with their output on the terminal, or n_jobs at a time
    with each one's output in log_dir/<name>.log. Returns seconds per command."""
    if n_jobs == 1:
        return {name: run(argv) for name, argv in commands.items()}
    print(f"\n{len(commands)} commands, {n_jobs} at a time; logs in {log_dir}", flush=True)
    log_names = {name.replace(" ", "_"): name for name in commands}
    seconds = run_jobs([(log_name, commands[name]) for log_name, name in log_names.items()], n_jobs, log_dir)
    return {log_names[log_name]: s for log_name, s in seconds.items()}


def with_set(values: list[str]) -> list[str]:
    return ["--set", *values] if values else []


def result_table(rows: list[dict]) -> str:
    lines = ["| variant | seeds | final return | optimal | % of optimal | per seed | IQM [95% CI] | first-episode return "
             "| episodes to 80% | PPO episodes to 80% | context tokens | train time / run | hardware |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = " / ".join(f"{100 * f:.1f}" for f in r["per_seed"])
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['final']:.2f} | {r['optimal']:.2f} | "
                     f"{100 * r['fraction']:.0f}% | {per_seed} | {r['iqm']} | "
                     f"{r['first']:.2f} | {r['episodes_to_80']} | {r['ppo_episodes_to_80']} | {r['context']} | "
                     f"{r['train_seconds'] / 60:.1f} min | {r['hardware']} |")
    return "\n".join(lines)


def table_row(variant: str, run_dirs: list[Path], eval_tag: str = "") -> dict:
    """Mean over seeds of what evaluate.py (its evaluation tagged `eval_tag`, or the untagged
    one) and train.py wrote into the run folders."""
    summaries, returns = zip(*(report.load_evaluation(d, eval_tag) for d in run_dirs))
    trainings = [json.loads((d / "train_summary.json").read_text()) for d in run_dirs]
    mean = lambda k: sum(s[k] for s in summaries) / len(summaries)  # noqa: E731
    optimal = summaries[0]["optimal_return"]
    return {"variant": variant, "seeds": len(summaries), "final": mean("final_return"),
            "optimal": sum(optimal) / len(optimal), "fraction": mean("final_fraction_of_optimal"),
            "per_seed": [s["final_fraction_of_optimal"] for s in summaries],
            "iqm": report.format_iqm(report.iqm_with_ci(report.fraction_scores(summaries, returns))),
            "first": mean("first_return"), "episodes_to_80": [s["episodes_to_80pct"] for s in summaries],
            "ppo_episodes_to_80": summaries[0]["ppo_episodes_to_80pct"],
            "context": max(s["max_context_tokens"] for s in summaries),
            "train_seconds": sum(t["seconds"] for t in trainings) / len(trainings),
            "hardware": trainings[0]["hardware"]}


def train_config(configs: list[str], overrides: list[str]) -> dict:
    """The config train.py will resolve, so the run directory is read, never guessed."""
    return load_config([ROOT / c for c in configs], parse_set(overrides))


def write_table_of_finished(args, run_dirs: dict, out_dir: Path, tag: str):
    """--table-only: the table of the evaluated runs, each variant over the seeds it has."""
    rows, absent = [], []
    for variant in args.variants:
        done = [ROOT / run_dirs[variant, s] for s in args.seeds
                if report.evaluation_files(ROOT / run_dirs[variant, s], args.eval_tag)[0].is_file()]
        absent += [f"{variant} seed {s}" for s in args.seeds if ROOT / run_dirs[variant, s] not in done]
        if done:
            rows.append(table_row(variant, done, args.eval_tag))
    if not rows:
        summary = report.evaluation_files(out_dir, args.eval_tag)[0].name
        raise UserError(f"no run of these variants and seeds has an evaluation ({summary}) under {out_dir}: "
                        "run the pipeline (or evaluate.py --tag) first")
    table = result_table(rows)
    results = out_dir / f"results_{tag}{'_' + args.eval_tag if args.eval_tag else ''}_finished.md"
    with atomic_write(results, "w") as f:
        f.write(table + "\n")
    print(table + (f"\n\nnot evaluated (left out): {', '.join(absent)}" if absent else "") + f"\n\nwritten: {results}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", choices=SETUPS, default="darkroom")
    p.add_argument("--size", choices=SIZES, default="cpu",
                   help="cpu: finishes on a laptop; full: paper scale, for a GPU box; 9x9 (dark_key_to_door): "
                        "the 9x9 grid on 650 tasks, hours on 2 CPU cores; 9x9-psrl (dark_key_to_door): the same tasks, "
                        "histories from posterior sampling (algorithm/posterior_sampling.py), 1-1.5 h with --jobs 2")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds per variant")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: every variant of the --env")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra overrides for every stage, e.g. env_split_seed=1 run_dir=runs/split1")
    p.add_argument("--study", choices=["memory"], help="memory: train every variant at a ladder of context "
                   "budgets and evaluate each with its memory on and off (see scripts/memory_study.py)")
    p.add_argument("--budgets", type=int, nargs="+", help="--study: the n_transit ladder of AD and CompressedAD "
                   "(default: scripts/memory_study.py LADDERS)")
    p.add_argument("--table-only", action="store_true", help="run nothing: the table of the runs among "
                   "--variants x --seeds that have an evaluation (eval_summary.json), as they are")
    p.add_argument("--eval-tag", default="", help="with --table-only: the evaluations tagged so (evaluate.py "
                   "--tag TAG), e.g. test_T10 after evaluate.py RUN --tag test_T10 --set eval_temperature=1.0")
    p.add_argument("--jobs", type=int, help="trainings and evaluations run at once, each logging to a file "
                   "under the run_dir's logs/ (each uses one CPU thread; default 1, --study 2; on a GPU box the "
                   "small models share the GPU, e.g. --jobs 9 for 3 variants x 3 seeds)")
    args = p.parse_args()
    if args.size not in sizes_of(SETUPS[args.env]):
        p.error(f"--env {args.env} has no size {args.size!r}; its sizes: {', '.join(sizes_of(SETUPS[args.env]))}")
    setup, size = SETUPS[args.env], SETUPS[args.env][args.size]
    setup = {**setup, "variants": variant_configs(setup, size)}
    all_variants = list(setup["variants"])
    args.seeds, args.variants = list(dict.fromkeys(args.seeds)), list(dict.fromkeys(args.variants or all_variants))
    missing = [v for v in args.variants if v not in all_variants]
    if missing:
        p.error(f"--env {args.env} has no variant {', '.join(missing)}; its variants: {', '.join(all_variants)}")
    if args.jobs is None:
        args.jobs = 2 if args.study else 1
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.eval_tag and not args.table_only:
        p.error("--eval-tag reads evaluations that are already there: use it with --table-only")
    if args.study == "memory":
        import memory_study
        memory_study.run_study(args, setup, size, train_config, ["collect.py", *size["data"], *with_set(args.set)])
        return
    # resolve every config before any work, so a typo costs a second, not a collection
    train_sets = {(v, seed): variant_sets(setup, v, size, size["train"] + [f"seed={seed}"] + args.set)
                  for v in args.variants for seed in args.seeds}
    configs = {(v, seed): train_config(size["data"] + [variant_config(setup, v)[0]], train_sets[v, seed])
               for v in args.variants for seed in args.seeds}
    run_dirs = {key: str(run_path(cfg)) for key, cfg in configs.items()}
    if len(set(run_dirs.values())) < len(run_dirs):
        raise UserError("two variants resolve to the same run directory; give one of them its own folder in SETUPS")
    out_dir = ROOT / configs[args.variants[0], args.seeds[0]]["run_dir"]
    name = f"{args.env}_{args.size}"
    if args.variants != all_variants:  # a subset gets its own files, so side-by-side runs never overwrite
        name += "_" + "-".join(args.variants)
    tag = f"{name}_seeds" + "-".join(map(str, args.seeds))
    if args.table_only:
        return write_table_of_finished(args, run_dirs, out_dir, tag)
    # the last stages write there: find out now, not after the collection and the trainings
    for cfg in configs.values():
        ensure_writable_dir(ROOT / cfg["dataset_dir"], "dataset directory")
        ensure_writable_dir(ROOT / cfg["run_dir"], "run directory")

    tic = time.perf_counter()
    seconds = {"collect": run(["collect.py", *size["data"], *with_set(args.set)])}
    trainings = {f"train {variant} seed{seed}":
                 ["train.py", *size["data"], variant_config(setup, variant)[0], *with_set(train_sets[variant, seed])]
                 for variant in args.variants for seed in args.seeds}
    # one evaluate.py call per seed, which also draws that seed's comparison plot
    plots = {seed: out_dir / f"comparison_{name}_seed{seed}.png" for seed in args.seeds}
    evaluations = {}
    for seed in args.seeds:
        dirs = [run_dirs[v, seed] for v in args.variants]
        plot_args = ["--plot", str(plots[seed])] if len(dirs) > 1 else []
        evaluations[f"evaluate seed{seed}"] = ["evaluate.py", *dirs, *plot_args, *with_set(args.set)]
    for stage in (trainings, evaluations):
        seconds.update(run_stage(stage, args.jobs, out_dir / "logs" / tag))  # own folder: runs/ is shared
    rows = [table_row(variant, [ROOT / run_dirs[variant, seed] for seed in args.seeds]) for variant in args.variants]
    table = result_table(rows)
    if "report" in setup:  # the family's own table (bandit: regret against UCB1 / Thompson / PPO), seeds pooled
        report_file = out_dir / f"report_{tag}.md"
        seconds["report"] = run([setup["report"], *(run_dirs[v, s] for v in args.variants for s in args.seeds),
                                 "--label", *(v for v in args.variants for _ in args.seeds), "--out", str(report_file)])
        table += "\n\n" + report_file.read_text()
    seconds["total (this script)"] = time.perf_counter() - tic
    results = out_dir / f"results_{tag}.md"
    with atomic_write(results, "w") as f:
        f.write(table + "\n")
    with atomic_write(out_dir / f"timings_{tag}.json", "w") as f:
        # with --jobs > 1 stages ran side by side: their seconds are not each one's cost alone
        f.write(json.dumps({**seconds, "jobs": args.jobs}, indent=1) + "\n")
    print("\n" + "\n".join(f"{k:>32s}: {v / 60:6.1f} min" for k, v in seconds.items()))
    print("\n" + table + f"\n\nwritten: {results}" + "".join(f", {p}" for p in plots.values() if p.exists()))


if __name__ == "__main__":
    run_cli(main)
