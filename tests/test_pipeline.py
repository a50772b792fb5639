"""scripts/pipeline.py: every setup resolves, bad input stops before work, a tiny run writes its table."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import pipeline

from cli import run_path


@pytest.mark.parametrize("env,size", [(env, size) for env, sizes in pipeline.SETUPS.items() for size in sizes])
def test_every_setup_resolves_to_its_own_run_and_matching_data_keys(env, size):
    setup = pipeline.SETUPS[env][size]
    runs = set()
    for variant, model_cfg in setup.variants.items():
        sets = pipeline.training_sets(setup, variant, 0, [])
        cfg = pipeline.train_config(setup.data + [model_cfg], sets)
        assert cfg["env"] == env
        if cfg["use_compressed_context"]:  # a region is one PPO rollout of this data
            assert cfg["compress_interval"] == cfg["n_steps"]
        if cfg["model"] == "CompressedAD":  # the deepest compression fits one stream of this data
            steps_per_stream = cfg["total_source_timesteps"] // cfg["n_stream"]
            assert cfg["max_compression_depth"] * (cfg["n_transit"] // 2) + cfg["n_transit"] <= steps_per_stream
        runs.add(run_path(cfg))
    assert len(runs) == len(setup.variants)


def test_sizes_never_share_a_run_directory():
    """Two setups never share a run directory; a size that names the same setup (9x9 and 9x9-q) does."""
    for env, sizes in pipeline.SETUPS.items():
        setups = list({id(setup): setup for setup in sizes.values()}.values())
        cfgs = [pipeline.train_config(setup.data + [setup.variants["AD"]], setup.sets + setup.train_sets)
                for setup in setups]
        assert len({run_path(c) for c in cfgs}) == len(setups), env


def test_a_size_the_environment_lacks_is_refused():
    proc = _pipeline("--env", "darkroom", "--size", "9x9")
    assert proc.returncode == 2 and "has no size '9x9'" in proc.stderr


def _pipeline(*args):
    return subprocess.run([sys.executable, "scripts/pipeline.py", *args], cwd=ROOT, capture_output=True, text=True)


def test_unknown_key_stops_before_any_work(tmp_path):
    proc = _pipeline("--set", "n_trasnit=10", f"dataset_dir={tmp_path}")
    assert proc.returncode == 2
    assert "n_trasnit" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_tiny_run_writes_table_timings_and_plot_under_run_dir(tmp_path):
    sets = ["grid_size=3", "horizon=6", "n_steps=12", "batch_size=12", "n_stream=4", "n_process=1", "test_stream_ratio=0.25", "total_source_timesteps=96",
            "train_env_ratio=0.7", "compress_interval=12", "n_transit=24", "train_timesteps=4", "eval_interval=0",
            "test_interval=100", "tf_n_embd=16", "eval_episodes=2", "eval_rollouts=1", "device=cpu",
            f"dataset_dir={tmp_path}/data", f"run_dir={tmp_path}/runs"]
    proc = _pipeline("--variants", "AD", "AD-tworegion", "--seeds", "0", "--jobs", "2", "--set", *sets)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "runs"
    # --jobs 2: the two trainings ran side by side, each into its own log
    assert {"train_AD_seed0.log", "train_AD-tworegion_seed0.log"} <= {f.name for f in (out / "logs" / "darkroom_cpu_AD-AD-tworegion_seeds0").iterdir()}
    tables = (out / "results_darkroom_cpu_AD-AD-tworegion_seeds0.md").read_text().split("\n\n")
    for table in tables:  # narrow enough for the documentation page, every one with a row per variant
        lines = table.strip().splitlines()
        assert len(lines[0].split("|")) - 2 <= 7
        assert [row.split("|")[1].strip() for row in lines[2:]] == ["AD", "AD-tworegion"]
    timings = json.loads((out / "timings_darkroom_cpu_AD-AD-tworegion_seeds0.json").read_text())
    assert {"collect", "train AD seed0", "evaluate seed0", "total (this script)"} <= set(timings)
    assert (out / "comparison_darkroom_cpu_AD-AD-tworegion_seed0.png").stat().st_size > 0
    assert (out / "AD-tworegion-darkroom-seed0" / "eval_summary.json").exists()
    # a tagged evaluation of one run: --table-only --eval-tag tables it and names the run without one
    evaluation = subprocess.run([sys.executable, "evaluate.py", str(out / "AD-darkroom-seed0"), "--tag", "t1", "--set",
                                 "eval_temperature=1.0"], cwd=ROOT, capture_output=True, text=True)
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    proc = _pipeline("--variants", "AD", "AD-tworegion", "--seeds", "0", "--table-only", "--eval-tag", "t1", "--set", *sets)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not evaluated (left out): AD-tworegion seed 0" in proc.stdout
    tagged = (out / "results_darkroom_cpu_AD-AD-tworegion_seeds0_t1_finished.md").read_text()
    assert [row.split("|")[1].strip() for row in tagged.split("\n\n")[0].splitlines()[2:]] == ["AD"]
    per_seed = 100 * json.loads((out / "AD-darkroom-seed0" / "eval_summary_t1.json").read_text())["final_fraction_of_optimal"]
    assert tagged.splitlines()[2].split("|")[4].strip() == f"{per_seed:.1f}"


def test_a_variant_the_env_does_not_have_is_refused_before_any_work(tmp_path):
    proc = _pipeline("--env", "point_robot", "--variants", "CompressedAD", "--set", f"dataset_dir={tmp_path}")
    assert proc.returncode == 2 and "point_robot has no variant CompressedAD" in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # 50-80 s: 4 trainings and 8 evaluation processes
def test_tiny_memory_study_writes_one_row_per_variant_budget_seed(tmp_path):
    sets = ["grid_size=3", "horizon=6", "n_steps=12", "batch_size=12", "n_stream=4", "n_process=1",
            "test_stream_ratio=0.25", "total_source_timesteps=96", "train_env_ratio=0.7", "n_latent=2",
            "train_timesteps=4", "eval_interval=0", "test_interval=100", "tf_n_embd=16", "eval_episodes=2",
            "eval_rollouts=2", "device=cpu", f"dataset_dir={tmp_path}/data", f"run_dir={tmp_path}/runs"]
    proc = _pipeline("--study", "memory", "--variants", "AD", "CompressedAD", "--seeds", "0", "--budgets", "6", "12",
                     "--set", *sets)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "runs" / "memory_study" / "darkroom"
    rows = json.loads((out / "memory_study.json").read_text())
    assert sorted((r["variant"], r["n_transit"]) for r in rows) == [
        ("AD", 6), ("AD", 12), ("CompressedAD", 6), ("CompressedAD", 12)]
    keys = {"variant", "seed", "context_tokens", "context_bytes", "final_fraction_of_optimal", "episodes_to_80",
            "final_fraction_of_optimal_memory_off", "episodes_to_80_memory_off", "train_seconds"}
    assert all(keys <= set(r) for r in rows)
    # the context the rows report is what each variant attends to: window, or latents + recent steps
    assert {(r["variant"], r["n_transit"]): r["context_tokens"] for r in rows} == {
        ("AD", 6): 6, ("AD", 12): 12, ("CompressedAD", 6): 8, ("CompressedAD", 12): 14}
    assert rows[0]["long_episodes"] == 4 * 24 // 6  # 4x the episodes of one 24-step training stream
    assert {Path(r["run_dir"]).parent.name for r in rows} == {"ctx6", "ctx12"}  # one folder per budget
    table = (out / "memory_study.md").read_text()
    n_tables = table.count("| variant, n_transit |")  # a wide table is split into tables that fit a page
    assert n_tables >= 2 and table.count("\n| AD, 6 |") == table.count("\n| AD, 12 |") == n_tables
    assert "IQM" in table
    assert (out / "memory_study.png").stat().st_size > 0


def test_eval_tag_without_table_only_is_refused(tmp_path):
    proc = _pipeline("--eval-tag", "t1", "--set", f"run_dir={tmp_path}/runs", f"dataset_dir={tmp_path}/data")
    assert proc.returncode == 2 and "use it with --table-only" in proc.stderr
    assert not (tmp_path / "data").exists()


def test_table_only_without_evaluations_runs_nothing_and_exits_2(tmp_path):
    (tmp_path / "runs").mkdir()
    proc = _pipeline("--table-only", "--seeds", "0", "--set", f"run_dir={tmp_path}/runs", f"dataset_dir={tmp_path}/data")
    assert proc.returncode == 2 and "no run of these variants and seeds has an evaluation" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()  # nothing was collected


def test_table_only_with_a_missing_run_folder_says_so(tmp_path):
    proc = _pipeline("--table-only", "--seeds", "0", "--set", f"run_dir={tmp_path}/runs", f"dataset_dir={tmp_path}/data")
    assert proc.returncode == 2 and "run folder not found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_study_plot_draws_budgets_where_only_some_seeds_reach_80_percent(tmp_path):
    """A budget whose seeds reached 80% in some runs only has no mean on the log axis; the plot
    must still be drawn (it crashed with 'Data cannot be log-scaled' when no budget had one)."""
    import memory_study
    row = {"variant": "AD", "n_transit": 100, "context_tokens": 100, "final_fraction_of_optimal": 0.8,
           "final_fraction_of_optimal_memory_off": 0.2, "source_episodes_to_80": 9, "n_episodes": 100}
    rows = [{**row, "seed": 0, "episodes_to_80": 44}, {**row, "seed": 1, "episodes_to_80": None},
            {**row, "n_transit": 10, "context_tokens": 10, "seed": 0, "episodes_to_80": None}]
    memory_study.plot_study(tmp_path / "study.png", rows, "test")
    assert (tmp_path / "study.png").stat().st_size > 0


def test_goal_check_compares_compressed_ad_with_the_longest_ad_window():
    import memory_study
    base = {"seed": 0, "n_episodes": 100, "long_episodes": 400, "final_fraction_of_optimal_memory_off": 0.2}
    row = lambda variant, n, tokens, final, long, off=0.2: {  # noqa: E731
        **base, "variant": variant, "n_transit": n, "context_tokens": tokens, "final_fraction_of_optimal": final,
        "final_fraction_of_optimal_at_400_episodes": long, "final_fraction_of_optimal_memory_off": off}
    rows = [row("AD", 100, 100, 0.9, 0.9), row("AD", 1000, 1000, 0.7, 0.68),
            row("CompressedAD", 25, 33, 0.66, 0.65, off=0.3),   # within 5 of 70 (not of AD-100's 90), loses 36
            row("CompressedAD", 10, 18, 0.66, 0.6, off=0.5),    # loses only 16, and 8 below at the long episode
            row("CompressedAD", 200, 208, 0.8, 0.8)]            # more than 1/8 of 1000 tokens
    lines = {line.split(" |")[0]: line for line in memory_study.goal_check(rows).splitlines() if line.startswith("| ")}
    assert "n_transit 1000, 1000 tokens" in memory_study.goal_check(rows)
    assert lines["| 25"].endswith("| yes |")
    assert lines["| 10"].count("**no**") == 3  # memory, the long episode, all met
    assert "over 1/8" in lines["| 200"] and lines["| 200"].endswith("| **no** |")
    assert memory_study.goal_check(rows[:2]).startswith("Goal check: needs")


def test_job_logs_keep_earlier_runs(tmp_path):
    import jobs
    for word in ("first", "second"):
        jobs.run_jobs([("say", ["-c", f"print('{word}')"])], 1, tmp_path)
    log = (tmp_path / "say.log").read_text()
    assert log.count("=== ") == 2 and log.index("first") < log.index("second")


def test_an_unfinished_or_missing_run_is_named_as_such_in_a_table(tmp_path):
    import report
    from errors import UserError
    with pytest.raises(UserError, match="run folder not found"):
        report.load_training(tmp_path / "nowhere")
    with pytest.raises(UserError, match="has not finished training"):
        report.load_training(tmp_path)
    (tmp_path / "train_summary.json").write_text("{")
    with pytest.raises(UserError, match="is damaged"):
        report.load_training(tmp_path)


def test_9x9_compressed_variants_read_at_most_a_quarter_of_ads_context():
    """The compressed recipes of the Q-learning 9x9 setup attend to at most a quarter of AD's tokens."""
    from model import variant_of
    setup = pipeline.SETUPS["dark_key_to_door"]["9x9-q"]

    def tokens(variant):
        cfg = pipeline.train_config(setup.data + [setup.variants[variant]], pipeline.training_sets(setup, variant, 0, []))
        return variant_of(cfg).transformer_runs(cfg, training=False)[0][1]

    assert pipeline.SETUPS["dark_key_to_door"]["9x9"] is setup
    for variant in ("CompressedAD", "SummaryAD"):
        assert 4 * tokens(variant) <= tokens("AD") - 4, variant  # AD's count includes 4 two-region markers
