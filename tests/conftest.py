import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small darkroom dataset (every task, the test config), built once per test module."""
    from fixtures_history import build_history_file, make_cfg

    d = tmp_path_factory.mktemp("data")
    build_history_file(make_cfg(d))
    return d
