"""scripts/report.py: the IQM and its stratified-bootstrap interval, and the score matrix
read from evaluate.py's outputs."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import report


def test_iqm_is_the_mean_of_the_middle_half():
    scores = np.arange(1.0, 9.0).reshape(4, 2)  # 1..8: the middle half is 3, 4, 5, 6
    point, low, high = report.iqm_with_ci(scores)
    assert point == 4.5
    assert low <= point <= high


def test_interval_does_not_depend_on_the_global_rng_and_leaves_it_alone():
    """rliable draws its resamples from numpy's global RNG: the interval must not move with
    what ran before it (it did, by a point in the study tables), nor change that RNG."""
    scores = np.random.default_rng(1).uniform(size=(30, 8))
    np.random.seed(123)
    first = report.iqm_with_ci(scores)
    after_first = np.random.random()
    np.random.seed(456)
    second = report.iqm_with_ci(scores)
    assert first == second
    np.random.seed(123)
    assert np.random.random() == after_first  # the caller's stream is where it would have been
    assert report.iqm_with_ci(scores, seed=1) != first  # the seed is what picks the resamples


def test_interval_narrows_with_more_runs():
    rng = np.random.default_rng(0)
    few, many = rng.uniform(size=(5, 8)), rng.uniform(size=(500, 8))
    width = lambda stats: stats[2] - stats[1]  # noqa: E731
    assert width(report.iqm_with_ci(many)) < width(report.iqm_with_ci(few)) / 3


def test_fraction_scores_are_rollouts_by_tasks_over_optimal():
    summary = {"per_task": [{"optimal": 2.0}, {"optimal": 4.0}], "n_rollouts": 3}
    returns = np.arange(6 * 2, dtype=float).reshape(6, 2)  # rows task-major: task * 3 + rollout
    scores = report.fraction_scores([summary, summary], [returns, returns + 2])
    assert scores.shape == (6, 2)  # 2 seeds x 3 rollouts, 2 tasks
    np.testing.assert_allclose(scores[:3, 0], returns[:3, -1] / 2.0)
    np.testing.assert_allclose(scores[:3, 1], returns[3:, -1] / 4.0)
    np.testing.assert_allclose(scores[3:, 1], (returns[3:, -1] + 2) / 4.0)
