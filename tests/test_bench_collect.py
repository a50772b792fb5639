"""bench/collect.py runs end to end at a tiny size (its worker processes re-import the script)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 40-60 s: two interleaved pairs of collections with worker processes
def test_collect_bench_interleaves_pairs_and_reports_each_ratio():
    proc = subprocess.run([sys.executable, "bench/collect.py", "--rollouts", "2", "--sb3-tasks", "1", "--batched-tasks",
                           "2", "--n-stream", "4", "--k2d-tasks", "0", "--repeats", "2", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r.get("backend"), r.get("repeat")) for r in records[:4]] == [("sb3", 0), ("batched", 0),
                                                                         ("sb3", 1), ("batched", 1)]
    speedup = records[-1]
    assert speedup["result"] == "speedup" and len(speedup["batched_over_sb3_each"]) == 2
    assert len(speedup["load_avg_1min_sb3"]) == len(speedup["load_avg_1min_batched"]) == 2


@pytest.mark.slow  # ~60 s: the baseline runs in its own process, importing the checkout it is given
def test_collect_bench_times_a_baseline_checkout_interleaved():
    proc = subprocess.run([sys.executable, "bench/collect.py", "--rollouts", "2", "--skip-sb3", "--batched-tasks", "2",
                           "--n-stream", "4", "--k2d-tasks", "2", "--repeats", "2", "--device", "cpu",
                           "--baseline", str(ROOT)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    order = [(r.get("backend"), r.get("env"), r.get("repeat")) for r in records if "backend" in r]
    assert order == [("baseline", "darkroom", 0), ("batched", "darkroom", 0), ("baseline", "darkroom", 1),
                     ("batched", "darkroom", 1), ("baseline", "dark_key_to_door", 0),
                     ("batched", "dark_key_to_door", 0), ("baseline", "dark_key_to_door", 1),
                     ("batched", "dark_key_to_door", 1)]
    assert all(r["toolkit_root"] == str(ROOT) for r in records if "backend" in r)
    assert all(r["n_stream"] == 8 for r in records if r.get("env") == "dark_key_to_door" and "backend" in r)
    ratios = [r for r in records if r.get("result") == "speedup_over_baseline"]
    assert [r["env"] for r in ratios] == ["darkroom", "dark_key_to_door"]
    assert all(len(r["this_over_baseline_each"]) == 2 for r in ratios)


def test_collect_bench_refuses_a_baseline_that_is_not_a_checkout(tmp_path):
    proc = subprocess.run([sys.executable, "bench/collect.py", "--baseline", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a checkout of the toolkit" in proc.stderr
