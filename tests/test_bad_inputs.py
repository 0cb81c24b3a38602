"""Bad inputs: one clear message naming the input and the fix, and nothing partially written.

Fills the gaps the other test files leave (docs/RELIABILITY.md maps every case to its test): paths, layouts
that leave a conversion half-done, untrusted files (pickles, remote code), a tokenizer without the step token,
damaged rollout stores, prompts longer than the model, k < 1, corrupt jsonl at the tools. Real components: a
random Qwen2 (128 positions), a BPE tokenizer trained here, zarr stores, the tools' own ``main`` in-process.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, WORKERS, make_hf, save_tokenizer, tool
from megatron_rgm.config import ConfigError
from megatron_rgm.data.store import RolloutStore

sys.path.insert(0, str(WORKERS))
from store_writer import batch  # noqa: E402


def head_state(c: int = 64) -> dict[str, torch.Tensor]:
    return torch.nn.Sequential(torch.nn.Linear(c, 2 * c), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(2 * c, 1)).state_dict()


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: a refused operation must leave this unchanged."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def raises(fn, *fragments: str) -> str:
    """Call ``fn``; it must raise one ConfigError, on one line, holding every fragment."""
    with pytest.raises(ConfigError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def exits_2(capsys, name: str, argv: list[str], *fragments: str) -> str:
    """``tools/<name>.py`` exits 2 with one ``error:`` line holding every fragment."""
    assert tool(name).main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    err = lines[-1]  # after any progress bar (transformers' weight loading)
    assert err.startswith("error: ") and sum(ln.startswith("error") for ln in lines) == 1, lines
    for f in fragments:
        assert f in err, (f, err)
    return err


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """An HF export: random Qwen2 (128 positions), a BPE tokenizer with the step token, score_module.pt."""
    root = make_hf("qwen2", tmp_path_factory.mktemp("bad_inputs") / "export")
    save_tokenizer(root)
    torch.manual_seed(0)
    torch.save(head_state(), root / "score_module.pt")
    return root


def copy_of(export: Path, dst: Path) -> Path:
    shutil.copytree(export, dst)
    return dst


@pytest.fixture
def prompts(tmp_path) -> Path:
    f = tmp_path / "p.jsonl"
    f.write_text('{"q": "Add 1 and 2.", "a": "3"}\n{"q": "Add 2 and 2.", "a": "4"}\n')
    return f


# --- paths that do not exist or are not the expected kind -------------------------------------------------------

@pytest.mark.parametrize("case, fragments", [
    ("tokenizer_missing", ["does not exist", "pass --tokenizer"]),
    ("tokenizer_not_a_model", ["is not a sentencepiece .model"]),
    ("store_is_a_file", ["is a file, not a store directory"]),
    ("store_not_a_store", ["is not a rollout store (no zarr.json)"]),
    ("export_missing", ["is not a directory", "mcore-to-hf"]),
    ("export_without_head", ["has neither score_module.pt nor sprm_head.safetensors"]),
    ("export_without_weights", ["is not a loadable HF model", "mcore-to-hf"]),
])
def test_paths_of_the_wrong_kind(tmp_path, export, case, fragments):
    from megatron_rgm.hf import RGMScorer
    from megatron_rgm.tokenizer import load_tokenizer

    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    (tmp_path / "empty").mkdir()
    if case == "export_without_head":
        (copy_of(export, tmp_path / "e") / "score_module.pt").unlink()
    if case == "export_without_weights":
        (tmp_path / "e").mkdir()
        shutil.copy(export / "score_module.pt", tmp_path / "e")
    before = snapshot(tmp_path)
    call = {"tokenizer_missing": lambda: load_tokenizer(tmp_path / "nope"),
            "tokenizer_not_a_model": lambda: load_tokenizer(a_file),
            "store_is_a_file": lambda: RolloutStore(a_file, "a", tokenizer="t"),
            "store_not_a_store": lambda: RolloutStore(tmp_path / "empty", "r"),
            "export_missing": lambda: RGMScorer.from_pretrained(str(tmp_path / "nope")),
            "export_without_head": lambda: RGMScorer.from_pretrained(str(tmp_path / "e")),
            "export_without_weights": lambda: RGMScorer.from_pretrained(str(tmp_path / "e"))}[case]
    raises(call, *fragments)
    assert snapshot(tmp_path) == before


def test_tools_name_a_missing_checkpoint_and_write_nothing(tmp_path, prompts, capsys):
    out = tmp_path / "store"
    exits_2(capsys, "generate_rollouts", ["--prompts", prompts, "--output", out, "--problem-key", "q",
                                          "--answer-key", "a", "--backend", "hf", "--hf-path", tmp_path / "nope"],
            "nope is not a directory")
    exits_2(capsys, "generate_rollouts", ["--prompts", prompts, "--output", out, "--problem-key", "q",
                                          "--answer-key", "a", "--mcore-path", tmp_path / "nope"],
            "checkpoint path", "does not exist")
    exits_2(capsys, "evaluate", [tmp_path / "none.jsonl", "--json", tmp_path / "e.json"], "is not a file")
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"id": "a", "answer": "1", "responses": ["\\boxed{1}"]}) + "\n")
    exits_2(capsys, "evaluate", [samples, "--k", "1", "--json", tmp_path / "e.json", "--table", tmp_path / "no/t.md"],
            "--table", "does not exist: create it first")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "s.jsonl"]


# --- layouts the model cannot take: the conversion leaves nothing behind ----------------------------------------

@pytest.mark.parametrize("tp, pp, message", [
    (3, 1, "--tensor-model-parallel-size 3 does not divide --num-attention-heads 4"),
    (4, 1, "does not divide --num-query-groups 2"),
    (1, 8, "larger than --num-layers 4"),
])
def test_hf_to_mcore_layout_errors_write_nothing(export, tmp_path, tp, pp, message):
    from megatron_rgm.convert import hf_to_mcore

    raises(lambda: hf_to_mcore(str(export), str(tmp_path / "out"), tp=tp, pp=pp), message)
    assert not (tmp_path / "out").exists()


# --- untrusted files: no pickle executed, no remote code run ----------------------------------------------------

class Payload:
    """Unpickling this creates ``path``: the stand-in for code an attacker would run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def evil_file(f: Path, marker: Path, how: str) -> Path:
    sd = {**head_state(), "3.bias": Payload(marker)}
    if how == "torch.save":
        torch.save(sd, f)
    else:
        f.write_bytes(pickle.dumps(sd))
    return f


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_never_run(export, tmp_path, how):
    from megatron_rgm.convert import hf_to_mcore
    from megatron_rgm.head import load_head
    from megatron_rgm.hf import RGMScorer

    # The payload is live: a plain unpickling runs it.
    control = tmp_path / "control_marker"
    f = evil_file(tmp_path / "control.pt", control, how)
    if how == "pickle":
        pickle.loads(f.read_bytes())
    else:
        torch.load(f, weights_only=False)
    assert control.exists()

    marker = tmp_path / "marker"
    f = evil_file(tmp_path / "score_module.pt", marker, how)
    expect = ["is not a plain tensor state dict", "refused to unpickle it", "torch.save(head.state_dict())"]
    msg = raises(lambda: load_head(f, 64), *expect)
    assert "weights_only" not in msg  # torch's own advice (weights_only=False) would run the code
    if how == "torch.save":
        # open's module is builtins, io or _io depending on the Python version
        assert re.search(r"it references (builtins|_?io)\.open\b", msg), msg
    raises(lambda: hf_to_mcore(str(export), str(tmp_path / "out"), head_file=str(f)), *expect)
    assert not (tmp_path / "out").exists()
    served = copy_of(export, tmp_path / "served")
    shutil.copy(f, served / "score_module.pt")
    raises(lambda: RGMScorer.from_pretrained(str(served)), *expect)
    assert not marker.exists()


def test_empty_or_corrupt_head_files(tmp_path):
    from megatron_rgm.head import load_head

    (tmp_path / "score_module.pt").write_bytes(b"")
    raises(lambda: load_head(tmp_path / "score_module.pt", 64), "empty or truncated file")
    (tmp_path / "sprm_head.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    raises(lambda: load_head(tmp_path / "sprm_head.safetensors", 64), "is not a readable safetensors file",
           "re-export it")


def test_remote_code_is_never_run(tmp_path):
    from megatron_rgm.convert import hf_to_mcore
    from megatron_rgm.hf import RGMScorer
    from megatron_rgm.tokenizer import load_tokenizer

    marker = tmp_path / "marker"
    d = tmp_path / "custom"
    d.mkdir()
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n" \
           "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_rgm'\n"
    for name in ("modeling_evil.py", "tokenization_evil.py"):
        (d / name).write_text(code)
    (d / "config.json").write_text(json.dumps({
        "model_type": "evil_rgm", "architectures": ["EvilForCausalLM"], "hidden_size": 64,
        "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilLM"}}))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTok", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTok", None]}}))
    torch.save(head_state(), d / "score_module.pt")
    raises(lambda: RGMScorer.from_pretrained(str(d)), "needs its own Python code", "which is not run",
           "trust_remote_code=True")
    with pytest.raises(ConfigError, match="no tokenizer could be loaded"):
        load_tokenizer(d)
    raises(lambda: hf_to_mcore(str(d), str(tmp_path / "out")), "architecture ['EvilForCausalLM'] is not supported")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_pickled_hf_weights_are_not_run(export, tmp_path):
    from safetensors.torch import load_file

    from megatron_rgm.convert import hf_to_mcore
    from megatron_rgm.hf import RGMScorer

    marker = tmp_path / "marker"
    d = copy_of(export, tmp_path / "bin")
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save({**tensors, "model.norm.weight": Payload(marker)}, d / "pytorch_model.bin")
    raises(lambda: hf_to_mcore(str(d), str(tmp_path / "out")), "holds no *.safetensors weights",
           "pytorch_model.bin is not read", "convert it to safetensors first")
    raises(lambda: RGMScorer.from_pretrained(str(d)), "pytorch_model.bin holds more than tensors",
           "save the weights as safetensors")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_loaders_are_safe_by_default():
    """Every torch.load passes weights_only=True, nothing unpickles, remote code is off unless a caller asks."""
    import ast
    import inspect

    from megatron_rgm.hf import RGMScorer, load_causal_lm

    def name(node) -> str:
        return f"{name(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else getattr(node, "id", "?")

    sources = sorted((REPO / "megatron_rgm").rglob("*.py")) + sorted((REPO / "tools").glob("*.py"))
    loads = 0
    for f in sources:
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Call):
                continue
            kw = {k.arg: k.value for k in node.keywords}
            if name(node.func) == "torch.load":
                loads += 1
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{f}:{node.lineno}: torch.load without weights_only=True"
            assert name(node.func) not in ("pickle.load", "pickle.loads", "pickle.Unpickler"), f"{f}:{node.lineno}"
            flag = kw.get("trust_remote_code")
            assert not (isinstance(flag, ast.Constant) and flag.value is True), f"{f}:{node.lineno}: remote code"
        assert "trust-remote-code" not in f.read_text(), f"{f}: a command-line switch for remote code"
    assert loads >= 1  # the head loader
    for fn in (load_causal_lm, RGMScorer.from_pretrained):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False


# --- a tokenizer with no step token ------------------------------------------------------------------------------

def save_tokenizer_without_step_token(out: Path) -> None:
    """A byte-level BPE trained on text without '.': none of its tokens holds '.\n\n'; '\n\n' is one token."""
    save_tokenizer(out, "<think>Add 3 and 4\n\nThat gives 7\n\n</think>The answer is 7\n\n", step_token=False)


def test_tokenizer_without_step_token_unless_step_tokens_say_which(export, tmp_path):
    from megatron_rgm.arguments import parse_args
    from megatron_rgm.convert.convert import head_flags
    from megatron_rgm.hf import RGMScorer
    from megatron_rgm.steps import StepSegmenter
    from megatron_rgm.tokenizer import load_tokenizer

    served = copy_of(export, tmp_path / "served")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (served / name).unlink(missing_ok=True)
    save_tokenizer_without_step_token(served)
    tok = load_tokenizer(served)
    raises(lambda: StepSegmenter.from_tokenizer(tok), "has no token whose text is '.\\n\\n'",
           "pass --sprm-step-rule text", "or --sprm-step-tokens")
    raises(lambda: StepSegmenter.from_tokenizer(tok, rule="contains"), "has no token whose text contains '.\\n\\n'")
    assert len(StepSegmenter.from_tokenizer(tok, ["\n\n"]).step_ids) > 0
    raises(lambda: RGMScorer.from_pretrained(str(served)), "--sprm-step-tokens")
    # The export records the trained model's --sprm-step-tokens and rule; the scorer then uses them.
    meta = head_flags(parse_args(["--num-layers", "4", "--sprm-step-tokens", "\\n\\n", "--lr", "1e-6",
                                  "--sprm-step-rule", "contains"]).rgm)
    assert meta == {"sprm_layer": -2, "sprm_step_tokens": ["\n\n"], "sprm_step_rule": "contains"}
    (served / "sprm_config.json").write_text(json.dumps(meta))
    scorer = RGMScorer.from_pretrained(str(served))
    assert scorer.step_strings == ("\n\n",) and scorer.step_rule == "contains"  # also run_hf's sampler's
    scored = scorer.score(["<think>Add 3 and 4\n\nThat gives 7\n\n</think>7"])[0]
    assert len(scored.step_scores) == 2 and all(0 < p < 1 for p in scored.step_scores)


# --- rollout stores: truncated, damaged, another schema or tokenizer ---------------------------------------------

def written_store(path: Path) -> Path:
    RolloutStore(path, "a", tokenizer="tok-A").append(0, batch(0, 0))
    return path


def test_refused_store_opens_change_nothing(tmp_path):
    s = written_store(tmp_path / "s")
    before = snapshot(s)
    raises(lambda: RolloutStore(s, "a", tokenizer="tok-B"), "written with tokenizer tok-A, this run uses tok-B",
           "use a new store or the tokenizer it was written with")
    assert snapshot(s) == before
    meta = json.loads((s / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99
    (s / "zarr.json").write_text(json.dumps(meta))
    before = snapshot(s)
    raises(lambda: RolloutStore(s, "a", tokenizer="tok-A"), "schema version 99", "regenerate it")
    assert snapshot(s) == before


def test_append_to_a_truncated_store_is_refused(tmp_path):
    s = written_store(tmp_path / "s")
    RolloutStore(s, "a").group["rank_00000"]["log_probs"].resize((4,))
    before = snapshot(s)
    # Before this was refused, the append padded log_probs back to 18 entries with zeros.
    raises(lambda: RolloutStore(s, "a").append(0, batch(0, 1)),
           "is truncated: rank_00000/log_probs holds 4 entries but 18 were committed; regenerate the store")
    assert snapshot(s) == before


@pytest.mark.parametrize("part, fragments", [
    ("rank_00000/tokens/c/0", ["trajectory 0 (rank_00000) cannot be read"]),
    ("rank_00000/COMMIT", ["rank_00000/COMMIT is unreadable"]),
    ("rank_00000/tokens/zarr.json", ["rank_00000/tokens is missing or unreadable"]),
    ("rank_00000/step_scores", ["rank_00000/step_scores is missing or unreadable"]),
    ("zarr.json", ["has an unreadable zarr.json"]),
])
def test_damaged_stores(tmp_path, part, fragments):
    s = written_store(tmp_path / "s")
    target = s / part
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.write_bytes(target.read_bytes()[:10])  # cut short, as by a full disk or a partial copy

    def read_all():
        store = RolloutStore(s, "r")
        return [store[i] for i in range(len(store))]

    raises(read_all, *fragments, "regenerate")


def test_generate_into_a_store_of_another_tokenizer_writes_nothing(export, tmp_path, prompts):
    from megatron_rgm.rollout.generate import generate_hf, load_prompts
    from megatron_rgm.rollout.sampler import SamplingParams

    s = written_store(tmp_path / "s")
    before = snapshot(s)
    raises(lambda: generate_hf(str(export), load_prompts(str(prompts), "q", "a", None), str(s), 2,
                               SamplingParams(max_new_tokens=4)), "was written with tokenizer tok-A")
    assert snapshot(s) == before


# --- prompts longer than the model; k < 1; BoN@k with fewer than k samples ---------------------------------------

def long_prompts(tmp_path: Path) -> Path:
    f = tmp_path / "long.jsonl"
    rows = [{"id": "short", "q": "Add 1 and 2.", "a": "3"}, {"id": "long", "q": "Add 1 and 2. " * 60, "a": "3"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_prompt_longer_than_the_model_is_named_before_anything_is_written(export, tmp_path, capsys):
    long = long_prompts(tmp_path)
    fragments = ["prompt long (record 2) has", "more than the model's 128", "shorten or drop that prompt"]
    common = ["--prompts", long, "--problem-key", "q", "--answer-key", "a", "--k", "2", "--max-new-tokens", "8",
              "--backend", "hf", "--hf-path", export]
    exits_2(capsys, "generate_rollouts", [*common, "--output", tmp_path / "store"], *fragments)
    exits_2(capsys, "best_of_n", [*common, "--output", tmp_path / "bon.jsonl"], *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.jsonl"]


def test_k_below_one(export, tmp_path, prompts, capsys):
    from megatron_rgm.hf import RGMScorer
    from megatron_rgm.rollout.hf_sampler import HFSampler
    from megatron_rgm.rollout.sampler import SamplingParams

    exits_2(capsys, "generate_rollouts", ["--prompts", prompts, "--output", tmp_path / "store", "--problem-key", "q",
                                          "--answer-key", "a", "--k", "0", "--backend", "hf", "--hf-path", export],
            "--k must be >= 1")
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"id": "a", "answer": "1", "responses": ["\\boxed{1}"]}) + "\n")
    exits_2(capsys, "evaluate", [samples, "--k", "0", "--json", tmp_path / "e.json"], "--k must be >= 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "s.jsonl"]
    scorer = RGMScorer.from_pretrained(str(export))
    sampler = HFSampler(scorer, scorer.tokenizer, scorer.segmenter)
    raises(lambda: sampler.generate([5, 6], 0, SamplingParams()), "k (samples per prompt) must be >= 1")
    # The default budget is every position the prompt leaves: a prompt that leaves none is refused, by name.
    limit = sampler.position_limit
    raises(lambda: sampler.generate([5] * limit, 1, SamplingParams()),
           f"prompt ({limit} tokens) + max_new_tokens (1) exceeds the model's {limit} positions")
    r = sampler.generate([5] * (limit - 3), 2, SamplingParams(temperature=0.0))  # no EOS: to the last position
    assert r.tokens.shape[1] == limit and r.lengths.tolist() == [limit, limit]


def test_bon_at_k_with_fewer_than_k_samples_writes_no_output(tmp_path, capsys):
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"id": "p", "answer": "1", "responses": ["\\boxed{1}"] * 4,
                                   "step_scores": [[0.5]] * 4}) + "\n")
    outs = [tmp_path / "e.json", tmp_path / "e.md", tmp_path / "e.png"]
    exits_2(capsys, "evaluate", [samples, "--k", "1", "8", "--json", outs[0], "--table", outs[1], "--plot", outs[2]],
            "problem p has 4 samples, fewer than k=8", "drop that k")
    assert not any(o.exists() for o in outs)


# --- corrupt lines and missing fields, at the tools -------------------------------------------------------------

@pytest.mark.parametrize("line, fragments", [
    (b'{"id": "b", "answer": ', ["s.jsonl:2: not valid JSON", "fix or remove that line"]),
    (b'{"id": "b", "answer": "\xff\xfe"}', ["s.jsonl:2: not valid UTF-8"]),
    (b'{"id": "b", "answer": "1"}', ["record 2 has no field 'responses'"]),
    (b'{"id": "b", "answer": "1", "responses": "\\\\boxed{1}"}', ["'responses' must be a list of strings"]),
    (b'{"id": "b", "answer": "1", "responses": ["x"], "step_scores": [[2.5]]}', ["probabilities in [0, 1]"]),
    (b'{"id": "b", "answer": "1", "responses": ["x"], "step_scores": [[0.5], [0.5]]}',
     ["2 step-score lists for 1 responses"]),
])
def test_evaluate_rejects_a_bad_samples_line(tmp_path, capsys, line, fragments):
    samples = tmp_path / "s.jsonl"
    samples.write_bytes(b'{"id": "a", "answer": "1", "responses": ["\\\\boxed{1}"]}\n' + line + b"\n")
    exits_2(capsys, "evaluate", [samples, "--k", "1", "--json", tmp_path / "e.json"], *fragments)
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("name", ["best_of_n", "generate_rollouts"])
@pytest.mark.parametrize("line, fragments", [
    ('{"q": "Add 2 and 2.", "a": ', ["p.jsonl:2: not valid JSON"]),
    ('{"q": "Add 2 and 2."}', ["record 2 has no field 'a'", "pass --problem-key/--answer-key"]),
])
def test_prompt_files_with_a_bad_line(export, tmp_path, capsys, name, line, fragments):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"q": "Add 1 and 2.", "a": "3"}\n' + line + "\n")
    out = tmp_path / "out"
    exits_2(capsys, name, ["--prompts", prompts, "--output", out, "--problem-key", "q", "--answer-key", "a",
                           "--backend", "hf", "--hf-path", export], *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]
