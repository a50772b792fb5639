"""The whole pipeline for one environment: collect, train every variant, evaluate, print the result table.

    python scripts/pipeline.py --size smoke              # darkroom 5x5, every variant, a few minutes on 2 cores
    python scripts/pipeline.py                           # darkroom, CPU size (about 30 min on 2 cores)
    python scripts/pipeline.py --size full               # darkroom at paper scale, for a GPU box
    python scripts/pipeline.py --seeds 0 1 2 --variants AD
    python scripts/pipeline.py --env dark_key_to_door    # 5x5 Dark Key-to-Door (CPU size)
    python scripts/pipeline.py --env dark_key_to_door --size 9x9        # 9x9, Q-learning histories
    python scripts/pipeline.py --env dark_key_to_door --size 9x9-ppo    # 9x9, PPO histories
    python scripts/pipeline.py --env dark_key_to_door --size 9x9-psrl   # 9x9, posterior-sampling histories
    python scripts/pipeline.py --env bandit              # 5-armed bandits: regret vs UCB1 / Thompson / PPO
    python scripts/pipeline.py --env point_robot         # 2-D point robot (continuous state)
    python scripts/pipeline.py --study memory            # return vs context size, memory on/off

Each stage is the user-facing command (collect.py, train.py, evaluate.py) run as a
subprocess, so this script does nothing a user could not do by hand. Rerunning it
resumes: finished collections and trainings are reused; evaluations run again
(deterministic, seconds to a minute each).
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import report
from cli import ArgumentParser, check_training, load_config, run_cli, run_path
from config.loading import parse_set
from errors import UserError
from files import atomic_write, ensure_writable_dir
from jobs import run, run_jobs


@dataclass(frozen=True)
class Setup:
    """One environment at one size: the configs that collect its data, one model config per
    variant, and the --set items its stages get (collection, training and evaluation must
    agree on the data keys, so `sets` go to all three; `train_sets` to training only)."""
    data: list[str]
    variants: dict[str, str]
    sets: list[str] = field(default_factory=list)
    train_sets: list[str] = field(default_factory=list)
    variant_sets: dict[str, list[str]] = field(default_factory=dict)  # one variant's training only, after those
    # a variant's own folder under the run_dir, where its run name would be another's (AD at two windows)
    folders: dict[str, str] = field(default_factory=dict)
    report: str = ""  # the family's own report script (bandit: regret against classic baselines)
    seeds: tuple[int, ...] = (0, 1, 2)  # default training seeds


# Transformer scale for a GPU box; the model configs hold the CPU size. Full runs get their
# own folder, so they never try to resume a CPU-size run of the same name.
FULL_MODEL = ["run_dir=runs/full", "tf_n_embd=128", "tf_n_layer=4", "tf_n_head=4", "train_batch_size=64",
              "train_timesteps=20000", "lr=5.0e-4", "warmup_steps=500", "eval_interval=2000", "num_workers=4"]
DARKROOM = ["config/algorithm/ppo_darkroom.yaml", "config/env/darkroom.yaml"]
DARKROOM_VARIANTS = {"AD": "config/model/ad_dr.yaml", "AD-tworegion": "config/model/ad_dr_compressed.yaml",
                     "CompressedAD": "config/model/ad_compressed_dr.yaml"}
K2D5 = ["config/algorithm/ppo_dark_key_to_door_5x5.yaml", "config/env/dark_key_to_door_5x5.yaml"]
K2D5_VARIANTS = {"AD": "config/model/ad_k2d.yaml", "AD-tworegion": "config/model/tworegion_ad_k2d.yaml",
                 "CompressedAD": "config/model/compressed_ad_k2d.yaml",
                 "SummaryAD": "config/model/summary_ad_k2d.yaml"}
K2D9_VARIANTS = {"AD": "config/model/ad_k2d9.yaml", "AD-tworegion": "config/model/tworegion_ad_k2d9.yaml",
                 "CompressedAD": "config/model/compressed_ad_k2d9.yaml",
                 "SummaryAD": "config/model/summary_ad_k2d9.yaml"}
BANDIT = ["config/algorithm/ppo_bandit.yaml", "config/env/bandit.yaml"]
BANDIT_VARIANTS = {"AD": "config/model/ad_bandit.yaml", "AD-10": "config/model/ad_bandit_short.yaml",
                   "CompressedAD": "config/model/compressed_ad_bandit.yaml"}
POINT_ROBOT = ["config/algorithm/ppo_point_robot.yaml", "config/env/point_robot.yaml"]

# Dark Key-to-Door 9x9 from tabular Q-learning, one learner per stream that improves only from its
# own episodes: 64 streams of 20 episodes per task (algorithm/q_learning.py; own run folder).
# CompressedAD at 50 context tokens (a quarter of AD's 200); evaluation at temperature 0.5, chosen
# on the validation tasks (docs/results/dark_key_to_door_9x9.md)
K2D9_Q = Setup(["config/algorithm/q_learning_dark_key_to_door.yaml", "config/env/dark_key_to_door_9x9_650.yaml"],
               {**K2D9_VARIANTS, "CompressedAD": "config/model/compressed_ad_k2d9_sets.yaml"},
               sets=["eval_temperature=0.5"], train_sets=["run_dir=runs/dark_key_to_door_9x9_q"])

# SETUPS[env][size]
SETUPS: dict[str, dict[str, Setup]] = {
    "darkroom": {
        "cpu": Setup(DARKROOM, DARKROOM_VARIANTS),
        "full": Setup(DARKROOM, DARKROOM_VARIANTS, train_sets=FULL_MODEL),
        # a 5x5 darkroom with short PPO histories and short trainings: every output of the
        # main job in a few minutes, in folders of its own
        "smoke": Setup(DARKROOM, DARKROOM_VARIANTS, seeds=(0,),
                       sets=["grid_size=5", "horizon=10", "n_steps=40", "batch_size=40", "n_stream=20",
                             "total_source_timesteps=12000", "train_env_ratio=0.8", "dataset_dir=datasets/smoke",
                             "run_dir=runs/smoke", "eval_episodes=30", "eval_rollouts=8"],
                       train_sets=["n_transit=60", "train_timesteps=600", "eval_interval=0", "test_interval=300"],
                       variant_sets={"AD-tworegion": ["compress_interval=40", "n_transit=80", "train_batch_size=12"]}),
    },
    "dark_key_to_door": {
        # 5x5 grid, 25-step episodes, 625 tasks; the 9x9 / 50-step setting of the AD paper is `full`
        "cpu": Setup(K2D5, K2D5_VARIANTS),
        # the AD paper's 9x9 grid (50-step episodes) at a 2-core size: 650 of its 6,561 tasks
        "9x9": K2D9_Q,
        "9x9-q": K2D9_Q,
        # the same 650 tasks from PPO histories: 8 streams x 160 episodes per task, one learner per task
        "9x9-ppo": Setup(["config/algorithm/ppo_dark_key_to_door.yaml", "config/env/dark_key_to_door_9x9_650.yaml"],
                         K2D9_VARIANTS),
        # the same 650 tasks, histories from posterior sampling instead of PPO: 64 streams of 20
        # episodes per task (algorithm/posterior_sampling.py; its own run folder)
        "9x9-psrl": Setup(["config/algorithm/posterior_sampling_dark_key_to_door.yaml",
                           "config/env/dark_key_to_door_9x9_650.yaml"],
                          {**K2D9_VARIANTS, "CompressedAD": "config/model/compressed_ad_k2d9_short_streams.yaml"},
                          train_sets=["run_dir=runs/dark_key_to_door_9x9_psrl"]),
        "full": Setup(["config/algorithm/ppo_dark_key_to_door.yaml", "config/env/dark_key_to_door_9x9_all.yaml"],
                      K2D5_VARIANTS, train_sets=FULL_MODEL + ["n_transit=200", "compress_interval=100"]),
    },
    "bandit": {
        # 5-armed Bernoulli bandits, 500 tasks; AD with a 150-pull window, its short-window
        # ablation (10 pulls; own folder, same run name) and CompressedAD with AD-10's window
        # plus latents; the regret table against UCB1, Thompson sampling and the source PPO
        # comes from the report script
        "cpu": Setup(BANDIT, BANDIT_VARIANTS, folders={"AD-10": "ad10"}, report="scripts/bandit_baselines.py"),
        "full": Setup(BANDIT, BANDIT_VARIANTS, train_sets=FULL_MODEL, folders={"AD-10": "ad10"},
                      report="scripts/bandit_baselines.py"),
    },
    "point_robot": {
        # 2-D point robot with a Box observation: plain AD only (the two-region markers and
        # CompressedAD's stages refuse a vector state, see their check_config)
        "cpu": Setup(POINT_ROBOT, {"AD": "config/model/ad_point_robot.yaml"}),
        "full": Setup(POINT_ROBOT, {"AD": "config/model/ad_point_robot.yaml"}, train_sets=FULL_MODEL),
    },
}
VARIANTS = list(dict.fromkeys(v for sizes in SETUPS.values() for setup in sizes.values() for v in setup.variants))
SIZES = list(dict.fromkeys(size for sizes in SETUPS.values() for size in sizes))


def training_sets(setup: Setup, variant: str, seed: int, extra: list[str]) -> list[str]:
    """The --set items of one variant's training: the setup's, the seed, the user's, then the
    variant's own folder under the run_dir they resolve to (last, so that it wins)."""
    sets = setup.sets + setup.train_sets + setup.variant_sets.get(variant, []) + [f"seed={seed}"] + extra
    if variant not in setup.folders:
        return sets
    base = train_config(setup.data + [setup.variants[variant]], sets)["run_dir"]
    return sets + [f"run_dir={Path(base) / setup.folders[variant]}"]


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
    header = ["variant", "seeds", "% of optimal", "per seed", "IQM [95% CI]", "first-episode return",
              "episodes to 80%", "final return", "optimal", "source episodes to 80%", "context tokens",
              "train time / run", "hardware"]
    cells = [[r["variant"], str(r["seeds"]), report.percent(r['fraction']),
              " / ".join(report.percent(f, 1).rstrip("%") for f in r["per_seed"]), r["iqm"], f"{r['first']:.2f}",
              str(r["episodes_to_80"]), f"{r['final']:.2f}", f"{r['optimal']:.2f}", str(r["source_episodes_to_80"]),
              str(r["context"]), f"{r['train_seconds'] / 60:.1f} min", r["hardware"]] for r in rows]
    return report.markdown_tables(header, cells)


def table_row(variant: str, run_dirs: list[Path], eval_tag: str = "") -> dict:
    """Mean over seeds of what evaluate.py (its evaluation tagged `eval_tag`, or the untagged
    one) and train.py wrote into the run folders; the seeds must have been evaluated on the same tasks."""
    summaries, returns = zip(*(report.load_evaluation(d, eval_tag) for d in run_dirs))
    for d, s in zip(run_dirs[1:], summaries[1:]):
        if s.get("task_indices") != summaries[0].get("task_indices"):
            raise UserError(f"{d} was evaluated on other tasks than {run_dirs[0]}: one row averages the same "
                            "tasks; evaluate every seed with the same eval_split (rerun the pipeline)")
    trainings = [report.load_training(d) for d in run_dirs]
    mean = lambda k: sum(s[k] for s in summaries) / len(summaries)  # noqa: E731
    optimal = summaries[0]["optimal_return"]
    return {"variant": variant, "seeds": len(summaries), "final": mean("final_return"),
            "optimal": sum(optimal) / len(optimal), "fraction": mean("final_fraction_of_optimal"),
            "per_seed": [s["final_fraction_of_optimal"] for s in summaries],
            "iqm": report.format_iqm(report.iqm_with_ci(report.fraction_scores(summaries, returns))),
            "first": mean("first_return"), "episodes_to_80": [s["episodes_to_80pct"] for s in summaries],
            "source_episodes_to_80": summaries[0]["source_episodes_to_80pct"],
            "context": max(s["max_context_tokens"] for s in summaries),
            "train_seconds": sum(t["seconds"] for t in trainings) / len(trainings),
            "hardware": trainings[0]["hardware"]}


def train_config(configs: list[str], overrides: list[str]) -> dict:
    """The config train.py will resolve, so the run directory is read, never guessed."""
    return load_config([ROOT / c for c in configs], parse_set(overrides))


def checked_config(configs: list[str], overrides: list[str]) -> dict:
    """A training's config with every check its train.py and evaluate.py calls will make from the
    config alone: a training or evaluation that would refuse stops the pipeline before the collection."""
    from evaluate import check_evaluation
    cfg = train_config(configs, overrides)
    check_training(cfg)
    check_evaluation(cfg)
    return cfg


# eval_summary.json entries and the config keys that made them: a run evaluated otherwise is not the setup's
EVALUATED_WITH = {"temperature": "eval_temperature", "greedy": "eval_greedy", "seed": "eval_seed",
                  "memory": "eval_memory"}


def check_made_with(run_dir: Path, cfg: dict, eval_tag: str):
    """A finished run tabulated under the setup's name was trained (and, untagged, evaluated) with
    the setup's settings: a run_dir reused with other settings is refused, not reported."""
    from train import run_differences
    diff = run_differences(run_dir, cfg)
    if not eval_tag:  # a tagged evaluation is another setting on purpose (e.g. temperature 1.0)
        summary, _ = report.load_evaluation(run_dir)
        diff += [f"{key}={summary.get(entry)!r} (now {cfg[key]!r})" for entry, key in EVALUATED_WITH.items()
                 if entry in summary and summary[entry] != cfg[key]]
    if diff:
        raise UserError(f"{run_dir} was made with other settings than this setup's ({', '.join(diff[:4])}): "
                        "give the --env, --size and --set it ran with, or rerun the pipeline to redo it")


def write_table_of_finished(args, plan: dict, out_dir: Path, tag: str):
    """--table-only: the table of the evaluated runs, each variant over the seeds it has."""
    run_dirs = {key: str(run_path(cfg)) for key, (_, cfg) in plan.items()}
    if not out_dir.is_dir():  # a wrong run_dir is not "no evaluation"
        raise UserError(f"run folder not found: {out_dir}; give the run_dir the pipeline ran with (--set run_dir=...)")
    rows, absent = [], []
    for variant in args.variants:
        done = [ROOT / run_dirs[variant, s] for s in args.seeds
                if report.evaluation_files(ROOT / run_dirs[variant, s], args.eval_tag)[0].is_file()]
        absent += [f"{variant} seed {s}" for s in args.seeds if ROOT / run_dirs[variant, s] not in done]
        for s in args.seeds:
            if ROOT / run_dirs[variant, s] in done:
                check_made_with(ROOT / run_dirs[variant, s], plan[variant, s][1], args.eval_tag)
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


def parse_args() -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", choices=SETUPS, default="darkroom")
    p.add_argument("--size", choices=SIZES, default="cpu",
                   help="cpu: finishes on a laptop; smoke (darkroom): a 5x5 grid, every output in a few minutes; "
                        "full: paper scale, for a GPU box; 9x9 (dark_key_to_door): the 9x9 grid on 650 tasks from "
                        "Q-learning histories (about 20 min of training per run on 2 CPU cores, collection 1 min; also "
                        "reachable as 9x9-q); "
                        "9x9-ppo: the same tasks from PPO histories (collection 30 min); 9x9-psrl: from posterior "
                        "sampling (algorithm/posterior_sampling.py)")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds per variant (default 0 1 2; smoke: 0)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: every variant of the --env")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra overrides for every stage, e.g. env_split_seed=1 run_dir=runs/split1")
    p.add_argument("--study", choices=["memory"], help="memory: train every variant at a ladder of context "
                   "budgets and evaluate each with its memory on and off (see scripts/memory_study.py)")
    p.add_argument("--budgets", type=int, nargs="+", help="--study: the n_transit ladder of AD, CompressedAD "
                   "and SummaryAD (its most tokens attended) (default: scripts/memory_study.py LADDERS)")
    p.add_argument("--table-only", action="store_true", help="run nothing: the table of the runs among "
                   "--variants x --seeds that have an evaluation (eval_summary.json), as they are")
    p.add_argument("--eval-tag", default="", help="with --table-only: the evaluations tagged so (evaluate.py "
                   "--tag TAG), e.g. test_T10 after evaluate.py RUN --tag test_T10 --set eval_temperature=1.0")
    p.add_argument("--jobs", type=int, help="trainings and evaluations run at once, each logging to a file "
                   "under the run_dir's logs/ (each uses one CPU thread; default 1, --study 2; on a GPU box the "
                   "small models share the GPU, e.g. --jobs 9 for 3 variants x 3 seeds)")
    args = p.parse_args()
    sizes = SETUPS[args.env]
    if args.size not in sizes:
        p.error(f"--env {args.env} has no size {args.size!r}; its sizes: {', '.join(sizes)}")
    setup = sizes[args.size]
    args.seeds = list(dict.fromkeys(args.seeds or setup.seeds))
    args.variants = list(dict.fromkeys(args.variants or setup.variants))
    missing = [v for v in args.variants if v not in setup.variants]
    if missing:
        p.error(f"--env {args.env} has no variant {', '.join(missing)}; its variants: {', '.join(setup.variants)}")
    if args.jobs is None:
        args.jobs = 2 if args.study else 1
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    # flags that would be ignored in this combination: refused, so nothing is silently not done
    if args.table_only and args.study:
        p.error("--table-only writes the pipeline's table, --study its own (memory_study.md, rerun to refresh it): "
                "drop one of them")
    if args.budgets and not args.study:
        p.error("--budgets sets the ladder of a study: add --study memory, or drop --budgets (the pipeline "
                "trains at each model config's n_transit)")
    if args.budgets and min(args.budgets) < 2:
        p.error(f"--budgets {min(args.budgets)}: a context budget (n_transit) is at least 2 steps")
    if args.eval_tag and not args.table_only:
        p.error("--eval-tag reads evaluations that are already there: use it with --table-only")
    return args


def plan_trainings(args, setup: Setup) -> dict:
    """{(variant, seed): (training --set items, resolved config)}: every config is resolved
    before any work, so a typo costs a second, not a collection."""
    plan = {}
    for variant in args.variants:
        for seed in args.seeds:
            sets = training_sets(setup, variant, seed, args.set)
            plan[variant, seed] = sets, checked_config(setup.data + [setup.variants[variant]], sets)
    run_dirs = [str(run_path(cfg)) for _, cfg in plan.values()]
    if len(set(run_dirs)) < len(run_dirs):
        raise UserError("two variants resolve to the same run directory; give one of them its own folder in SETUPS")
    return plan


def evaluation_commands(args, setup: Setup, run_dirs: dict, out_dir: Path, name: str) -> tuple[dict, dict]:
    """One evaluate.py call per seed, which also draws that seed's comparison plot of the variants."""
    plots = {seed: out_dir / f"comparison_{name}_seed{seed}.png" for seed in args.seeds}
    commands = {}
    for seed in args.seeds:
        dirs = [run_dirs[v, seed] for v in args.variants]
        plot_args = ["--plot", str(plots[seed])] if len(dirs) > 1 else []
        commands[f"evaluate seed{seed}"] = ["evaluate.py", *dirs, *plot_args, *with_set(setup.sets + args.set)]
    return commands, plots


def run_pipeline(args, setup: Setup, plan: dict, out_dir: Path, name: str, tag: str):
    """Collect, train every variant and seed, evaluate, and write the result table."""
    run_dirs = {key: str(run_path(cfg)) for key, (_, cfg) in plan.items()}
    for _, cfg in plan.values():  # the last stages write there: find out now, not after the collection
        ensure_writable_dir(ROOT / cfg["dataset_dir"], "dataset directory")
        ensure_writable_dir(ROOT / cfg["run_dir"], "run directory")
    tic = time.perf_counter()
    seconds = {"collect": run(["collect.py", *setup.data, *with_set(setup.sets + args.set)])}
    trainings = {f"train {variant} seed{seed}": ["train.py", *setup.data, setup.variants[variant], *with_set(sets)]
                 for (variant, seed), (sets, _) in plan.items()}
    evaluations, plots = evaluation_commands(args, setup, run_dirs, out_dir, name)
    for stage in (trainings, evaluations):
        seconds.update(run_stage(stage, args.jobs, out_dir / "logs" / tag))  # own folder: runs/ is shared
    rows = [table_row(v, [ROOT / run_dirs[v, seed] for seed in args.seeds]) for v in args.variants]
    table = result_table(rows)
    if setup.report:  # the family's own table (bandit: regret against UCB1 / Thompson / PPO), seeds pooled
        report_file = out_dir / f"report_{tag}.md"
        seconds["report"] = run([setup.report, *(run_dirs[v, s] for v in args.variants for s in args.seeds),
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


def main():
    args = parse_args()
    setup = SETUPS[args.env][args.size]
    if args.study == "memory":
        import memory_study
        memory_study.run_study(args, setup, train_config, ["collect.py", *setup.data, *with_set(setup.sets + args.set)])
        return
    plan = plan_trainings(args, setup)
    out_dir = ROOT / next(iter(plan.values()))[1]["run_dir"]
    name = f"{args.env}_{args.size}"
    if args.variants != list(setup.variants):  # a subset gets its own files, so side-by-side runs never overwrite
        name += "_" + "-".join(args.variants)
    tag = f"{name}_seeds" + "-".join(map(str, args.seeds))
    if args.table_only:
        return write_table_of_finished(args, plan, out_dir, tag)
    run_pipeline(args, setup, plan, out_dir, name, tag)


if __name__ == "__main__":
    run_cli(main)
