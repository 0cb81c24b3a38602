"""Reflective Best-of-N: k thinking trajectories, scored by the SPRM head as they are sampled; the best one is
continued to its answer.

For each problem:

1. sample k trajectories of the prompt, each stopping at ``</think>`` (or eos, or the token budget); the same
   forward passes give the head logit at every step position (:class:`~megatron_rgm.rollout.sampler.Sampler`);
2. aggregate each trajectory's step scores (``sigmoid`` of the logits; ``geometric`` by default, see
   :func:`megatron_rgm.ops.segment_aggregate`) and keep the argmax (ties: the lowest index);
3. let the policy continue the chosen trajectory (prompt + thinking as the new prompt) to its answer, greedily by
   default; a trajectory that ended with eos is already complete and is kept as it is, one cut by the token
   budget is continued as it is (the policy may still close its thinking);
4. grade the final text (thinking + answer) against the gold answer when there is one.

With ``complete_all`` every candidate is continued and graded, so the output also serves
``tools/evaluate.py`` for pass@1, maj@k and BoN@k over all candidates. A candidate's continuation depends only on
the problem, the candidate and the seed, so the chosen response is the same with or without ``complete_all``.

Output (jsonl, one line per problem; also a samples file for ``tools/evaluate.py``)::

    {"id", "problem", "answer" (gold or null), "aggregation", "prompt_template", "chosen": int,
     "candidates": [{"text", "step_scores": [p, ...], "aggregate", "finish": "think_end"|"eos"|"length",
                     "response"?, "prediction"?, "correct"?}, ...],
     "response", "prediction", "correct" (null without gold),
     "responses": [str, ...], "step_scores": [[p, ...], ...]}

``responses[j]`` is candidate j's final text when it was continued (always the chosen one; all with
``complete_all``), else its thinking alone.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_rgm import distributed, ops
from megatron_rgm.config import AGGREGATIONS, ConfigError, check_template, option
from megatron_rgm.data.benchmarks import KNOWN, read_jsonl
from megatron_rgm.hf import RGMScorer
from megatron_rgm.inference.pruning import PRUNE_SCALES, PruneRule, ReflectivePruner, check_scale
from megatron_rgm.rollout.generate import (
    PROMPT_TEMPLATE,
    check_prompt_lengths,
    load_prompts,
    open_sampler,
    report_vllm_times,
)
from megatron_rgm.rollout.rewards import CORRECT, VERIFIERS, last_boxed, make_verifier
from megatron_rgm.rollout.sampler import Rollout, Sampler, SamplingParams
from megatron_rgm.rollout.sampling import BEST_OF_N_PENALTY, RESPONSE_BUDGET, derive_seed, room
from megatron_rgm.steps import StepSegmenter
from megatron_rgm.tokenizer import load_tokenizer, prompt_ids

THINK_END = "</think>"


BON_MODES = ("think", "complete")


@dataclass
class BestOfNConfig:
    """Options of a Best-of-N run.

    Attributes:
        k: candidates per problem.
        mode: ``think`` (ours): candidates are thinking trajectories, stopped at ``think_end``; the chosen one
            is continued to its answer. ``complete`` (the reference's): candidates are whole responses (thinking
            and answer, to EOS or the budget), each scored whole; the chosen one's own answer is graded.
        aggregation: geometric | arithmetic | product | min | last.
        sampling: decoding of the thinking phase (``think_end`` is added to its stop strings).
        think_end: the string that closes the thinking (``think`` mode).
        answer_max_new_tokens: token budget of the answer (``think`` mode; None: every position left).
        answer_temperature: 0: greedy answer.
        complete_all: answer (``think`` mode) and grade every candidate, not only the chosen one.
        verifier: math | exact.
        template: how a problem becomes the prompt (``{problem}``).
    """

    k: int = option(8, "candidates per problem")
    mode: str = option("think", "think: sample thinking trajectories, continue the chosen one to its answer; complete "
                       "(the reference's): sample whole responses, score each whole, grade the chosen one's own answer",
                       choices=BON_MODES, flag="--bon-mode")
    aggregation: str = option("geometric", f"how step scores become a trajectory's score: {' | '.join(AGGREGATIONS)}")
    sampling: SamplingParams = option(default_factory=lambda: SamplingParams(repetition_penalty=BEST_OF_N_PENALTY),
                                      cli=False)
    think_end: str = option(THINK_END, "stop string that ends the thinking")
    answer_max_new_tokens: int | None = option(None, "token budget of the chosen trajectory's answer (default: "
                                               f"every position the trajectory leaves, at most {RESPONSE_BUDGET})")
    answer_temperature: float = option(0.0, "0: greedy answer")
    complete_all: bool = option(False, "answer and grade every candidate, not only the chosen")
    max_batch: int = option(256, "sequences decoded at once: the candidates of several problems share one pool of "
                            "KV-cache slots, a finished one's slot taken by a waiting one")
    prune_margin: float | None = option(None, "reflective early stopping: end a candidate whose running aggregate "
                                        "trails its problem's best by more than this (off by default)",
                                        flag="--bon-prune-margin")
    prune_min_steps: int = option(2, "steps both candidates need before one is compared with the other",
                                  flag="--bon-prune-min-steps")
    prune_every: int = option(8, "decode steps between early-stopping checks", flag="--bon-prune-every")
    prune_scale: str = option("prob", "what the margin measures: the aggregates (prob) or their log-odds (logit; one "
                              "margin for heads whose scores saturate)", flag="--bon-prune-scale",
                              choices=PRUNE_SCALES)
    verifier: str = option("math", cli=False)  # the prompts' (PromptFileConfig)
    template: str = option(PROMPT_TEMPLATE, cli=False)

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"--k must be >= 1 (candidates per problem), got {self.k}")
        if self.mode not in BON_MODES:
            raise ConfigError(f"--bon-mode {self.mode!r} is unknown: use one of {', '.join(BON_MODES)}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"--aggregation {self.aggregation!r} is unknown: use one of {', '.join(AGGREGATIONS)}")
        if self.answer_max_new_tokens is not None and self.answer_max_new_tokens < 1:
            raise ConfigError(f"--answer-max-new-tokens must be >= 1, got {self.answer_max_new_tokens}")
        if self.answer_temperature < 0:
            raise ConfigError(f"--answer-temperature must be >= 0, got {self.answer_temperature}")
        if self.verifier not in VERIFIERS:
            raise ConfigError(f"--verifier {self.verifier!r} is unknown: use one of {', '.join(VERIFIERS)}")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {self.max_batch}")
        check_scale(self.prune_scale)  # also when no margin asks for a rule
        self.prune_rule()  # the --bon-prune-* flags, checked before any model loads
        check_template(self.template)

    def prune_rule(self) -> PruneRule | None:
        """The early-stopping rule these options ask for (None: off)."""
        if self.prune_margin is None:
            return None
        return PruneRule(self.prune_margin, self.prune_min_steps, self.prune_every, self.prune_scale)


def choose(aggregates: list[float], stopped: list[bool] | None = None) -> int:
    """Index of the highest aggregate among the candidates not stopped early; ties go to the lowest index (as
    ``bon@k`` in the evaluation)."""
    eligible = [j for j in range(len(aggregates)) if not (stopped and stopped[j])]
    return max(eligible, key=lambda j: (aggregates[j], -j))


def score_candidates(rollout: Rollout, aggregation: str) -> tuple[list[list[float]], list[float]]:
    """(step probabilities per candidate, aggregate per candidate) of a rollout.

    The aggregate is computed from the float32 probabilities, as ``tools/evaluate.py`` computes it from the
    recorded ``step_scores``, so the choice here and its ``bon@k`` agree exactly.
    """
    probs = torch.sigmoid(rollout.step_logits.float())
    cu = rollout.cu_steps.to(torch.int32)
    aggregates = ops.segment_aggregate(probs, cu, aggregation, from_probs=True)
    steps = [probs[int(cu[j]):int(cu[j + 1])].tolist() for j in range(len(cu) - 1)]
    return steps, aggregates.tolist()


def _sync(values: list[float]) -> list[float]:
    """Rank 0's values on every rank: all ranks must take the same branch (which candidate to continue)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.broadcast(t, src=0)
    return t.tolist()


def _seed(base: int, problem: int, candidate: int = -1) -> int:
    """Seed of a problem's k thinking draws (``candidate`` -1; sample j draws from its own generator, keyed by
    this seed and j) or of one candidate's continuation."""
    return derive_seed(base, problem) if candidate < 0 else derive_seed(base, problem, candidate + 1)


class BestOfN:
    """Runs Best-of-N with a sampler: a :class:`Sampler` (Megatron, every rank calls in step) or
    :class:`~megatron_rgm.rollout.hf_sampler.HFSampler` or
    :class:`~megatron_rgm.rollout.vllm_sampler.VLLMSampler`.

    Args:
        sampler: has ``generate(prompt_ids, k, params) -> Rollout`` and ``position_limit`` or
            ``model.max_sequence_length``.
        tokenizer: ``encode(text, add_special_tokens=False)``, ``decode(ids)``, ``eos_token_id``.
        cfg: the run's options.
        grade: whether this rank grades (the writing rank; math-verify is not free).
    """

    def __init__(self, sampler, tokenizer, cfg: BestOfNConfig, grade: bool = True):
        self.sampler, self.tokenizer, self.cfg = sampler, tokenizer, cfg
        self.limit = getattr(sampler, "position_limit", None) or sampler.model.max_sequence_length
        eos = list(cfg.sampling.eos_token_ids)
        if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
            eos = [tokenizer.eos_token_id]
        self.eos = eos
        stops = [*cfg.sampling.stop_strings, *([cfg.think_end] if cfg.mode == "think" else [])]
        self.thinking = replace(cfg.sampling, eos_token_ids=eos, stop_strings=list(dict.fromkeys(stops)))
        self.verify = make_verifier(cfg.verifier) if grade else None

    def _finish(self, ids: list[int], text: str) -> str:
        if ids and ids[-1] in self.eos:
            return "eos"
        return "think_end" if self.cfg.mode == "think" and self.cfg.think_end in text else "length"

    def _complete(self, items: list[tuple[list[int], int]]) -> list[list[int]]:
        """Each ``(ids, seed)`` (prompt + thinking) continued to the answer: eos or the answer budget (within the
        positions), all in one batched call."""
        s, todo = self.cfg.sampling, []
        for n, (ids, seed) in enumerate(items):
            left = room(len(ids), self.limit)
            budget = left if self.cfg.answer_max_new_tokens is None else min(self.cfg.answer_max_new_tokens, left)
            if budget >= 1:
                todo.append((n, ids, SamplingParams(temperature=self.cfg.answer_temperature, top_p=s.top_p,
                                                    top_k=s.top_k, repetition_penalty=s.repetition_penalty,
                                                    max_new_tokens=budget, eos_token_ids=self.eos, seed=seed)))
        out = [ids for ids, _ in items]
        if todo:
            rollouts = self.sampler.generate_batch([ids for _, ids, _ in todo], 1, [p for _, _, p in todo],
                                                   max_batch=self.cfg.max_batch)
            for (n, _, _), r in zip(todo, rollouts):
                out[n] = r.tokens[0, :int(r.lengths[0])].tolist()
        return out

    def _grade(self, response: str, gold: str | None) -> dict:
        if self.verify is None:
            return {}
        if gold is None:
            return {"prediction": last_boxed(response), "correct": None}
        g = self.verify(response, gold)
        return {"prediction": g.answer, "correct": g.outcome == CORRECT}

    def solve(self, problem: dict, index: int) -> dict:
        """One problem (``{"id", "problem", "answer"?}``, ``index`` seeds its draws) -> its output record."""
        return self.solve_many([problem], [index])[0]

    def solve_many(self, problems: list[dict], indices: list[int]) -> list[dict]:
        """Several problems' candidates decoded together (one pool of slots), then their picks' answers together."""
        cfg, tok = self.cfg, self.tokenizer
        prompts = [prompt_ids(tok, cfg.template, p["problem"]) for p in problems]
        rule = cfg.prune_rule()
        stopper = ReflectivePruner(rule, self.sampler.segmenter, cfg.aggregation) if rule else None
        rollouts = self.sampler.generate_batch(
            prompts, cfg.k, [replace(self.thinking, seed=_seed(cfg.sampling.seed, i)) for i in indices],
            max_batch=cfg.max_batch, stopper=stopper)
        records, answers = [], []  # answers: (record, candidate, thinking ids, seed) to continue
        for problem, prompt, r, index in zip(problems, prompts, rollouts, indices):
            steps, aggregates = score_candidates(r, cfg.aggregation)
            aggregates = _sync(aggregates)
            stopped = r.stopped.tolist() if r.stopped is not None else [False] * cfg.k
            chosen = choose(aggregates, stopped)
            candidates = []
            for j in range(cfg.k):
                ids = r.tokens[j, :int(r.lengths[j])].tolist()
                text = tok.decode(ids[len(prompt):])
                c = {"text": text, "step_scores": steps[j], "aggregate": aggregates[j],
                     "finish": "stopped" if stopped[j] else self._finish(ids, text), "tokens": len(ids) - len(prompt)}
                if (j == chosen or cfg.complete_all) and not stopped[j]:
                    # The reference's mode: the candidate is the response, answer and all (or cut by the budget).
                    if c["finish"] == "eos" or cfg.mode == "complete":
                        c["response"] = text
                    else:
                        answers.append((len(records), j, ids, _seed(cfg.sampling.seed, index, j)))
                candidates.append(c)
            records.append((problem, prompt, chosen, candidates))
        for (n, j, _, _), final in zip(answers, self._complete([(ids, seed) for _, _, ids, seed in answers])):
            _, prompt, _, candidates = records[n]
            candidates[j]["response"] = tok.decode(final[len(prompt):])
            candidates[j]["tokens"] = len(final) - len(prompt)
        return [self._record(problem, chosen, candidates) for problem, _, chosen, candidates in records]

    def _record(self, problem: dict, chosen: int, candidates: list[dict]) -> dict:
        for c in candidates:
            if "response" in c:
                c.update(self._grade(c["response"], problem.get("answer")))
        best = candidates[chosen]
        return {"id": problem["id"], "problem": problem["problem"], "answer": problem.get("answer"),
                "aggregation": self.cfg.aggregation, "prompt_template": self.cfg.template, "chosen": chosen,
                "candidates": candidates,
                "response": best["response"], "prediction": best.get("prediction"), "correct": best.get("correct"),
                "responses": [c.get("response", c["text"]) for c in candidates],
                "step_scores": [c["step_scores"] for c in candidates],
                "tokens": [c["tokens"] for c in candidates], "stopped": [c["finish"] == "stopped" for c in candidates]}

    def run(self, problems: list[dict], output: str | Path | None) -> dict:
        """Solve every problem; write ``output`` (when given) all at once at the end (a temp file renamed).

        Returns:
            ``{"problems": n, "graded": g, "correct": c}`` (``correct`` counts chosen responses).
        """
        # A prompt that cannot fit is named before any sampling (every rank raises the same error).
        check_prompt_lengths(self.tokenizer, problems, self.cfg.template, self.cfg.sampling.max_new_tokens, self.limit)
        out = Path(output) if output else None
        tmp = out.with_name(out.name + f".tmp{os.getpid()}") if out else None
        summary = {"problems": 0, "graded": 0, "correct": 0}
        if tmp:
            out.parent.mkdir(parents=True, exist_ok=True)
        try:
            chunk = max(1, 4 * self.cfg.max_batch // self.cfg.k)  # problems decoded together
            with open(tmp, "w", encoding="utf-8") if tmp else open(os.devnull, "w") as f, \
                    tqdm(total=len(problems), desc=f"best-of-{self.cfg.k}", disable=out is None, file=sys.stdout) as bar:
                for at in range(0, len(problems), chunk):
                    part = problems[at:at + chunk]
                    for record in self.solve_many(part, list(range(at, at + len(part)))):
                        f.write(json.dumps(record) + "\n")
                        summary["problems"] += 1
                        if record["correct"] is not None:
                            summary["graded"] += 1
                            summary["correct"] += int(record["correct"])
                    bar.update(len(part))
            if tmp:
                os.replace(tmp, out)
        finally:
            if tmp and tmp.exists():
                tmp.unlink()
        return summary


def load_problems(path: str, problem_key: str | None, answer_key: str | None, limit: int | None) -> list[dict]:
    """``[{"id", "problem", "answer"}]``; with ``problem_key`` and no ``answer_key`` (an unknown file), no gold."""
    if problem_key and not answer_key and Path(path).stem not in KNOWN:
        rows = read_jsonl(path)
        missing = next((n for n, row in enumerate(rows, 1) if problem_key not in row), None)
        if missing:
            raise ConfigError(f"{path}: record {missing} has no field {problem_key!r}: pass --problem-key")
        if not rows:
            raise ConfigError(f"{path} holds no prompts: give a jsonl with one problem per line")
        problems = [{"id": str(row.get("id", n)), "problem": str(row[problem_key]), "answer": None}
                    for n, row in enumerate(rows)]
        return problems[:limit] if limit else problems
    try:
        return load_prompts(path, problem_key, answer_key, limit)
    except ConfigError as e:
        if "holds no prompts" in str(e):
            raise ConfigError(f"{path} holds no prompts: give a jsonl with one problem per line") from None
        raise


def run_megatron(mcore_path: str, tokenizer_path: str | None, problems: list[dict], output: str,
                 cfg: BestOfNConfig, tp: int = 1, pp: int = 1) -> None:
    """Best-of-N with a Megatron checkpoint at a TP x PP layout, on this rank (run on every rank; rank 0 writes)."""
    from megatron_rgm.model.load import describe_checkpoint, load_model

    checkpoint = describe_checkpoint(mcore_path)
    tokenizer = load_tokenizer(checkpoint.tokenizer_path(tokenizer_path))
    try:
        loaded = load_model(mcore_path, tp, pp, checkpoint=checkpoint)
        segmenter = StepSegmenter.from_config(tokenizer, loaded.args.rgm)
        sampler = Sampler(loaded.model, checkpoint.sampling_vocab(tokenizer), segmenter, tokenizer)
        writer = dist.get_rank() == 0
        summary = BestOfN(sampler, tokenizer, cfg, grade=writer).run(problems, output if writer else None)
        if writer:
            _report(summary, cfg.k, output)
        dist.barrier()
    finally:
        distributed.shutdown()


def run_hf(hf_path: str, tokenizer_path: str | None, problems: list[dict], output: str, cfg: BestOfNConfig,
           vllm: bool = False, vllm_python: str | None = None, kv_cache_gb: float = 2.0) -> dict:
    """Best-of-N with an HF export (transformers + its ``score_module.pt``), in this process; with ``vllm``, vLLM
    samples the candidates and the export's forward scores them."""
    if cfg.prune_margin is not None:
        raise ConfigError("--bon-prune-margin stops candidates inside continuous batching, which the megatron "
                          "backend runs: use --backend megatron (hf-to-mcore converts an export)")
    scorer = RGMScorer.from_pretrained(hf_path)
    tokenizer = load_tokenizer(tokenizer_path or hf_path)
    segmenter = StepSegmenter.from_tokenizer(tokenizer, scorer.step_strings, scorer.step_rule)
    sampler = open_sampler(hf_path, scorer, tokenizer, segmenter, vllm, vllm_python, cfg.max_batch, kv_cache_gb)
    try:
        summary = BestOfN(sampler, tokenizer, cfg).run(problems, output)
        if vllm:
            report_vllm_times(sampler)
    finally:
        if vllm:
            sampler.close()
    _report(summary, cfg.k, output)
    return summary


def _report(summary: dict, k: int, output: str) -> None:
    acc = f", best-of-{k} accuracy {summary['correct']}/{summary['graded']}" if summary["graded"] else ""
    print(f"{summary['problems']} problems{acc}; wrote {output}", flush=True)
