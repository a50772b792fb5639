"""Files a user may hold from an earlier version of the toolkit still read: history files
without the collection keys added since, evaluation summaries and memory-study tables with
keys under their older names."""
import json
import sys
from pathlib import Path

import h5py
import numpy as np
from fixtures_history import build_history_file, make_cfg

from algorithm import history
from config.schema import COLLECTION_KEYS_ADDED_LATER, applies

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import memory_study
import report


def test_a_history_file_without_the_keys_added_later_reads_with_their_old_values(tmp_path):
    cfg = make_cfg(tmp_path)
    path = build_history_file(cfg)
    with h5py.File(path, "a") as f:
        cc = json.loads(f.attrs["collection_config"])
        for key in COLLECTION_KEYS_ADDED_LATER:
            cc.pop(key, None)
        f.attrs["collection_config"] = json.dumps(cc)
    header = history.read_header(path)
    for key, value in COLLECTION_KEYS_ADDED_LATER.items():
        if applies(key, cfg):  # a key of another source (noise_decay_episodes for PPO) is no part of the data
            assert header["collection_config"][key] == value
        else:
            assert key not in header["collection_config"]


def test_an_evaluation_summary_with_the_older_key_names_reads_under_the_new_ones(tmp_path):
    summary, returns = report.evaluation_files(tmp_path, "")
    summary.write_text(json.dumps({"ppo_episodes_to_80pct": 7, "final_return": 1.0, "n_rollouts": 2,
                                   "per_task": [{"optimal": 2.0}]}))
    np.save(returns, np.zeros((2, 3)))
    loaded, _ = report.load_evaluation(tmp_path)
    assert loaded["source_episodes_to_80pct"] == 7 and "ppo_episodes_to_80pct" not in loaded


def test_a_memory_study_table_with_the_older_key_name_reads_under_the_new_one(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "AD-darkroom-seed0"
    run.mkdir(parents=True)
    (run / "eval_summary_keep.json").write_text("{}")
    table = tmp_path / "study.json"
    table.write_text(json.dumps([{"variant": "AD", "n_transit": 100, "seed": 0, "ppo_episodes_to_80": 12,
                                  "run_dir": "runs/AD-darkroom-seed0"}]))
    monkeypatch.setattr(memory_study, "ROOT", tmp_path)
    rows = memory_study.earlier_rows(table, {})
    assert rows[0]["source_episodes_to_80"] == 12 and "ppo_episodes_to_80" not in rows[0]
