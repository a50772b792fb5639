"""What an earlier version of the toolkit wrote still works: config files under their older
names, history files without the collection keys added since, evaluation summaries with the
keys under their older names."""
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from fixtures_history import build_history_file, make_cfg

from algorithm import history
from cli import load_config
from config.loading import resolve_config
from config.schema import COLLECTION_KEYS_ADDED_LATER, applies

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import report

RENAMED_CONFIGS = {
    "ad_k2d_compressed.yaml": "tworegion_ad_k2d.yaml",
    "ad_k2d9_compressed.yaml": "tworegion_ad_k2d9.yaml",
    "ad_compressed_k2d.yaml": "compressed_ad_k2d.yaml",
    "ad_compressed_k2d9.yaml": "compressed_ad_k2d9.yaml",
    "ad_compressed_k2d9_short_streams.yaml": "compressed_ad_k2d9_short_streams.yaml",
    "ad_compressed_bandit.yaml": "compressed_ad_bandit.yaml",
}


@pytest.mark.parametrize("old,new", RENAMED_CONFIGS.items())
def test_a_model_config_under_its_older_name_gives_the_same_config(old, new):
    data = (["config/algorithm/ppo_bandit.yaml", "config/env/bandit.yaml"] if "bandit" in new else
            ["config/algorithm/ppo_dark_key_to_door.yaml", "config/env/dark_key_to_door_9x9.yaml"] if "k2d9" in new else
            ["config/algorithm/ppo_dark_key_to_door_5x5.yaml", "config/env/dark_key_to_door_5x5.yaml"])
    files = [ROOT / f for f in data]
    assert load_config(files + [ROOT / "config/model" / old]) == load_config(files + [ROOT / "config/model" / new])


def test_every_model_config_opens_with_its_variant_and_environment():
    names = {"AD": "AD", "two-region AD": "AD", "CompressedAD": "CompressedAD", "SummaryAD": "SummaryAD"}
    for path in sorted((ROOT / "config/model").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        variant = next((v for v in sorted(names, key=len, reverse=True) if first.startswith(f"# {v} on ")), None)
        assert variant, f"{path.name}: the first line names no variant: {first!r}"
        text = resolve_config([path])  # the model keys alone, defaults elsewhere (no data to match)
        assert text["model"] == names[variant], path.name
        assert text["use_compressed_context"] == (variant == "two-region AD"), path.name


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
