"""The whole darkroom pipeline: collect, train every variant, evaluate, print the result table.

    python scripts/darkroom.py                 # CPU size (about 30 min on 2 cores)
    python scripts/darkroom.py --size full     # paper scale, for a GPU box
    python scripts/darkroom.py --seeds 0 1 2 --variants AD

Each stage is the user-facing command (collect.py, train.py, evaluate.py) run as a
subprocess, so this script does nothing a user could not do by hand, and rerunning it
resumes: finished collections, checkpoints and evaluations are reused.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALG, ENV = "config/algorithm/ppo_darkroom.yaml", "config/env/darkroom.yaml"
VARIANTS = {  # name: (model config, run-name prefix)
    "AD": ("config/model/ad_dr.yaml", "AD"),
    "AD-tworegion": ("config/model/ad_dr_compressed.yaml", "AD-tworegion"),
    "CompressedAD": ("config/model/ad_compressed_dr.yaml", "CompressedAD"),
}
# --set overrides per size; the model configs hold the CPU defaults
SIZES = {
    "cpu": {"collect": [], "train": [], "evaluate": []},
    "full": {"collect": [], "train": ["tf_n_embd=128", "tf_n_layer=4", "tf_n_head=4", "train_batch_size=64",
                                      "train_timesteps=20000", "lr=5.0e-4", "warmup_steps=500",
                                      "eval_interval=2000", "num_workers=4"],
             "evaluate": []},
}


def run(cmd: list[str]) -> float:
    print("\n$ " + " ".join(cmd), flush=True)
    tic = time.perf_counter()
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)
    return time.perf_counter() - tic


def with_set(values: list[str]) -> list[str]:
    return ["--set", *values] if values else []


def result_table(rows: list[dict]) -> str:
    lines = ["| variant | seeds | final return | % of optimal | first-episode return | episodes to 80% "
             "| PPO episodes to 80% | context tokens | train time / run | hardware |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['final']:.2f} | {100 * r['fraction']:.0f}% | "
                     f"{r['first']:.2f} | {r['episodes_to_80']} | {r['ppo_episodes_to_80']} | {r['context']} | "
                     f"{r['train_seconds'] / 60:.1f} min | {r['hardware']} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="cpu", help="cpu: finishes on a laptop; full: paper scale")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds per variant")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="extra overrides for every stage")
    args = p.parse_args()
    size = SIZES[args.size]
    run(["collect.py", ALG, ENV, *with_set(size["collect"] + args.set)])
    rows, runs = [], []
    for variant in args.variants:
        model_cfg, prefix = VARIANTS[variant]
        summaries, trainings = [], []
        for seed in args.seeds:
            overrides = size["train"] + [f"seed={seed}"] + args.set
            run(["train.py", ALG, ENV, model_cfg, *with_set(overrides)])
            run_dir = f"runs/{prefix}-darkroom-seed{seed}"
            run(["evaluate.py", run_dir, *with_set(size["evaluate"] + args.set)])
            summaries.append(json.loads((ROOT / run_dir / "eval_summary.json").read_text()))
            trainings.append(json.loads((ROOT / run_dir / "train_summary.json").read_text()))
            runs.append(run_dir)
        mean = lambda k: sum(s[k] for s in summaries) / len(summaries)  # noqa: E731
        rows.append({"variant": variant, "seeds": len(summaries), "final": mean("final_return"),
                     "fraction": mean("final_fraction_of_optimal"), "first": mean("first_return"),
                     "episodes_to_80": [s["episodes_to_80pct"] for s in summaries],
                     "ppo_episodes_to_80": summaries[0]["ppo_episodes_to_80pct"],
                     "context": max(s["max_context_tokens"] for s in summaries),
                     "train_seconds": sum(t["seconds"] for t in trainings) / len(trainings),
                     "hardware": trainings[0]["hardware"]})
    tag = "seeds" + "-".join(map(str, args.seeds))
    first_seed = [r for r in runs if r.endswith(f"seed{args.seeds[0]}")]
    if len(first_seed) > 1:
        run(["evaluate.py", *first_seed, "--plot", f"runs/darkroom_comparison_{tag}.png",
             *with_set(size["evaluate"] + args.set)])
    table = result_table(rows)
    (ROOT / "runs" / f"darkroom_results_{tag}.md").write_text(table + "\n")
    print("\n" + table + f"\n\nwritten: runs/darkroom_results_{tag}.md, runs/darkroom_comparison_{tag}.png")


if __name__ == "__main__":
    main()
