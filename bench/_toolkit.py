"""Imported first by every bench script: puts the repository root, not bench/, first on sys.path.

bench/train.py and bench/evaluate.py share their names with the toolkit's train.py and
evaluate.py, so `python bench/train.py` would otherwise import itself instead of the toolkit.

AD_TOOLKIT_ROOT (an environment variable) points the script at another checkout of the
toolkit: `bench/collect.py --baseline DIR` times an older commit's code with it.
"""
import os
import sys
from pathlib import Path

ROOT = Path(os.environ.get("AD_TOOLKIT_ROOT") or Path(__file__).resolve().parents[1]).resolve()
BENCH = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == BENCH:
    sys.path[0] = str(ROOT)  # run as a script
    # last, not gone: a worker process started with "spawn" (the batched PPO's) gets this
    # sys.path and re-imports the script, whose first line imports this module
    sys.path.append(str(BENCH))
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
