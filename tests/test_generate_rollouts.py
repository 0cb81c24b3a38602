"""tools/generate_rollouts.py end to end: both backends, resume, and the store it writes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, as_a_child, clean_env, tool
from megatron_rgm.data.store import RolloutStore


def generate(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "generate_rollouts.py"), *args], env=clean_env(),
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def setup(qwen2_checkpoints):
    # root/hf: a random Qwen2 and head; root/mcore: its conversion; root/export: that exported back (mcore-to-hf).
    root, converted = qwen2_checkpoints["gen"]
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"q": f"Add {i} and {i + 1}.", "a": str(2 * i + 1)}) for i in range(3)))
    converted()
    return root, prompts


COMMON = ["--problem-key", "q", "--answer-key", "a", "--k", "2", "--max-new-tokens", "12", "--temperature", "1.0"]


@pytest.mark.multirank
def test_megatron_backend_at_tp2_then_resumed_at_pp2(setup):
    root, prompts = setup
    out = root / "store_megatron"
    generate("--prompts", str(prompts), "--output", str(out), "--backend", "megatron", "--mcore-path",
             str(root / "mcore"), "--tp", "2", "--limit", "2", *COMMON)
    assert len(RolloutStore(out, "r")) == 4
    # Resume with the third prompt, at another layout.
    generate("--prompts", str(prompts), "--output", str(out), "--backend", "megatron", "--mcore-path",
             str(root / "mcore"), "--pp", "2", *COMMON)
    store = RolloutStore(out, "r")
    assert len(store) == 6 and sorted({store[i].prompt_id for i in range(6)}) == [0, 1, 2]
    first = [store[i].tokens.copy() for i in range(6)]
    for i in range(6):
        t = store[i]
        assert t.response_mask.sum() > 0 and len(t.log_probs) == len(t.tokens)
        assert (t.log_probs[~t.response_mask] == 0).all() and (t.log_probs[t.response_mask] < 0).all()
        assert ((t.step_scores > 0) & (t.step_scores < 1)).all() and len(t.step_positions) == len(t.step_scores)
    generate("--prompts", str(prompts), "--output", str(out), "--backend", "megatron", "--mcore-path",
             str(root / "mcore"), "--tp", "2", *COMMON)
    store = RolloutStore(out, "r")
    assert len(store) == 6, "a run over finished prompts must add nothing"
    assert all(np.array_equal(first[i], store[i].tokens) for i in range(6))
    # The HF backend is the same sampler over the export of these weights: the same draws for the same seed.
    with as_a_child():
        assert tool("generate_rollouts").main(["--prompts", str(prompts), "--output", str(root / "store_hf_same"),
                                               "--backend", "hf", "--hf-path", str(root / "export"), *COMMON]) == 0
    hf = RolloutStore(root / "store_hf_same", "r")
    by_prompt = lambda s: sorted((s[i].prompt_id, s[i].tokens.tolist()) for i in range(len(s)))  # noqa: E731
    assert by_prompt(hf) == by_prompt(store)
    for i in range(6):
        a = next(store[j] for j in range(6) if store[j].tokens.tolist() == hf[i].tokens.tolist())
        np.testing.assert_allclose(hf[i].log_probs, a.log_probs, atol=1e-4)
        np.testing.assert_allclose(hf[i].step_scores, a.step_scores, atol=1e-4)


def test_hf_backend(setup):
    root, prompts = setup
    out = root / "store_hf"
    with as_a_child():  # in-process: the hf backend sets up no process group
        assert tool("generate_rollouts").main(["--prompts", str(prompts), "--output", str(out), "--backend", "hf",
                                               "--hf-path", str(root / "export"), *COMMON]) == 0
    store = RolloutStore(out, "r")
    assert len(store) == 6 and store.attrs["backend"] == "hf"
    t = store[0]
    assert (t.log_probs[t.response_mask][1:] < 0).all()


def test_missing_backend_path_is_named(setup, capsys):
    root, prompts = setup
    argv = ["--prompts", str(prompts), "--output", str(root / "x"), "--backend", "hf", *COMMON]
    assert tool("generate_rollouts").main(argv) == 2
    assert "--backend hf needs --hf-path" in capsys.readouterr().err and not (root / "x").exists()
