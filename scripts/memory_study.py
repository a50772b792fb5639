"""The memory study: return against context size, with each variant's memory switched off.

    python scripts/pipeline.py --study memory                       # darkroom, seeds 0 1 2
    python scripts/pipeline.py --study memory --env dark_key_to_door --seeds 0 --budgets 10 25 100

For one environment, every variant is trained at a ladder of context budgets (`n_transit`,
from less than one episode to the whole training stream; two-region AD has one budget, two
rollouts), each with the same number of step targets per optimiser step. Every run is
then evaluated on the test tasks four ways (evaluate.py --tag):
- `keep`: as trained, for 4x the episodes one training stream holds (the length check of
  the goal; the usual 100-episode numbers are read off the same rollouts, which do not
  depend on how long they run);
- `drop`: memory switched off (eval_memory=drop: window variants forget every earlier
  episode at each episode start; CompressedAD decodes without its latents, SummaryAD
  without its summaries);
- `shuffle`: the memory of a rollout on another task (eval_memory=shuffle);
- `T1`: sampling at temperature 1.0 instead of the chosen eval_temperature (where 1.0 is
  the chosen one, `keep` gives these numbers).
Output in {run_dir}/memory_study/{env}/: memory_study.json (one row per variant x budget x
seed), memory_study.md (the table, with IQM and 95% stratified-bootstrap intervals, then the
goal check of `goal_check`) and memory_study.png. Rerunning reuses finished trainings and the
evaluations made after them; a run with other --variants, --budgets or --seeds adds its rows to the ones already there.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import report
from algorithm.history import steps_per_stream
from cli import check_training, run_path
from errors import UserError
from jobs import run, run_jobs

# n_transit ladders; None = the variant's config as it is (two-region: two rollouts).
# SummaryAD reads a budget as the most tokens it attends to (its write pass, see
# model/summary.py summary_budget): 49 is its model config, 25 one summary segment.
# The longest AD window is a whole training stream (darkroom 1,000 steps = 50 episodes,
# Dark Key-to-Door 5x5 1,000 steps = 40 episodes with the study's 10-stream data).
LADDERS = {
    "darkroom": {"AD": [10, 20, 40, 100, 250, 1000], "AD-tworegion": [None], "CompressedAD": [10, 20, 40]},
    "dark_key_to_door": {"AD": [10, 25, 100, 250, 1000], "AD-tworegion": [None], "CompressedAD": [10, 25],
                         "SummaryAD": [25, 49]},
}
TARGETS_PER_STEP = 1600  # windows x steps per optimiser step, the same at every budget
EVALS = {"keep": {}, "drop": {"eval_memory": "drop"}, "shuffle": {"eval_memory": "shuffle"},
         "T1": {"eval_temperature": 1.0}}  # tag -> the evaluation settings it changes
SUMMARY_NAMES = {"eval_episodes": "n_episodes", "eval_memory": "memory", "eval_temperature": "temperature",
                 "eval_split": "eval_split"}  # how eval_summary.json records them
LENGTH_FACTOR = 4        # `keep` runs for this many times the episodes one training stream holds


def budget_overrides(cfg: dict, n_transit: int | None, steps_in_stream: int) -> list[str]:
    """--set items of a run of cfg's variant at context budget n_transit (None: as configured)."""
    if n_transit is None:
        return []
    from model import variant_of
    sets = [f"n_transit={n_transit}", f"train_batch_size={max(2, TARGETS_PER_STEP // n_transit)}"]
    return sets + variant_of(cfg).budget_overrides(n_transit, steps_in_stream)


def evaluated(run_dir: Path, tag: str, expected: dict) -> bool:
    """An evaluation of this checkpoint with this tag and these summary values is on disk
    (a rerun reuses it)."""
    (summary, returns), ckpt = report.evaluation_files(run_dir, tag), run_dir / "ckpt-last.pt"
    if not (summary.is_file() and returns.is_file()) or summary.stat().st_mtime < ckpt.stat().st_mtime:
        return False
    try:
        done = json.loads(summary.read_text())
        return all(done[k] == v for k, v in expected.items())
    except (ValueError, KeyError):
        return False


def curve_metrics(summary: dict, returns: np.ndarray, n_episodes: int) -> tuple[float, int | None]:
    """(fraction of optimal in episode n_episodes, episodes to 80% within the first n_episodes)."""
    from evaluate import episodes_to_fraction
    optimal = float(np.mean(summary["optimal_return"]))
    curve = returns[:, :n_episodes].mean(0)
    return float(curve[-1] / optimal), episodes_to_fraction(curve, optimal)


def context_bytes(cfg: dict, tokens: int) -> int:
    """fp32 KV cache of one rollout at its most tokens, plus the variant's other memory (CompressedAD's latents)."""
    from model import variant_of
    kv = 2 * cfg["tf_n_layer"] * tokens * cfg["tf_n_embd"] * 4
    return kv + variant_of(cfg).memory_state_bytes(cfg)


def t1_tag(cfg: dict) -> str:
    """The evaluation at temperature 1.0: `keep` itself where 1.0 is the chosen temperature."""
    return "keep" if cfg["eval_temperature"] == 1.0 else "T1"


def study_row(variant: str, seed: int, cfg: dict, run_dir: Path, n_episodes: int) -> dict:
    keep, keep_r = report.load_evaluation(run_dir, "keep")
    final, to80 = curve_metrics(keep, keep_r, n_episodes)
    final_long, _ = curve_metrics(keep, keep_r, keep_r.shape[1])
    drop, drop_r = report.load_evaluation(run_dir, "drop")
    final_off, to80_off = curve_metrics(drop, drop_r, n_episodes)
    final_shuffle, _ = curve_metrics(*report.load_evaluation(run_dir, "shuffle"), n_episodes)
    final_t1, to80_t1 = curve_metrics(*report.load_evaluation(run_dir, t1_tag(cfg)), n_episodes)
    first, _ = curve_metrics(keep, keep_r, 1)
    train = report.load_training(run_dir)
    return {"variant": variant, "seed": seed, "n_transit": cfg["n_transit"],
            "context_tokens": keep["max_context_tokens"],
            "context_bytes": context_bytes(cfg, keep["max_context_tokens"]),
            "final_fraction_of_optimal": final, "episodes_to_80": to80,
            "final_fraction_of_optimal_memory_off": final_off, "episodes_to_80_memory_off": to80_off,
            "final_fraction_of_optimal_memory_shuffle": final_shuffle,
            "final_fraction_of_optimal_T1": final_t1, "episodes_to_80_T1": to80_t1,
            "first_fraction_of_optimal": first,
            f"final_fraction_of_optimal_at_{keep_r.shape[1]}_episodes": final_long,
            "long_episodes": int(keep_r.shape[1]), "n_episodes": n_episodes,
            "source_episodes_to_80": keep["source_episodes_to_80pct"], "compression_depth_reached": keep.get(
                "compression_depth_reached"), "temperature": keep["temperature"],
            "train_seconds": train["seconds"], "hardware": train["hardware"],
            "run_dir": str(run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir)}


def earlier_rows(path: Path, plan: dict) -> list[dict]:
    """Rows an earlier study run wrote here for other variants, budgets or seeds (so
    `--variants`, `--budgets` and `--seeds` add to one table); rows of this plan are redone."""
    if not path.is_file():
        return []
    planned = {(v, cfg["n_transit"], seed) for (v, _, seed), (_, cfg) in plan.items()}
    rows = [r for r in json.loads(path.read_text()) if (r["variant"], r["n_transit"], r["seed"]) not in planned
            and (ROOT / r["run_dir"] / "eval_summary_keep.json").is_file()]
    for r in rows:  # the name an earlier version wrote
        if "ppo_episodes_to_80" in r:
            r["source_episodes_to_80"] = r.pop("ppo_episodes_to_80")
    return rows


def group_iqm(run_dirs: list[Path], tag: str, episode: int) -> str:
    loaded = [report.load_evaluation(d, tag) for d in run_dirs]
    scores = report.fraction_scores([s for s, _ in loaded], [r for _, r in loaded], episode)
    return report.format_iqm(report.iqm_with_ci(scores))


def study_table(rows: list[dict], groups: dict, n_episodes: int) -> str:
    header = ["variant, n_transit", "context tokens", "context bytes", "seeds", "% of optimal (mean)", "IQM [95% CI]",
              "memory off", "IQM off", "memory of another task", "at T=1.0", "episodes to 80%",
              "episodes to 80%, memory off", f"% at episode {rows[0]['long_episodes']}", "first episode", "train min"]
    cells = []
    for (variant, n_transit), dirs in groups.items():
        rs = [r for r in rows if r["variant"] == variant and r["n_transit"] == n_transit]
        def mean(k, rs=rs):
            return f"{100 * np.mean([r[k] for r in rs]):.0f}%"
        long_key = f"final_fraction_of_optimal_at_{rs[0]['long_episodes']}_episodes"
        cells.append([f"{variant}, {n_transit}", str(max(r["context_tokens"] for r in rs)),
                      f"{max(r['context_bytes'] for r in rs) / 1024:.1f} KiB", str(len(rs)),
                      mean("final_fraction_of_optimal"), group_iqm(dirs, "keep", n_episodes - 1),
                      mean("final_fraction_of_optimal_memory_off"), group_iqm(dirs, "drop", n_episodes - 1),
                      mean("final_fraction_of_optimal_memory_shuffle"), mean("final_fraction_of_optimal_T1"),
                      str([r["episodes_to_80"] for r in rs]), str([r["episodes_to_80_memory_off"] for r in rs]),
                      mean(long_key), mean("first_fraction_of_optimal"),
                      f"{np.mean([r['train_seconds'] for r in rs]) / 60:.1f}"])
    return report.markdown_tables(header, cells)


# what CompressedAD must show against full-history AD for its compression to be worth it
GOAL = {"token_fraction": 1 / 8, "within_points": 5, "memory_points": 30}


def goal_check(rows: list[dict]) -> str:
    """Each CompressedAD budget against full-history AD (the longest AD window), seed means:
    at most 5 points below its % of optimal (above counts as met) at 1/8 of its tokens or
    less, at least 30 points lost with the memory off, and still at most 5 points below at
    the last episode of the long evaluation (4x the episodes of a training stream)."""
    ad = [r for r in rows if r["variant"] == "AD"]
    compressed = [r for r in rows if r["variant"] == "CompressedAD"]
    if not ad or not compressed:
        return "Goal check: needs AD and CompressedAD rows."
    full = max(r["n_transit"] for r in ad)
    full_rows = [r for r in ad if r["n_transit"] == full]
    long_key = f"final_fraction_of_optimal_at_{rows[0]['long_episodes']}_episodes"
    mean = lambda rs, k: 100 * np.mean([r[k] for r in rs])  # noqa: E731
    full_tokens = max(r["context_tokens"] for r in full_rows)
    full_final, full_long = mean(full_rows, "final_fraction_of_optimal"), mean(full_rows, long_key)
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    within = GOAL["within_points"]
    lines = [f"Goal check against full-history AD (n_transit {full}, {full_tokens} tokens, {len(full_rows)} seed(s)): "
             f"{full_final:.0f}% of optimal at episode {rows[0]['n_episodes']}, {full_long:.0f}% at episode "
             f"{rows[0]['long_episodes']}. Seed means; differences of a few points are within the seed spread.", "",
             f"| CompressedAD n_transit | seeds | tokens (share of full) | % of optimal "
             f"| at most {within} points below | "
             f"memory off | loses >= {GOAL['memory_points']} points | % at episode {rows[0]['long_episodes']} | "
             f"at most {within} points below there | all met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in sorted({r["n_transit"] for r in compressed}):
        rs = [r for r in compressed if r["n_transit"] == n]
        tokens = max(r["context_tokens"] for r in rs)
        final, off, long = mean(rs, "final_fraction_of_optimal"), mean(rs, "final_fraction_of_optimal_memory_off"), \
            mean(rs, long_key)
        small = tokens <= GOAL["token_fraction"] * full_tokens
        checks = [small, final >= full_final - GOAL["within_points"], final - off >= GOAL["memory_points"],
                  long >= full_long - GOAL["within_points"]]
        over = "" if small else f", over 1/{round(1 / GOAL['token_fraction'])}"
        lines.append(f"| {n} | {len(rs)} | {tokens} ({tokens / full_tokens:.1%}{over}) | "
                     f"{final:.0f}% | {yes(checks[1])} | {off:.0f}% | {yes(checks[2])} | {long:.0f}% | "
                     f"{yes(checks[3])} | {yes(all(checks))} |")
    return "\n".join(lines)


def plot_study(path: Path, rows: list[dict], title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    any_reached = False  # a point on the episodes-to-80% panel: every seed of a budget reached 80%
    for i, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        color = f"C{i}"
        budgets = sorted({r["n_transit"] for r in rows if r["variant"] == variant})
        x, on, off, on_err, to80 = [], [], [], [], []
        for n in budgets:
            rs = [r for r in rows if r["variant"] == variant and r["n_transit"] == n]
            x.append(max(r["context_tokens"] for r in rs))
            vals = [100 * r["final_fraction_of_optimal"] for r in rs]
            on.append(np.mean(vals))
            on_err.append(np.std(vals))
            off.append(np.mean([100 * r["final_fraction_of_optimal_memory_off"] for r in rs]))
            eps = [r["episodes_to_80"] for r in rs]
            to80.append(np.mean([e if e is not None else np.nan for e in eps]))  # nan unless all seeds reached it
            any_reached |= bool(np.isfinite(to80[-1]))
        ax1.errorbar(x, on, yerr=on_err, marker="o", color=color, label=variant, capsize=3)
        ax1.plot(x, off, marker="x", linestyle="--", color=color, label=f"{variant}, memory off")
        ax2.plot(x, to80, marker="o", color=color, label=variant)
    source = rows[0]["source_episodes_to_80"]
    if source is not None:
        ax2.axhline(source, color="k", linestyle=":", label="source learner")
    if not any_reached:  # nothing to draw on a log axis
        ax2.text(0.5, 0.5, "no budget reached 80% of optimal in every seed", ha="center", transform=ax2.transAxes)
        ax2.set_xlim(min(r["context_tokens"] for r in rows), max(r["context_tokens"] for r in rows))
    ax2.set_ylim(0, rows[0]["n_episodes"])  # the whole evaluation: "never" sits at the top, the source in context
    for ax, label in ((ax1, f"% of optimal, episode {rows[0]['n_episodes']}"), (ax2, "episodes to 80% of optimal")):
        ax.set_xscale("log")
        ax.set_xlabel("context tokens attended (log)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_budgets(ladders: dict, steps_in_stream: int):
    """Every budget fits a training stream (a window longer than the stream has no sample):
    found before the collection, not after it."""
    for variant, budgets in ladders.items():
        for n in budgets:
            if n is None:
                continue
            if n < 2:
                raise UserError(f"--budgets {n}: a context budget (n_transit) is at least 2 steps")
            if n > steps_in_stream:
                raise UserError(f"--budgets {n}: {variant}'s context is longer than a training stream "
                                f"({steps_in_stream} steps at these settings); use budgets up to {steps_in_stream}")


def run_study(args, setup, train_config, collect_cmd: list[str]):
    """Called by scripts/pipeline.py --study memory."""
    if args.size != "cpu":
        raise UserError("--study memory runs at --size cpu (the ladder and step budget are set for it)")
    if args.env not in LADDERS:
        raise UserError(f"--study memory has budget ladders for --env {' and '.join(LADDERS)} only (set for their "
                        f"streams and variants), not for --env {args.env}: use one of those")
    ladders = {v: LADDERS[args.env][v] for v in args.variants}
    if args.budgets:  # the same ladder for every variant whose budget is free
        ladders = {v: (ladder if ladder == [None] else sorted(set(args.budgets))) for v, ladder in ladders.items()}
    data_cfg = train_config(setup.data, setup.sets + args.set)
    check_budgets(ladders, steps_per_stream(data_cfg))
    base = Path(data_cfg["run_dir"]) / "memory_study" / args.env
    plan = plan_trainings(args, setup, train_config, ladders, steps_per_stream(data_cfg), base)
    out = ROOT / base
    out.mkdir(parents=True, exist_ok=True)
    print(f"memory study, {args.env}: {len(plan)} trainings, {args.jobs} at a time; output in {out}")
    tic = time.perf_counter()
    run(collect_cmd)
    run_jobs([(f"train_{v}_ctx{n}_seed{s}", argv) for (v, n, s), (argv, _) in plan.items()], args.jobs, out / "logs")
    run_dirs = {key: ROOT / run_path(cfg) for key, (_, cfg) in plan.items()}
    run_jobs(evaluation_jobs(args, setup, data_cfg, run_dirs, out), args.jobs, out / "logs")
    write_study(args, out, plan, run_dirs, data_cfg["eval_episodes"], tic)


def plan_trainings(args, setup, train_config, ladders: dict, steps_in_stream: int, base: Path) -> dict:
    """(variant, n_transit, seed) -> (train.py argv, resolved config): every config checked before any work."""
    plan = {}
    for variant, budgets in ladders.items():
        for n in budgets:
            for seed in args.seeds:
                # the study's run_dir comes last: a user's run_dir (in args.set) is its base
                configs = setup.data + [setup.variants[variant]]
                user = setup.sets + args.set
                sets = budget_overrides(train_config(configs, user), n, steps_in_stream) + [f"seed={seed}"] + \
                    user + [f"run_dir={base}/ctx{n or 'default'}"]
                cfg = train_config(configs, sets)
                check_training(cfg)  # a budget the data cannot hold stops here, not after the collection
                plan[variant, n, seed] = (["train.py", *configs, "--set", *sets], cfg)
    return plan


def evaluation_jobs(args, setup, data_cfg: dict, run_dirs: dict, out: Path) -> list:
    """evaluate.py calls of every setting of EVALS not yet on disk, one per job slot and setting."""
    long_episodes = LENGTH_FACTOR * steps_per_stream(data_cfg) // data_cfg["horizon"]
    jobs = []
    for tag, changes in EVALS.items():
        if tag == "T1" and t1_tag(data_cfg) == "keep":  # the chosen temperature is 1.0
            continue
        settings = {"eval_episodes": long_episodes if tag == "keep" else data_cfg["eval_episodes"],
                    "eval_memory": "keep", "eval_temperature": data_cfg["eval_temperature"],
                    "eval_split": data_cfg["eval_split"]} | changes
        expected = {SUMMARY_NAMES[k]: v for k, v in settings.items()}
        dirs = [str(d) for d in run_dirs.values() if not evaluated(d, tag, expected)]
        for part in range(args.jobs):
            chunk = dirs[part::args.jobs]
            if chunk:
                jobs.append((f"eval_{tag}_{part}", ["evaluate.py", *chunk, "--tag", tag, "--plot",
                                                    str(out / "logs" / f"comparison_{tag}_{part}.png"),
                                                    "--set", *setup.sets, *args.set,
                                                    *(f"{k}={v}" for k, v in settings.items())]))
    return jobs


def write_study(args, out: Path, plan: dict, run_dirs: dict, n_episodes: int, tic: float):
    """memory_study.json (this run's rows and the earlier ones), memory_study.md and the plot."""
    rows = earlier_rows(out / "memory_study.json", plan) + [
        study_row(v, s, cfg, run_dirs[v, n, s], n_episodes) for (v, n, s), (_, cfg) in plan.items()]
    rows.sort(key=lambda r: (r["variant"], r["n_transit"], r["seed"]))
    groups = {}
    for r in rows:
        groups.setdefault((r["variant"], r["n_transit"]), []).append(ROOT / r["run_dir"])
    (out / "memory_study.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = study_table(rows, groups, n_episodes) + "\n\n" + goal_check(rows)
    (out / "memory_study.md").write_text(table + "\n")
    seeds = sorted({r["seed"] for r in rows})
    plot_study(out / "memory_study.png", rows, f"{args.env}: held-out test tasks, seeds {seeds}")
    print(f"\n{table}\n\n{len(rows)} rows in {(time.perf_counter() - tic) / 60:.1f} min: {out / 'memory_study.json'}, "
          f"{out / 'memory_study.md'}, {out / 'memory_study.png'}")
