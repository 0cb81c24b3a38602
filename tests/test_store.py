"""The zarr rollout store: round trip, concurrent ranks, a writer killed mid-batch, bad stores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import WORKERS, clean_env
from megatron_rgm.config import ConfigError
from megatron_rgm.data.store import RolloutStore, tokenizer_fingerprint

sys.path.insert(0, str(WORKERS))
from store_writer import batch  # noqa: E402


def write(path: Path, rank: int, batches: int, die: bool = False) -> subprocess.Popen:
    """A writer process; ``die``: it SIGKILLs itself between writing a batch's arrays and committing it."""
    fault = [str(WORKERS / "with_fault.py"), "store.before_commit", "--"] if die else []
    return subprocess.Popen([sys.executable, *fault, str(WORKERS / "store_writer.py"), str(path), str(rank),
                             str(batches)], env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_round_trip(tmp_path):
    store = RolloutStore(tmp_path / "s", "a", tokenizer="tok-A", attrs={"model": "tiny", "temperature": 0.6})
    trajs = batch(0, 0) + batch(0, 1)
    store.append(0, trajs[:3])
    store.append(0, trajs[3:])
    again = RolloutStore(tmp_path / "s", "r", tokenizer="tok-A")
    assert len(again) == 6 and again.attrs["temperature"] == 0.6
    for a, b in zip(trajs, (again[i] for i in range(6))):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.response_mask, b.response_mask)
        assert np.allclose(a.log_probs, b.log_probs) and np.allclose(a.step_scores, b.step_scores)
        assert np.array_equal(a.step_positions, b.step_positions)
        assert (a.reward, a.correct, a.prompt_id, a.group_id) == (b.reward, b.correct, b.prompt_id, b.group_id)


def test_concurrent_ranks_do_not_clobber_each_other(tmp_path):
    RolloutStore(tmp_path / "s", "a", tokenizer="tok-A")
    procs = [write(tmp_path / "s", r, 4) for r in range(3)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    store = RolloutStore(tmp_path / "s", "r")
    assert len(store) == 3 * 4 * 3
    got = sorted((store[i].prompt_id, tuple(store[i].tokens)) for i in range(len(store)))
    want = sorted((t.prompt_id, tuple(t.tokens)) for r in range(3) for b in range(4) for t in batch(r, b))
    assert got == want


def test_writer_killed_mid_batch_leaves_a_readable_store(tmp_path):
    RolloutStore(tmp_path / "s", "a", tokenizer="tok-A").append(0, batch(0, 0))
    p = write(tmp_path / "s", 0, 1, die=True)
    p.communicate(timeout=300)
    assert p.returncode == -9, "the writer should have been killed before committing"
    store = RolloutStore(tmp_path / "s", "r")
    assert len(store) == 3 and {store[i].prompt_id for i in range(3)} == {0}
    assert store.group["rank_00000"]["tokens"].shape[0] > sum(len(t.tokens) for t in batch(0, 0)), \
        "the dead writer's arrays should hold the uncommitted batch"
    # The next append cuts the partial batch off and continues.
    RolloutStore(tmp_path / "s", "a").append(0, batch(0, 2))
    store = RolloutStore(tmp_path / "s", "r")
    assert [store[i].prompt_id for i in range(len(store))] == [0, 0, 0, 2, 2, 2]
    assert np.array_equal(store[3].tokens, batch(0, 2)[0].tokens)


def test_bad_stores(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RolloutStore(tmp_path / "nope", "r")
    s = RolloutStore(tmp_path / "s", "a", tokenizer="tok-A")
    s.append(0, batch(0, 0))
    with pytest.raises(ConfigError, match="written with tokenizer tok-A, this run uses tok-B"):
        RolloutStore(tmp_path / "s", "r", tokenizer="tok-B")
    meta = json.loads((tmp_path / "s" / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99
    (tmp_path / "s" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="schema version 99"):
        RolloutStore(tmp_path / "s", "r")
    meta["attributes"]["schema_version"] = 1
    (tmp_path / "s" / "zarr.json").write_text(json.dumps(meta))
    RolloutStore(tmp_path / "s", "a").group["rank_00000"]["tokens"].resize((4,))  # truncate the data
    with pytest.raises(ConfigError, match="is truncated: rank_00000/tokens holds 4 entries but 18 were committed"):
        len(RolloutStore(tmp_path / "s", "r"))


def test_tokenizer_fingerprint_tells_vocabularies_apart():
    class Tok:
        def __init__(self, words):
            self.words = words

        def __len__(self):
            return len(self.words)

        def decode(self, ids):
            return "".join(self.words[i] for i in ids)

    assert tokenizer_fingerprint(Tok(["a", "b"])) == tokenizer_fingerprint(Tok(["a", "b"]))
    assert tokenizer_fingerprint(Tok(["a", "b"])) != tokenizer_fingerprint(Tok(["a", "c"]))


@pytest.mark.parametrize("name", ["qwen2", "qwen3_6"])
def test_a_real_vocabularys_rollouts_round_trip_and_bind_the_store(tmp_path, name):
    from helpers import QWEN_VOCABS, qwen_vocab
    from megatron_rgm.data.store import Trajectory
    from megatron_rgm.tokenizer import encode, prompt_ids

    tok, other = (qwen_vocab(n) for n in (name, next(v for v in QWEN_VOCABS if v != name)))
    prompt = prompt_ids(tok, "chat", "What is 7 + 5?")
    response = encode(tok, "7 + 5 = 12.\n\n</think>\n\\boxed{12}") + [tok.convert_tokens_to_ids("<|im_end|>")]
    ids = np.array(prompt + response)
    assert ids.max() > 2**16  # ids past 16 bits (the chat tokens) are kept
    n = len(ids)
    traj = Trajectory(tokens=ids, response_mask=np.arange(n) >= len(prompt), log_probs=-np.linspace(0, 1, n),
                      step_positions=np.array([len(prompt) + 4]), step_scores=np.array([0.75]), reward=1.0,
                      correct=True, prompt_id=7, group_id=0)
    fingerprint = tokenizer_fingerprint(tok)
    RolloutStore(tmp_path / "s", "a", tokenizer=fingerprint).append(0, [traj])
    back = RolloutStore(tmp_path / "s", "r", tokenizer=fingerprint)[0]
    assert np.array_equal(back.tokens, ids) and np.array_equal(back.response_mask, traj.response_mask)
    assert tok.decode(back.tokens[back.response_mask]) == "7 + 5 = 12.\n\n</think>\n\\boxed{12}<|im_end|>"
    with pytest.raises(ConfigError, match="was written with tokenizer"):
        RolloutStore(tmp_path / "s", "r", tokenizer=tokenizer_fingerprint(other))
