"""tools/generate_rollouts.py end to end: both backends, resume, and the store it writes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, clean_env
from megatron_rgm.rollout.store import RolloutStore
from test_convert import convert, make_hf, save_tokenizer


def generate(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "generate_rollouts.py"), *args], env=clean_env(),
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    hf = make_hf("qwen2", root / "hf")
    save_tokenizer(hf)
    torch.manual_seed(1)
    head = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(), torch.nn.Linear(128, 1))
    torch.save(head.state_dict(), hf / "score_module.pt")
    convert("hf-to-mcore", "--hf-path", str(hf), "--output", str(root / "mcore"), "--sprm-head",
            str(hf / "score_module.pt"))
    convert("mcore-to-hf", "--mcore-path", str(root / "mcore"), "--output", str(root / "export"))
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"q": f"Add {i} and {i + 1}.", "a": str(2 * i + 1)}) for i in range(3)))
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


def test_hf_backend(setup):
    root, prompts = setup
    out = root / "store_hf"
    generate("--prompts", str(prompts), "--output", str(out), "--backend", "hf", "--hf-path", str(root / "export"),
             *COMMON)
    store = RolloutStore(out, "r")
    assert len(store) == 6 and store.attrs["backend"] == "hf"
    t = store[0]
    assert (t.log_probs[t.response_mask][1:] < 0).all()


def test_missing_backend_path_is_named(setup):
    root, prompts = setup
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "generate_rollouts.py"), "--prompts", str(prompts),
                           "--output", str(root / "x"), "--backend", "hf", *COMMON], env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--backend hf needs --hf-path" in proc.stderr
