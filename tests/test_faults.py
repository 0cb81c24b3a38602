"""The fault points tests use to kill a process at a chosen moment (megatron_rgm.faults)."""

from __future__ import annotations

import pytest

from megatron_rgm import faults


@pytest.fixture(autouse=True)
def no_hooks():
    faults.clear()
    yield
    faults.clear()


def test_reaching_a_point_without_a_hook_does_nothing():
    for point in faults.POINTS:
        faults.reach(point, rank=0, iteration=1)


def test_an_installed_hook_sees_the_points_context_and_only_its_own_point():
    seen = []
    faults.install("checkpoint.before_publish", lambda **context: seen.append(context))
    faults.reach("store.before_commit", rank=3)
    faults.reach("checkpoint.before_publish", iteration=2, rank=1)
    assert seen == [{"iteration": 2, "rank": 1}]


def test_an_unknown_point_is_named():
    with pytest.raises(ValueError, match="no fault point 'checkpoint.after'.*store.before_commit"):
        faults.install("checkpoint.after", lambda **context: None)
