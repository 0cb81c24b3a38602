"""The three step rules on real vocabularies (Qwen2/2.5/3 and Qwen3.5/3.6), on hand-written trajectories.

Each trajectory is built token by token, so which token is where is known without the code under test:
the expected scored positions are written down from the construction.
"""

from __future__ import annotations

import pytest
import torch

from helpers import qwen_vocab
from megatron_rgm.config import ConfigError
from megatron_rgm.steps import StepSegmenter

RULES = ("exact", "contains", "text")


@pytest.fixture(scope="module")
def qwen2():
    return qwen_vocab("qwen2")


@pytest.fixture(scope="module")
def qwen3_6():
    return qwen_vocab("qwen3_6")


@pytest.fixture(scope="module")
def qwen2_segmenters(qwen2):
    return {rule: StepSegmenter.from_tokenizer(qwen2, rule=rule) for rule in RULES}


def one(tok, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def words(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


class Trajectory:
    """Token ids appended piece by piece; ``mark(kind)`` remembers where a kind of step token sits."""

    def __init__(self):
        self.ids, self.at = [], {}

    def add(self, ids, kind: str | None = None) -> "Trajectory":
        if kind is not None:
            self.at.setdefault(kind, []).append(len(self.ids))
        self.ids += list(ids)
        return self

    def scored(self, *kinds: str) -> list[int]:
        """Positions scored when ``kinds`` end a step: the one before each."""
        return sorted(i - 1 for k in kinds for i in self.at.get(k, []))


def positions(segmenter, ids: list[int]) -> list[int]:
    return segmenter(torch.tensor([ids])).mask[0].nonzero().flatten().tolist()


def test_qwen2_vocabulary_as_measured(qwen2, qwen2_segmenters):
    # The facts the rules are about: ".\n\n" is one token (382), and 46 tokens contain it.
    assert one(qwen2, ".\n\n") == 382
    assert qwen2_segmenters["exact"].step_ids.tolist() == [382]
    assert len(qwen2_segmenters["contains"].step_ids) == 46
    assert {one(qwen2, ").\n\n"), one(qwen2, ".\n\n\n")} <= set(qwen2_segmenters["contains"].step_ids.tolist())


def qwen2_trajectory(tok) -> Trajectory:
    dot, think, end = one(tok, ".\n\n"), one(tok, "<think>"), one(tok, "</think>")
    t = Trajectory().add(words(tok, "Problem")).add([think])
    t.add([dot], "after-think")  # right after <think>: ends no step under any rule
    t.add(words(tok, "Add 3")).add([dot], "dot")
    t.add(words(tok, "Then (7")).add([one(tok, ").\n\n")], "paren-dot")
    t.add(words(tok, "So 7")).add([one(tok, ".")], "split").add([one(tok, "\n\n")])  # ".\n\n" over two tokens
    t.add(words(tok, "Next")).add([one(tok, ".\n\n\n")], "dot-newline")
    t.add(words(tok, "Done")).add([dot], "run").add([dot])  # the second of a run ends no step
    t.add([end]).add(words(tok, "Answer 7")).add([dot], "after-end")  # after </think>: outside the region
    return t


@pytest.mark.parametrize("rule,kinds", [
    ("exact", ("dot", "run")),
    ("contains", ("dot", "paren-dot", "dot-newline", "run")),
    ("text", ("dot", "paren-dot", "split", "dot-newline", "run")),
])
def test_each_rule_on_the_qwen2_vocabulary(qwen2, qwen2_segmenters, rule, kinds):
    t = qwen2_trajectory(qwen2)
    assert positions(qwen2_segmenters[rule], t.ids) == t.scored(*kinds)


def test_qwen3_6_has_no_step_token_and_the_text_rule_finds_the_steps(qwen3_6):
    for rule in ("exact", "contains"):
        with pytest.raises(ConfigError, match=r"no token whose text (is|contains) '\.\\n\\n'.*--sprm-step-rule text"):
            StepSegmenter.from_tokenizer(qwen3_6, rule=rule)
    period, breaks, think, end = one(qwen3_6, "."), one(qwen3_6, "\n\n"), one(qwen3_6, "<think>"), one(qwen3_6, "</think>")
    assert (period, breaks) == (13, 271)
    t = Trajectory().add([think]).add([period], "after-think").add([breaks])
    t.add(words(qwen3_6, "Add 3")).add([period], "split").add([breaks])
    t.add(words(qwen3_6, "Then 7")).add([period], "split").add([one(qwen3_6, "\n\n\n")])  # ".\n\n" inside ".\n\n\n"
    t.add(words(qwen3_6, "Done")).add([period], "split").add([breaks, period, breaks])  # one run of four tokens
    t.add(words(qwen3_6, "x")).add([period]).add(words(qwen3_6, " y"))  # a period without a break: no step
    t.add([end]).add(words(qwen3_6, "Answer")).add([period], "after-end").add([breaks])
    segmenter = StepSegmenter.from_tokenizer(qwen3_6, rule="text")
    assert positions(segmenter, t.ids) == t.scored("split")
    # The canonical tokenization of the same text scores the same steps.
    again = words(qwen3_6, qwen3_6.decode(t.ids))
    assert len(positions(segmenter, again)) == len(t.scored("split")) == 3


def test_generated_ids_and_retokenized_text(qwen2, qwen2_segmenters):
    """A sampler may emit "." then "\\n\\n" where the tokenizer writes ".\\n\\n": the text rule scores the
    same steps either way; the token rules miss that step in the generated ids (and only that one)."""
    t = qwen2_trajectory(qwen2)
    again = words(qwen2, qwen2.decode(t.ids))
    assert again != t.ids  # the split ".", "\n\n" merged back into 382
    counts = {rule: (len(positions(s, t.ids)), len(positions(s, again))) for rule, s in qwen2_segmenters.items()}
    assert counts["text"][0] == counts["text"][1] == 5
    assert counts["exact"] == (2, 3) and counts["contains"] == (4, 5)


def test_text_rule_equals_the_token_rules_where_the_delimiter_is_one_token(qwen2, qwen2_segmenters):
    # A trajectory whose step strings are all the one token ".\n\n" (and no token merely containing it).
    dot = one(qwen2, ".\n\n")
    t = Trajectory().add([one(qwen2, "<think>")])
    g = torch.Generator().manual_seed(0)
    plain = [i for i in range(1000, 3000) if "\n" not in qwen2.decode([i]) and "." not in qwen2.decode([i])]
    for n in torch.randint(1, 6, (12,), generator=g).tolist():
        t.add([plain[j] for j in torch.randint(0, len(plain), (n,), generator=g).tolist()]).add([dot])
    got = {rule: positions(s, t.ids) for rule, s in qwen2_segmenters.items()}
    assert got["exact"] == got["contains"] == got["text"] and len(got["text"]) == 12


def test_text_rule_ignores_ids_past_the_tokenizer(qwen3_6):
    segmenter = StepSegmenter.from_tokenizer(qwen3_6, rule="text")
    ids = words(qwen3_6, "<think>Add 3.\n\nThen.\n\n") + [len(qwen3_6) + 5, len(qwen3_6) + 100]  # padded rows
    assert len(positions(segmenter, ids)) == 2
    assert segmenter(torch.zeros((0, 4), dtype=torch.long)).mask.shape == (0, 4)


def test_a_head_file_brings_its_rule(tmp_path):
    """What a head is applied with travels beside its weights (``sprm_config.json``); the reference's
    ``score_module.pt`` alone is its own rule (exact); a config from before the rule was recorded is contains."""
    import json

    from megatron_rgm.convert.convert import imported_head
    from megatron_rgm.head import SPRMHead, head_config, save_head

    reference = tmp_path / "reference"
    reference.mkdir()
    torch.save(SPRMHead(64).state_dict(), reference / "score_module.pt")
    assert head_config(reference) == {"sprm_layer": -2, "sprm_step_tokens": [".\n\n"], "sprm_step_rule": "exact"}
    assert imported_head(str(reference / "score_module.pt"), 64).sprm_step_rule == "exact"
    (reference / "sprm_config.json").write_text(json.dumps({"sprm_layer": -1, "sprm_step_tokens": [".\n\n"]}))
    assert head_config(reference)["sprm_step_rule"] == "contains" and head_config(reference)["sprm_layer"] == -1

    ours = tmp_path / "ours"
    ours.mkdir()
    save_head(ours, SPRMHead(64, hidden_mult=3).state_dict(),
              {"sprm_layer": -1, "sprm_step_tokens": ["\n\n"], "sprm_step_rule": "text", "hidden_size": 64})
    head = imported_head(str(ours / "sprm_head.safetensors"), 64)
    assert (head.sprm_step_rule, head.sprm_step_tokens, head.sprm_layer, head.sprm_hidden_mult) == (
        "text", ["\n\n"], -1, 3)
