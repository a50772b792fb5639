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
