"""HF <-> Megatron conversion on random-initialised transformers models built here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import ARCHS, TEXT, clean_env, convert, make_hf, save_tokenizer, to_mxfp4, torchrun


@pytest.fixture(scope="module", params=sorted(ARCHS))
def converted(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    hf = make_hf(kind, root / "hf")
    head = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(128, 1))
    torch.save(head.state_dict(), hf / "score_module.pt")
    save_tokenizer(hf)
    # Llama differs from Qwen2 only by the QKV bias and tied embeddings (both exercised by the other two):
    # it gets the conversion round trip, not the four-layout verification (which costs a minute per arch).
    layout = ["--tp", "1", "--pp", "1"] if kind == "llama" else ["--tp", "2", "--pp", "2"]
    convert("hf-to-mcore", "--hf-path", str(hf), "--output", str(root / "mcore"), *layout,
            "--sprm-head", str(hf / "score_module.pt"))
    if kind != "llama":
        verify_out = root / "verify"
        verify_out.mkdir()
        torchrun("convert_verify.py", 4, [str(hf), str(root / "mcore"), str(verify_out)])
    return kind, root, hf


VERIFIED = ["qwen2", "qwen3", "qwen3_moe", "mistral", "gpt_oss"]


@pytest.mark.multirank
@pytest.mark.parametrize("converted", VERIFIED, indirect=True)
def test_verify_all_layouts(converted):
    kind, root, _ = converted
    for tp in (1, 2):
        for pp in (1, 2):
            report = json.loads((root / "verify" / f"verify_tp{tp}_pp{pp}.json").read_text())
            assert report["steps"] > 0
            # Measured: at most 4e-7 on every family (fp32); verify's own tolerance is 1e-4.
            assert report["max_abs_logit_diff"] <= 1e-5, (kind, tp, pp, report)
            assert report["seq_length"] > (report["sliding_window"] or 0)  # every window is passed
            assert report["max_abs_head_diff"] <= 1e-5, (kind, tp, pp, report)


@pytest.mark.multirank
@pytest.mark.parametrize("converted", VERIFIED, indirect=True)
def test_layouts_give_identical_logits(converted):
    _, root, _ = converted
    tp2pp1 = torch.load(root / "verify" / "logits_tp2_pp1.pt")
    tp1pp2 = torch.load(root / "verify" / "logits_tp1_pp2.pt")
    torch.testing.assert_close(tp1pp2, tp2pp1, rtol=0, atol=1e-5)


@pytest.mark.multirank
def test_round_trip_is_bit_exact(converted):
    from safetensors import safe_open

    kind, root, hf = converted
    out = root / "hf_back"
    convert("mcore-to-hf", "--mcore-path", str(root / "mcore"), "--output", str(out))
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    original = safe_open(str(hf / "model.safetensors"), "pt")
    names = set(original.keys())
    assert set(index) == names
    for name in names:
        back = safe_open(str(out / index[name]), "pt").get_tensor(name)
        assert torch.equal(back, original.get_tensor(name)), name
    head_in = torch.load(hf / "score_module.pt", weights_only=True)
    head_out = torch.load(out / "score_module.pt", weights_only=True)
    assert list(head_out) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert all(torch.equal(head_in[k], head_out[k]) for k in head_in)
    # The reference's score_module.pt alone is the reference's head: exactly the token ".\n\n", on the
    # penultimate layer, trained; the checkpoint and the export carry that on.
    from megatron_rgm.model.load import describe_checkpoint

    recorded = describe_checkpoint(root / "mcore")
    assert (recorded.sprm.sprm_step_rule, recorded.sprm.sprm_layer, recorded.head_trained) == ("exact", -2, True)
    assert json.loads((out / "sprm_config.json").read_text())["sprm_step_rule"] == "exact"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out)) is not None


@pytest.mark.multirank
@pytest.mark.parametrize("converted", ["llama"], indirect=True)  # Llama 3.1's RoPE scaling
def test_verify_passes_a_scaled_rope_and_fails_without_it(converted, tmp_path):
    _, root, hf = converted
    report = tmp_path / "verify.json"
    convert("verify", "--hf-path", str(hf), "--mcore-path", str(root / "mcore"), "--tp", "2", "--pp", "2", "--json",
            str(report))
    passed = json.loads(report.read_text())
    assert passed["max_abs_logit_diff"] <= 1e-5 and passed["seq_length"] == 1024, passed
    # The HF model without its scaling is what a conversion that dropped it would compute: verify must fail.
    unscaled = tmp_path / "unscaled"
    shutil.copytree(hf, unscaled)
    config = json.loads((unscaled / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
    (unscaled / "config.json").write_text(json.dumps(config))
    proc = convert("verify", "--hf-path", str(unscaled), "--mcore-path", str(root / "mcore"), "--tp", "2", "--pp",
                   "2", check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "is above the float32 tolerance" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.multirank
@pytest.mark.parametrize("converted, fault", [("gpt_oss", "no windows"), ("gpt_oss", "no yarn"),
                                              ("gpt_oss", "one sink moved"), ("mistral", "no windows")],
                         indirect=["converted"])
def test_verify_fails_with_a_planted_fault(converted, tmp_path, fault):
    """What a conversion that dropped a window or the YaRN scaling, or changed one tensor, would compute: verify
    must exit non-zero on it, naming the difference."""
    from safetensors.torch import load_file, save_file

    _, root, hf = converted
    faulty = tmp_path / "faulty"
    shutil.copytree(hf, faulty)
    config = json.loads((faulty / "config.json").read_text())
    if fault == "no windows" and "layer_types" in config:
        config["layer_types"] = ["full_attention"] * config["num_hidden_layers"]
    elif fault == "no windows":
        config["sliding_window"] = None
    elif fault == "no yarn":
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
    else:
        tensors = load_file(faulty / "model.safetensors")
        tensors["model.layers.2.self_attn.sinks"][1] += 1.0
        save_file(tensors, faulty / "model.safetensors", metadata={"format": "pt"})
    (faulty / "config.json").write_text(json.dumps(config))
    proc = convert("verify", "--hf-path", str(faulty), "--mcore-path", str(root / "mcore"), check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "is above the float32 tolerance" in proc.stderr, proc.stderr[-2000:]
    assert "the largest at position" in proc.stderr, proc.stderr[-2000:]
    if fault == "no windows":  # a window of 8: every position up to 7 sees the same keys either way
        first = int(proc.stderr.split("over the tolerance from position ")[1].split(" ")[0])
        assert first >= 8, proc.stderr[-2000:]


@pytest.mark.multirank
def test_linear_rope_scaling_converts_and_verifies(tmp_path):
    hf = make_hf("llama", tmp_path / "hf", rope_scaling={"rope_type": "linear", "factor": 4.0})
    convert("hf-to-mcore", "--hf-path", str(hf), "--output", str(tmp_path / "mcore"))
    convert("verify", "--hf-path", str(hf), "--mcore-path", str(tmp_path / "mcore"), "--json",
            str(tmp_path / "verify.json"))
    assert json.loads((tmp_path / "verify.json").read_text())["max_abs_logit_diff"] <= 1e-5


@pytest.mark.multirank
def test_scorer_equals_megatron_head(converted, tmp_path):
    kind, root, hf = converted
    out = root / "hf_scorer"
    convert("mcore-to-hf", "--mcore-path", str(root / "mcore"), "--output", str(out))
    code = f"""
import json, torch
from megatron_rgm.hf import RGMScorer
s = RGMScorer.from_pretrained({str(out)!r})
r = s.score([{TEXT!r}])[0]
ids = torch.tensor([s.tokenizer.encode({TEXT!r}, add_special_tokens=False)])
json.dump({{"scores": r.step_scores, "agg": r.aggregate, "ids": ids[0].tolist(),
           "mask": s.segmenter(ids).mask[0].tolist()}}, open({str(tmp_path / 'scorer.json')!r}, "w"))
"""
    subprocess.run([sys.executable, "-c", code], env=clean_env(), check=True, timeout=300, capture_output=True)
    scorer = json.loads((tmp_path / "scorer.json").read_text())
    assert len(scorer["scores"]) == 3  # "Add 3 and 4." / "That gives 7." / "Double it."
    torchrun("megatron_head_scores.py", 1, [str(root / "mcore"), str(tmp_path / "scorer.json"),
                                            str(tmp_path / "megatron.json")])
    megatron = json.loads((tmp_path / "megatron.json").read_text())
    assert max(abs(a - b) for a, b in zip(megatron["scores"], scorer["scores"])) <= 1e-5


@pytest.mark.multirank
@pytest.mark.parametrize("kind, tp, etp", [("qwen3_moe", "1", "1"), ("qwen3_moe", "2", "1"), ("gpt_oss", "2", "1")])
def test_moe_converts_and_verifies_with_its_experts_over_two_ranks(tmp_path, kind, tp, etp):
    """hf-to-mcore --ep 2 --etp 1: each rank writes its own 2 of the 4 experts (named by their index over all
    experts), whole; the export of that checkpoint is the HF model bit for bit, and verify holds there and at
    EP=1 with the default expert TP (a reshard: Qwen3-MoE's experts then split over TP=2 too). GPT-OSS's experts
    (biased: expert tensor parallelism 1 always) sit beside TP=2 attention, on 4 ranks."""
    from safetensors import safe_open

    hf = make_hf(kind, tmp_path / "hf")
    convert("hf-to-mcore", "--hf-path", str(hf), "--output", str(tmp_path / "mcore"), "--ep", "2", "--tp", tp,
            "--etp", etp)
    convert("mcore-to-hf", "--mcore-path", str(tmp_path / "mcore"), "--output", str(tmp_path / "back"))
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())["weight_map"]
    original = safe_open(str(hf / "model.safetensors"), "pt")
    assert set(index) == set(original.keys())
    for name in original.keys():
        back = safe_open(str(tmp_path / "back" / index[name]), "pt").get_tensor(name)
        assert torch.equal(back, original.get_tensor(name)), name
    for ep, flags in (("2", ["--etp", etp]), ("1", [])):
        report = tmp_path / f"verify_ep{ep}.json"
        convert("verify", "--hf-path", str(hf), "--mcore-path", str(tmp_path / "mcore"), "--ep", ep, "--tp", tp,
                *flags, "--json", str(report))
        got = json.loads(report.read_text())
        assert got["ep"] == int(ep) and got["max_abs_logit_diff"] <= 1e-5 and got["max_abs_head_diff"] <= 1e-5, got
        assert got["etp"] == (1 if flags or kind == "gpt_oss" else int(tp)), got


@pytest.mark.multirank
def test_gpt_oss_in_the_hubs_mxfp4_layout_converts(tmp_path):
    """The hub's GPT-OSS files (MXFP4 experts) convert as they are: the experts read equal transformers' own
    dequantizer's bit for bit, verify against transformers' (dequantized) model holds at TP=2, and the export is
    the unquantized layout."""
    from safetensors import safe_open
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hub = to_mxfp4(make_hf("gpt_oss", tmp_path / "hf"), tmp_path / "hub")
    convert("hf-to-mcore", "--hf-path", str(hub), "--output", str(tmp_path / "mcore"), "--tp", "2")
    convert("verify", "--hf-path", str(hub), "--mcore-path", str(tmp_path / "mcore"), "--tp", "2", "--json",
            str(tmp_path / "verify.json"))
    assert json.loads((tmp_path / "verify.json").read_text())["max_abs_logit_diff"] <= 1e-5
    convert("mcore-to-hf", "--mcore-path", str(tmp_path / "mcore"), "--output", str(tmp_path / "back"))
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())["weight_map"]
    quantized = safe_open(str(hub / "model.safetensors"), "pt")
    for name, file in index.items():
        back = safe_open(str(tmp_path / "back" / file), "pt").get_tensor(name)
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            want = convert_moe_packed_tensors(quantized.get_tensor(name + "_blocks"),
                                              quantized.get_tensor(name + "_scales"), dtype=torch.float32)
        else:
            want = quantized.get_tensor(name)
        assert torch.equal(back, want), name


@pytest.mark.parametrize("kind, ep, named", [("qwen2", "2", "this model is dense"),
                                             ("qwen3_moe", "3", "does not divide the model's 4 experts")])
def test_a_bad_ep_is_refused_before_any_rank_starts(tmp_path, kind, ep, named):
    hf = make_hf(kind, tmp_path / "hf")
    proc = convert("hf-to-mcore", "--hf-path", str(hf), "--output", str(tmp_path / "mcore"), "--ep", ep, check=False)
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "mcore").exists()  # nothing half-written
