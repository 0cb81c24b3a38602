"""TP / PP / SP / recompute layouts of RGMModel against TP=1/PP=1, on real gloo ranks.

One torchrun launch per world size runs every layout (see
tests/workers/parallel_equivalence.py); these tests read what each rank
measured. Tolerance: 1e-5 max abs difference in fp32.
"""

from __future__ import annotations

import pytest

from helpers import read_rank_results, torchrun

TOL = 1e-5
TWO_RANK = ["tp2", "tp2_sp", "tp2_recompute", "tp2_head_dropout", "pp2", "pp2_untied",
            "pp2_last_stage_one_layer", "pp2_last_stage_one_layer_recompute"]
FOUR_RANK = ["tp2_pp2", "tp2_pp2_sp"]
# Head dropout draws its mask from the shared default generator: compared across
# TP ranks, not against the TP=1 run.
NO_REFERENCE = {"tp2_head_dropout"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for nproc, layouts in ((2, TWO_RANK), (4, FOUR_RANK)):
        d = tmp_path_factory.mktemp(f"pe{nproc}")
        torchrun("parallel_equivalence.py", nproc, ["--out", str(d), "--layouts", *layouts])
        ranks = read_rank_results(d)
        assert len(ranks) == nproc
        for layout in layouts:
            out[layout] = [r[layout] for r in ranks]
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("layout", TWO_RANK + FOUR_RANK)
def test_layout_matches_single_rank(results, layout):
    ranks = results[layout]
    last = [r for r in ranks if "logits_diff" in r]
    assert last, "no rank reported the last pipeline stage"
    covered = set().union(*(r["grad_diff"] for r in ranks))
    assert covered == set(ranks[0]["reference_params"]), "some parameters were never compared"
    for r in ranks:
        assert all(v > 0 for v in r["grad_abs_max"].values()), f"a zero gradient on rank {r}"
    if layout in NO_REFERENCE:
        return
    for r in last:
        assert r["num_steps"] > 0
        assert r["logits_diff"] <= TOL, r
        assert r["head_diff"] <= TOL, r
    for r in ranks:
        worst = max(r["grad_diff"].items(), key=lambda kv: kv[1])
        assert worst[1] <= TOL, f"tp{r['tp_rank']} pp{r['pp_rank']}: {worst}"


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["tp2", "tp2_head_dropout", "tp2_sp", "tp2_pp2"])
def test_replicated_head_gradients_identical_on_tp_ranks(results, layout):
    last = [r for r in results[layout] if "head_grad_tp_spread" in r]
    assert last
    for r in last:
        assert r["head_grad_norm"] > 0
        assert r["head_grad_tp_spread"] == 0.0
