"""The KV-cache sampler: exact against recompute, transformers, TP=1 and PP=1; scores equal a separate pass."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import ARCHS, convert, make_hf, torchrun
from megatron_rgm.config import ConfigError
from megatron_rgm.rollout.sampling import SamplingParams, filter_logits, nucleus, repetition_penalty


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sampler")
    torchrun("sampler_checks.py", 2, ["tp", str(out)])
    return json.loads((out / "sampler.json").read_text())


# Greedy tokens are an argmax: two layouts (or the cache and a recompute) that sum in different orders agree on
# them only where the top two logits are further apart than that rounding (~1e-5 here). The model is built so
# that they are (large init); GREEDY_MARGIN checks it, so a tie can never make these comparisons depend on the CPU.
GREEDY_MARGIN = 1e-3
# Sampled tokens are compared too: a draw flips only if its uniform number falls within rounding (~1e-6 of the
# probabilities) of a cumulative-probability boundary, or a nucleus sum within that of top_p, about 1e-4 for the
# ~100 draws here; the log-probs, which are continuous, are compared with a tolerance beside them.


@pytest.mark.multirank
def test_greedy_comparisons_are_away_from_ties(results):
    assert results["tp1"]["greedy_margin"] > GREEDY_MARGIN, results["tp1"]["greedy_margin"]


@pytest.mark.multirank
@pytest.mark.parametrize("tp", ["tp1", "tp2"])
def test_kv_cache_greedy_equals_full_recompute(results, tp):
    r = results[tp]
    assert r["greedy"] == r["recompute"]
    assert len(set(r["greedy"][0][6:])) > 3, "degenerate greedy output makes this test meaningless"
    # fp32: the cached and the recomputed attention sum in different orders
    assert r["greedy_logit_diff"] <= 1e-5 * max(1.0, r["greedy_logit_max"])


@pytest.mark.multirank
@pytest.mark.parametrize("tp", ["tp1", "tp2"])
def test_flash_decode_path_equals_megatron_default_kv_path(results, tp):
    """The sampler decodes through megatron-core's flash-decode path (torch kernels here); its default path
    (keys re-rotated and repeated every step) gives the same tokens, logits and log-probs."""
    r = results[tp]
    assert r["default_greedy"] == r["greedy"]
    assert r["default_sampled"] == r["sampled"]
    assert r["default_logit_diff"] <= 1e-5 * max(1.0, r["greedy_logit_max"])
    assert r["default_log_prob_diff"] <= 1e-4
    assert r["flash_decode_after"] is False, "generate must leave config.flash_decode as it found it"


@pytest.mark.multirank
@pytest.mark.parametrize("tp", ["tp1", "tp2"])
def test_decode_steps_take_the_flash_decode_path(results, tp):
    """Every decode step of every layer goes through megatron-core's flash-decode attention: a megatron-core
    that decides the path differently (0.18+ asks InferenceMode) must not silently fall back to another."""
    r = results[tp]
    assert r["decode_steps"] > 0
    assert r["flash_decode_calls"] == r["decode_steps"] * r["layers"], r


@pytest.mark.multirank
def test_tp2_samples_the_same_tokens_as_tp1(results):
    assert results["tp2"]["greedy"] == results["tp1"]["greedy"]
    assert results["tp2"]["sampled"] == results["tp1"]["sampled"]
    lp1, lp2 = torch.tensor(results["tp1"]["log_probs"]), torch.tensor(results["tp2"]["log_probs"])
    torch.testing.assert_close(lp2, lp1, rtol=1e-4, atol=1e-5)  # large-init logits: fp32 reordering


@pytest.mark.multirank
def test_pp2_samples_the_same_tokens_as_pp1(results):
    assert results["pp2"]["greedy"] == results["tp1"]["greedy"]
    assert results["pp2"]["sampled"] == results["tp1"]["sampled"]
    for key in ("log_probs", "step_logits"):
        torch.testing.assert_close(torch.tensor(results["pp2"][key]), torch.tensor(results["tp1"][key]),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("kind", ["greedy", "sampled"])
def test_continuous_batching_samples_what_one_prompt_at_a_time_samples(results, layout, kind):
    """Four prompts x k=3 in five cache slots (refilled as sequences end, the pool compacted at the tail) give
    each prompt the tokens, lengths, log-probs and step scores it gets alone, at TP=1, TP=2 and PP=2; and every
    layout gives TP=1's."""
    runs = results[layout]["batched"][kind]
    reference = results["tp1"]["batched"][kind]["alone"]
    lengths = [n for r in runs["pooled"] for n in r["lengths"]]
    if kind == "sampled":  # the EOS ids end sequences at different steps: slots free up and are refilled
        assert len(set(lengths)) > 3, lengths
    # The pooled step (5 rows, attention masked to each slot's length) and the lone one (3 rows) sum in other
    # orders: step logits (~30 here) agree to 1e-6 relative; log-probs, logits minus a logsumexp over logits in
    # the hundreds (large init), within 5e-4 absolute (measured: 1.8e-4).
    tolerance = {"log_probs": dict(rtol=1e-4, atol=5e-4), "step_logits": dict(rtol=1e-4, atol=1e-5)}
    for alone, pooled, ref in zip(runs["alone"], runs["pooled"], reference):
        assert pooled["tokens"] == alone["tokens"] == ref["tokens"]
        assert pooled["lengths"] == alone["lengths"] == ref["lengths"]
        for key, tol in tolerance.items():
            torch.testing.assert_close(torch.tensor(pooled[key]), torch.tensor(alone[key]), **tol)
            torch.testing.assert_close(torch.tensor(pooled[key]), torch.tensor(ref[key]), **tol)
    assert sum(len(r["step_logits"]) for r in runs["pooled"]) > 0


@pytest.mark.multirank
@pytest.mark.parametrize("tp", ["tp1", "tp2"])
def test_step_scores_equal_a_separate_forward(results, tp):
    assert results[tp]["steps"] > 0
    assert results[tp]["score_diff"] <= 1e-5 * max(1.0, results[tp]["score_max"])


@pytest.mark.multirank
@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_greedy_equals_transformers_on_the_converted_model(tmp_path, kind):
    """Each family; 25 tokens: past Mistral's and GPT-OSS's windows of 8, GPT-OSS's sinks and YaRN in every
    KV-cache decode step."""
    make_hf(kind, tmp_path / "hf", initializer_range=0.4)
    convert("hf-to-mcore", "--hf-path", str(tmp_path / "hf"), "--output", str(tmp_path / "mcore"))
    torchrun("sampler_checks.py", 1, ["hf", str(tmp_path / "mcore"), str(tmp_path / "hf"), str(tmp_path)])
    r = json.loads((tmp_path / "hf.json").read_text())
    assert r["greedy_margin"] > GREEDY_MARGIN, r["greedy_margin"]  # an argmax compared away from ties
    assert r["ours"] == r["theirs"]
    assert len(set(r["ours"][5:])) > 3


def test_filters_and_penalty():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(filter_logits(logits, SamplingParams(top_k=2, top_p=1.0))[0, 2:]).all()
    # probs ~ [.64, .24, .09, .03]: top_p 0.7 keeps the first two
    kept = ~torch.isinf(filter_logits(logits, SamplingParams(top_p=0.7)))
    assert kept.tolist() == [[True, True, False, False]]
    pen = repetition_penalty(logits, torch.tensor([[0, 3]]), 2.0)
    assert pen.tolist() == [[1.0, 1.0, 0.0, -2.0]]


@pytest.mark.parametrize("scale", [8.0, 0.05], ids=["peaked", "flat"])  # flat: a nucleus of ~95% of V
@pytest.mark.parametrize("top_k, top_p", [(0, 0.95), (0, 0.5), (5, 1.0), (50, 0.9), (0, 1.0)])
def test_nucleus_draws_from_the_filtered_distribution(scale, top_k, top_p):
    """The sampler's candidates (top-k, then the smallest top-p prefix) give softmax(filter_logits(logits))."""
    torch.manual_seed(0)
    scaled = torch.randn(4, 1000) * scale
    p = SamplingParams(top_k=top_k, top_p=top_p)
    kept = nucleus(scaled, p, torch.logsumexp(scaled, -1, keepdim=True))
    expected = torch.softmax(filter_logits(scaled, p), -1)
    if kept is None:
        assert top_k == 0 and top_p == 1.0
        return
    logits, ids = kept
    ours = torch.zeros_like(scaled).scatter(-1, ids, torch.softmax(logits, -1))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(repetition_penalty=0), "repetition_penalty")])
def test_bad_sampling_params(kw, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kw)


def _rope_reference(x, cos, sin):
    """megatron-core's own rotary (``_apply_rotary_pos_emb_bshd``) at angles given as cos/sin ``[..., d/2]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _angles(n: int, d: int):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv)  # [n, d/2]
    return freqs, torch.cos(freqs), torch.sin(freqs)


def test_torch_rotary_matches_megatron():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_rgm.rollout.decode_attention import apply_rotary_emb

    torch.manual_seed(0)
    s, b, h, d = 7, 3, 4, 16
    freqs, cos, sin = _angles(12, d)
    x = torch.randn(s, b, h, d)
    ours = apply_rotary_emb(x.permute(1, 0, 2, 3), cos[:s], sin[:s]).permute(1, 0, 2, 3)
    theirs = _apply_rotary_pos_emb_bshd(x, torch.cat((freqs, freqs), -1)[:s, None, None, :])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seqlens", [[5, 5, 5], [2, 6, 4]], ids=["static", "ragged"])
@pytest.mark.parametrize("sq", [1, 3])
def test_torch_flash_attn_with_kvcache(seqlens, sq):
    """Rotate the new q/k at their positions, append k/v at cache_seqlens, attend over the filled cache (GQA)."""
    from megatron_rgm.rollout.decode_attention import flash_attn_with_kvcache

    torch.manual_seed(0)
    b, S, hq, hk, d = len(seqlens), 12, 4, 2, 8
    _, cos, sin = _angles(S, d)
    k_mem, v_mem = torch.randn(S, b, hk, d), torch.randn(S, b, hk, d)  # megatron's [s, b, h, d] cache
    k_ref, v_ref = k_mem.clone(), v_mem.clone()
    q, k, v = torch.randn(b, sq, hq, d), torch.randn(b, sq, hk, d), torch.randn(b, sq, hk, d)
    lens = torch.tensor(seqlens, dtype=torch.int32)
    out = flash_attn_with_kvcache(q, k_mem.permute(1, 0, 2, 3), v_mem.permute(1, 0, 2, 3), k, v, cos, sin,
                                  cache_seqlens=lens, causal=sq > 1, rotary_interleaved=False)
    for i, n in enumerate(seqlens):
        p = torch.arange(n, n + sq)
        qi = _rope_reference(q[i], cos[p][:, None], sin[p][:, None])  # [sq, hq, d]
        ki = _rope_reference(k[i], cos[p][:, None], sin[p][:, None])
        k_ref[n:n + sq, i], v_ref[n:n + sq, i] = ki, v[i]
        keys = k_ref[:n + sq, i].repeat_interleave(hq // hk, dim=1)  # [n+sq, hq, d]
        values = v_ref[:n + sq, i].repeat_interleave(hq // hk, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qi, keys) / d ** 0.5
        causal = torch.arange(n + sq)[None, :] <= (n + torch.arange(sq))[:, None]
        scores = scores.masked_fill(~causal, float("-inf"))
        expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_mem, k_ref)  # the cache was written in place, at the right rows
    torch.testing.assert_close(v_mem, v_ref)


@pytest.mark.parametrize("top_k, top_p, penalty", [(0, 0.95, 1.0), (0, 0.9999, 1.3), (20, 0.9, 1.0), (0, 1.0, 1.0),
                                                   (0, 0.5, 1.05)])
def test_a_row_draws_the_same_token_with_or_without_other_rows(top_k, top_p, penalty):
    """draw() filters all rows at once but each row draws alone, from its own generator, over as many top-p
    candidates as it would take on its own (peaked and flat rows side by side make the shared count grow: torch's
    CPU multinomial happens not to depend on the trailing zero-probability candidates, a device kernel may)."""
    from megatron_rgm.rollout.sampling import draw

    torch.manual_seed(0)
    V = 5000
    logits = torch.cat([torch.randn(3, V) * 8.0, torch.randn(3, V) * 0.05])  # peaked rows, then nearly flat ones
    seen = torch.randint(0, V, (6, 12))
    params = SamplingParams(temperature=0.7, top_p=top_p, top_k=top_k, repetition_penalty=penalty)

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(6)]

    together = [draw(logits, seen, params, gens()) for _ in range(3)]
    alone = [draw(logits[i:i + 1], seen[i:i + 1], params, [gens()[i]]) for i in range(6)]
    tokens, log_probs = together[0]
    assert all(torch.equal(t[0], tokens) for t in together)  # a generator per row: the same draws again
    assert tokens.tolist() == [int(a[0]) for a in alone]
    torch.testing.assert_close(log_probs, torch.cat([a[1] for a in alone]), rtol=0, atol=1e-6)
    assert len(set(tokens[3:].tolist())) > 1  # the flat rows draw from a wide nucleus
