"""megatron_rgm.ops: the C++ (and CUDA) kernels against the pure-torch reference."""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

from helpers import read_rank_results, torchrun
from megatron_rgm import ops
from megatron_rgm.ops import reference

MODES = reference.MODES
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Every CPU kernel variant this processor runs (avx512, avx2, default), to test each one.
CPU_ISAS = list(ops.extension().cpu_isas()) if ops.extension() is not None else ["default"]


def packed(lengths, seed=0, scale=4.0, dtype=torch.float32, device="cpu", p_correct=0.5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    logits = (torch.randn(int(lengths.sum()), generator=g, dtype=torch.float64) * scale).to(dtype)
    correct = torch.rand(lengths.numel(), generator=g) < p_correct
    return logits.to(device), cu.to(device), correct.to(device)


def ext():
    e = ops.extension()
    assert e is not None, "megatron_rgm._C is not built"
    return e


def tol(dtype):
    return {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12),
            torch.float16: (2e-3, 1e-4), torch.bfloat16: (1e-2, 1e-3)}[dtype]


def check_spr(logits, cu, correct, pos_weight=1.5):
    rtol, atol = tol(logits.dtype)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    loss, stats = ops.spr_loss(a, cu, correct, pos_weight=pos_weight, return_stats=True)
    ref = reference.spr_loss(b, cu.cpu() if not b.is_cuda else cu, correct, pos_weight=pos_weight)
    torch.testing.assert_close(loss.float(), ref.float(), rtol=max(rtol, 1e-5), atol=max(atol, 1e-6))
    counts = reference.spr_counts(b, cu, correct)
    assert stats.positives.item() == counts[0].item() and stats.negatives.item() == counts[1].item()
    loss.backward()
    ref.backward()
    assert a.grad is not None, "no graph from the loss to the logits"
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=rtol, atol=atol)
    return loss, a.grad


def check_aggregate(values, cu, mode, from_probs=False):
    rtol, atol = tol(values.dtype)
    out = ops.segment_aggregate(values, cu, mode, from_probs=from_probs)
    ref = reference.segment_aggregate(values, cu, mode, from_probs=from_probs)
    assert out.dtype == (torch.float64 if values.dtype == torch.float64 else torch.float32)
    if mode == "product":
        # A product of n factors carries n roundings (its relative error grows with n, and the kernels sum the
        # logs in another order than the reference): compare logs within 4 n eps (plus the rounding of the log
        # itself) where the product is representable, and values the reference puts under 1e-30 absolutely.
        n = max(int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 1, 1)
        eps = torch.finfo(out.dtype).eps
        big = ref > 1e-30
        assert bool((out[big] > 0).all()), "a product of probabilities came out <= 0"
        torch.testing.assert_close(out[big].log(), ref[big].log(), rtol=4 * eps, atol=4 * n * eps)
        torch.testing.assert_close(out[~big], ref[~big], rtol=0, atol=1e-30)
    else:
        torch.testing.assert_close(out, ref, rtol=max(rtol, 1e-5), atol=max(atol, 1e-6))
    if mode in ("geometric", "arithmetic"):
        a = values.clone().requires_grad_(True)
        b = values.clone().requires_grad_(True)
        w = torch.linspace(-1, 1, cu.numel() - 1, dtype=out.dtype, device=values.device)
        (ops.segment_aggregate(a, cu, mode, from_probs=from_probs) * w).sum().backward()
        (reference.segment_aggregate(b, cu, mode, from_probs=from_probs) * w).sum().backward()
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=rtol, atol=atol)
    return out


def check_aggregate_vs_float64(values, cu, mode, from_probs=False):
    """Output and gradient against the reference evaluated in float64 (for long trajectories,
    where the float32 reference's own accumulation error exceeds the float32 tolerances)."""
    truth_in = values.detach().double().requires_grad_(True)
    truth = reference.segment_aggregate(truth_in, cu, mode, from_probs=from_probs)
    out = ops.segment_aggregate(values, cu, mode, from_probs=from_probs)
    # float32 math: relative 1e-5 (a product of thousands of steps underflows: compare those to 0).
    torch.testing.assert_close(out.double(), truth.detach(), rtol=1e-5, atol=1e-35)
    if mode in ("geometric", "arithmetic"):
        w = torch.linspace(-1, 1, cu.numel() - 1, dtype=torch.float64, device=values.device)
        x = values.detach().clone().requires_grad_(True)
        (ops.segment_aggregate(x, cu, mode, from_probs=from_probs) * w.to(out.dtype)).sum().backward()
        (truth * w).sum().backward()
        rtol, atol = (1e-5, 1e-7) if values.dtype == torch.float32 else tol(values.dtype)  # half: its rounding
        torch.testing.assert_close(x.grad.double(), truth_in.grad.to(values.dtype).double(), rtol=rtol, atol=atol)
    return out


def test_extension_is_built():
    e = ext()
    expected = os.environ.get("MEGATRON_RGM_EXPECT_CUDA_BUILD")
    if expected is not None:
        assert e.cuda_compiled() == (expected == "1")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("seed", range(3))
def test_spr_loss_random(device, dtype, seed):
    g = torch.Generator().manual_seed(100 + seed)
    lengths = torch.randint(0, 40, (int(torch.randint(1, 50, (1,), generator=g)),), generator=g)
    ext()
    check_spr(*packed(lengths, seed=seed, dtype=dtype, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_segment_aggregate_random(device, dtype, mode):
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, 30, (64,), generator=g)
    ext()
    logits, cu, _ = packed(lengths, seed=3, dtype=dtype, device=device)
    check_aggregate(logits, cu, mode)
    probs = torch.sigmoid(logits.float()).to(dtype)
    probs[::7] = 0  # exercises the 1e-10 clamp
    check_aggregate(probs, cu, mode, from_probs=True)


EDGE = {
    "no_steps_at_all": [0, 0, 0],
    "one_step": [1],
    "single_trajectory_holds_everything": [5000],
    "hundred_thousand_short": [1, 2, 0, 3] * 25000,
    "long_32k_steps": [32768, 32768],
    "empty_batch": [],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(EDGE))
def test_edge_cases(device, case):
    ext()
    logits, cu, correct = packed(EDGE[case], seed=11, device=device)
    loss, grad = check_spr(logits, cu, correct)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    lengths = cu[1:] - cu[:-1]
    # Over tens of thousands of steps the float32 reference's own sum is off by ~1e-5 (and on CUDA its scatter-add
    # order varies from run to run): long trajectories are compared with the float64 truth instead.
    long = lengths.numel() > 0 and int(lengths.max()) > 4096
    for mode in MODES:
        out = (check_aggregate_vs_float64 if long else check_aggregate)(logits, cu, mode)
        assert (out[lengths == 0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_all_steps_masked_out_gives_zero_loss_with_a_graph(device):
    ext()
    # Correct trajectories with only negative logits, wrong ones with only positive: nothing masked.
    cu = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)
    correct = torch.tensor([True, False], device=device)
    logits = torch.tensor([-1.0, -2.0, -0.5, 3.0, 0.1], device=device, requires_grad=True)
    loss, stats = ops.spr_loss(logits, cu, correct, return_stats=True)
    assert loss.item() == 0.0 and stats.positives.item() == 0 and stats.negatives.item() == 0
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits(device):
    ext()
    lengths = [50] * 8
    logits, cu, correct = packed(lengths, seed=5, device=device)
    logits = torch.sign(logits) * 80.0
    loss, grad = check_spr(logits, cu, correct)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    for mode in MODES:
        out = check_aggregate(logits, cu, mode)
        assert torch.isfinite(out).all()


@contextlib.contextmanager
def cpu_isa(name):
    e = ext()
    previous = e._use_cpu_isa(name)
    try:
        yield
    finally:
        e._use_cpu_isa(previous)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_segment_aggregate_every_cpu_isa(isa, dtype):
    # Lengths around every vector width (8 and 16 lanes, products of three vectors, masked tails)
    # and the 2048-step blocks, in one packed batch.
    lengths = list(range(70)) + [95, 96, 97, 2047, 2048, 2049, 5000]
    logits, cu, _ = packed(lengths, seed=21, dtype=dtype)
    check = check_aggregate if dtype == torch.float64 else check_aggregate_vs_float64
    with cpu_isa(isa):
        assert ext().cpu_isa() == isa
        for mode in MODES:
            check(logits, cu, mode)
        probs = torch.sigmoid(logits.float()).to(dtype)
        probs[::5] = 0
        for mode in ("geometric", "arithmetic"):
            check(probs, cu, mode, from_probs=True)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clamp_region_and_huge_logits_every_cpu_isa(isa, dtype):
    # log(sigmoid(x)) is clamped at log(1e-10) below x = logit(1e-10) = -23.03: the aggregate sees
    # 1e-10 there and the gradient is exactly zero. Far-out and infinite logits must not overflow.
    values = [-math.inf, -1e4, -100.0, -88.0, -80.0, -30.0, -23.5, -23.0, -10.0, 0.0, 10.0, 30.0, 80.0,
              88.0, 100.0, 1e4, math.inf]
    runs = [torch.full((37,), v, dtype=dtype) for v in values]  # one value per trajectory: vector paths
    mixed = torch.tensor(values * 3, dtype=dtype)  # all values in one trajectory, and in short ones
    logits = torch.cat(runs + [mixed, mixed[:5], mixed[5:7]])
    lengths = [37] * len(values) + [mixed.numel(), 5, 2]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    check = check_aggregate if dtype == torch.float64 else check_aggregate_vs_float64
    with cpu_isa(isa):
        for mode in MODES:
            out = check(logits, cu, mode)
            assert torch.isfinite(out).all()
        geo = ops.segment_aggregate(logits, cu, "geometric")
        torch.testing.assert_close(geo[:6], torch.full((6,), 1e-10, dtype=geo.dtype), rtol=1e-5, atol=0)
        x = logits.clone().requires_grad_(True)
        ops.segment_aggregate(x, cu, "geometric").sum().backward()
        assert torch.isfinite(x.grad).all()
        clamped = logits < -23.03
        assert (x.grad[clamped] == 0).all()
        live = (logits > -23.02) & (logits < 20)
        assert (x.grad[live] > 0).all()


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_nan_logit_poisons_only_its_trajectory(isa):
    logits, cu, _ = packed([40, 40, 5, 3], seed=4)
    logits[45] = math.nan
    logits[82] = math.nan
    with cpu_isa(isa):
        for mode in ("geometric", "product", "arithmetic"):
            out = ops.segment_aggregate(logits, cu, mode)
            ref = reference.segment_aggregate(logits, cu, mode)
            assert torch.isnan(out[1]) and torch.isnan(out[2]), mode
            torch.testing.assert_close(out[[0, 3]], ref[[0, 3]], rtol=1e-5, atol=1e-30)


def test_unknown_cpu_isa_is_refused():
    with pytest.raises(ValueError, match="not available"):
        ext()._use_cpu_isa("avx1024")


def test_hand_computed_spr_loss():
    # Trajectory 0 correct: logits [2, -1] -> only 2 masked (positive). Trajectory 1 wrong:
    # logits [-3, 1, -2] -> -3 and -2 masked (negatives). P = 1, N = 2.
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    logits = torch.tensor([2.0, -1.0, -3.0, 1.0, -2.0])
    correct = torch.tensor([True, False])
    w_pos, w_neg = 1.5 * 2 / 3, 1 / 3
    sp = torch.nn.functional.softplus
    num = w_pos * sp(torch.tensor(-2.0)) + w_neg * (sp(torch.tensor(-3.0)) + sp(torch.tensor(-2.0)))
    expected = num / (w_pos * 1 + w_neg * 2 + 1e-5)
    torch.testing.assert_close(ops.spr_loss(logits, cu, correct), expected)
    torch.testing.assert_close(reference.spr_loss(logits, cu, correct), expected)


def test_hand_computed_aggregates():
    p = torch.tensor([0.5, 0.8, 0.2, 1e-12, 0.9])
    cu = torch.tensor([0, 3, 3, 5], dtype=torch.int32)
    out = {m: ops.segment_aggregate(p, cu, m, from_probs=True) for m in MODES}
    torch.testing.assert_close(out["geometric"], torch.tensor([(0.5 * 0.8 * 0.2) ** (1 / 3), 0.0, (1e-10 * 0.9) ** 0.5]))
    torch.testing.assert_close(out["arithmetic"], torch.tensor([0.5, 0.0, (1e-12 + 0.9) / 2]))
    torch.testing.assert_close(out["product"], torch.tensor([0.08, 0.0, 1e-10 * 0.9]))
    torch.testing.assert_close(out["min"], torch.tensor([0.2, 0.0, 1e-12]))
    torch.testing.assert_close(out["last"], torch.tensor([0.2, 0.0, 0.9]))


def test_gradcheck_float64():
    ext()
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 4, 4, 9, 12], dtype=torch.int32)
    # Keep logits away from 0 so the SPR mask does not flip under finite differences.
    logits = torch.randn(12, generator=g, dtype=torch.float64)
    logits = logits + 0.5 * torch.sign(logits)
    correct = torch.tensor([True, False, True, False])
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: ops.spr_loss(z, cu, correct), (x,))
    for mode in ("geometric", "arithmetic"):
        assert torch.autograd.gradcheck(lambda z: ops.segment_aggregate(z, cu, mode), (x,))
        probs = torch.sigmoid(logits).clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda q: ops.segment_aggregate(q, cu, mode, from_probs=True), (probs,))


def test_non_kernel_modes_stay_differentiable():
    logits, cu, _ = packed([3, 4], seed=1)
    x = logits.clone().requires_grad_(True)
    ops.segment_aggregate(x, cu, "min").sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_step_bce_ablation():
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)
    logits = torch.tensor([1.0, -1.0, 2.0])
    y = torch.tensor([1.0, 1.0, 0.0])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    torch.testing.assert_close(ops.step_bce_loss(logits, cu, torch.tensor([True, False])), expected)


def test_bad_inputs_are_named():
    logits, cu, correct = packed([2, 3])
    with pytest.raises(ValueError, match="cu_steps ends at 5 but step_logits has 4 steps"):
        ops.spr_loss(logits[:4], cu, correct)
    with pytest.raises(ValueError, match="correct has 3 entries"):
        ops.spr_loss(logits, cu, torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="not one of"):
        ops.segment_aggregate(logits, cu, "median")
    with pytest.raises(ValueError, match="must be 1-D"):
        ops.segment_aggregate(logits.view(1, -1), cu)


def test_fallback_warns_once_and_require_ext_errors(monkeypatch):
    monkeypatch.setattr(ops, "_EXT", None)
    monkeypatch.setattr(ops, "_EXT_ERROR", "simulated: not built")
    monkeypatch.setattr(ops, "_WARNED", False)
    monkeypatch.delenv("MEGATRON_RGM_REQUIRE_EXT", raising=False)
    logits, cu, correct = packed([3, 2])
    with pytest.warns(UserWarning, match="using the pure-torch reference"):
        a = ops.spr_loss(logits, cu, correct)
    torch.testing.assert_close(a, reference.spr_loss(logits, cu, correct))
    monkeypatch.setenv("MEGATRON_RGM_REQUIRE_EXT", "1")
    with pytest.raises(RuntimeError, match="MEGATRON_RGM_REQUIRE_EXT=1"):
        ops.segment_aggregate(logits, cu)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_matches_cpu_kernel():
    e = ext()
    assert e.cuda_compiled()
    logits, cu, correct = packed([100, 0, 2000, 7] * 16, seed=9)
    cpu_loss = ops.spr_loss(logits, cu, correct)
    gpu_loss = ops.spr_loss(logits.cuda(), cu.cuda(), correct.cuda())
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-5, atol=1e-6)
    for mode in MODES:
        torch.testing.assert_close(ops.segment_aggregate(logits.cuda(), cu.cuda(), mode).cpu(),
                                   ops.segment_aggregate(logits, cu, mode), rtol=1e-5, atol=1e-6)


@pytest.mark.multirank
def test_dp_summed_counts_give_every_rank_the_same_weights(tmp_path):
    torchrun("spr_counts.py", 2, [str(tmp_path)])
    ranks = read_rank_results(tmp_path)
    assert len(ranks) == 2
    assert ranks[0]["local"] != ranks[1]["local"], "the ranks should hold different data"
    total = [ranks[0]["local"][i] + ranks[1]["local"][i] for i in range(2)]
    for r in ranks:
        assert r["global"] == total
        assert r["loss_diff_vs_reference_with_global_counts"] < 1e-6
    assert ranks[0]["weights"] == ranks[1]["weights"]


@pytest.mark.skipif(ops.extension() is None, reason="needs the compiled extension")
def test_cpu_isa_environment_variable_selects_the_kernels_or_names_the_choices(monkeypatch):
    # What ops.extension() does with MEGATRON_RGM_CPU_ISA when it loads the kernels, on the loaded extension.
    ext = ops.extension()
    before = ext.cpu_isa()
    try:
        for isa in CPU_ISAS:
            monkeypatch.setenv("MEGATRON_RGM_CPU_ISA", isa)
            ops._select_cpu_isa(ext)
            assert ext.cpu_isa() == isa
        monkeypatch.setenv("MEGATRON_RGM_CPU_ISA", "avx1024")
        with pytest.raises(RuntimeError) as e:
            ops._select_cpu_isa(ext)
        assert "MEGATRON_RGM_CPU_ISA='avx1024'" in str(e.value) and str(CPU_ISAS) in str(e.value)
    finally:
        ext._use_cpu_isa(before)
