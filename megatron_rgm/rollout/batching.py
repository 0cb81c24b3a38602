"""Continuous batching: every prompt x k sample of a call decoded in one pool of KV-cache slots.

A slot is one row of megatron-core's static KV cache (``StaticInferenceContext``: ``S`` rows of ``L``
positions). A sequence (the j-th sample of a prompt) takes a free slot, decodes one token a step beside the
others, each at its own position, and gives the slot back when it ends; the next waiting sequence takes it.
So the cache holds ``S`` sequences at a time, not every sequence of the call at its longest length.

* A prompt is prefilled once (batch 1, into the first slot one of its samples takes); its other samples copy
  the prompt's positions from a slot that holds them, and draw their first token from the prefill's logits.
* Every slot decodes at its own offset. megatron-core builds a decode step's per-row cache offsets as one value
  repeated; a pre-hook on the decoder hands it each slot's own. Its flash-decode attention takes per-row offsets
  (:mod:`megatron_rgm.rollout.decode_attention`), which is why continuous batching runs on that path.
* A free slot still decodes (the batch is static); its junk key lands at the position right after the prompt
  it holds, which the next sample of that prompt overwrites before it reads it.
* A sequence draws from its own generator, seeded by (the prompt's seed, j): its tokens do not depend on the
  slot or the step it ran in, so a call with many prompts samples what one prompt at a time samples.
* Once nothing waits and half the slots are free, the pool is compacted to the live sequences (fewer rows to
  decode at the tail of a call).
* An early-stopping rule (``stopper``), when given, looks at the pool after each decode step and names sequences
  to end now (Best-of-N's reflective pruning: a candidate whose step scores fall far behind its group's best);
  they end as if at EOS, marked ``stopped``, and their slots go to waiting sequences.

Tensor parallelism: every TP rank runs the same schedule (the same gathered logits and generators). Pipeline
parallelism: the last stage draws, the tokens are broadcast over the pipeline group, and every stage makes the
same admission, stop and compaction decisions from them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_rgm.rollout.sampling import SamplingParams, derive_seed, draw


@dataclass
class Request:
    """One prompt's ``k`` samples and, as they end, their results (``[k, max_len]``, on the model's device)."""

    prompt: list[int]
    k: int
    params: SamplingParams
    max_len: int  # the prompt and its budget of new tokens
    tokens: torch.Tensor = field(init=False)
    log_probs: torch.Tensor = field(init=False)
    position_logits: torch.Tensor = field(init=False)
    lengths: torch.Tensor = field(init=False)
    stopped: list[bool] = field(init=False)  # ended by the early-stopping rule
    first: tuple | None = None  # (logits [1, V], head [1] or None) at the prompt's last position, once prefilled

    def allocate(self, device) -> None:
        self.tokens = torch.zeros(self.k, self.max_len, dtype=torch.long, device=device)
        self.log_probs = torch.zeros(self.k, self.max_len, device=device)
        self.position_logits = torch.zeros(self.k, self.max_len, device=device)
        self.lengths = torch.full((self.k,), self.max_len, dtype=torch.long, device=device)
        self.stopped = [False] * self.k


@dataclass
class Sequence:
    """What an early-stopping rule sees of one sample so far (on the last pipeline stage)."""

    request: int
    sample: int
    tokens: torch.Tensor  # [n] prompt and response so far
    position_logits: torch.Tensor  # [n] the head's logit at each position
    slot: int | None  # its slot while it decodes; None once it has ended


def sample_generator(params: SamplingParams, j: int, device) -> torch.Generator:
    """The generator of a prompt's ``j``-th sample: its own stream, whatever else is decoded beside it."""
    return torch.Generator(device=device).manual_seed(derive_seed(params.seed, j))


def copy_prompt_cache(context, src: int, dst: list[int], length: int) -> None:
    """Copy the first ``length`` positions of cache row ``src`` to the rows ``dst`` (every layer's keys and values,
    ``[s, b, heads, d]``)."""
    for entry in context.key_value_memory_dict.values():
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise RuntimeError(f"unexpected KV cache entry in the inference context: {type(entry)}")
        for memory in entry:
            for row in dst:
                memory[:length, row] = memory[:length, src]


class SlotPool:
    """The continuous-batching run of :meth:`Sampler.generate_batch` (megatron-core models, flash-decode path)."""

    def __init__(self, sampler, requests: list[Request], slots: int, device, stopper=None):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.sampler, self.requests, self.device, self.stopper = sampler, requests, device, stopper
        self.size = slots
        length = max(r.max_len for r in requests)
        self.context = StaticInferenceContext(slots, length)
        self.tokens = torch.zeros(slots, length, dtype=torch.long, device=device)
        self.log_probs = torch.zeros(slots, length, device=device)
        self.position_logits = torch.zeros(slots, length, device=device)
        self.length = [0] * slots  # tokens in the slot (host: the schedule needs no device reads)
        self.owner: list[tuple[int, int] | None] = [None] * slots  # (request, sample) decoding in the slot
        self.prompt_of: list[int | None] = [None] * slots  # whose prompt positions the slot's cache holds
        self.texts = [""] * slots  # decoded so far, for stop strings
        self.gens: dict[tuple[int, int], torch.Generator] = {}
        self.pending = deque((r, j) for r, req in enumerate(requests) for j in range(req.k))
        self.waiting = [req.k for req in requests]  # samples of each prompt not yet started
        self.offsets: torch.Tensor | None = None  # per-slot cache offsets of the current decode step
        for req in requests:
            req.allocate(device)

    # --- the decoder's per-slot offsets -------------------------------------------------------------------------

    def _hook(self, module, args, kwargs):
        if self.offsets is not None:
            kwargs["sequence_len_offset"] = self.offsets
        return args, kwargs

    def run(self) -> None:
        handle = self.sampler.model.decoder.register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            while self.pending or any(o is not None for o in self.owner):
                self._admit()
                if any(o is not None for o in self.owner):
                    self._decode()
                    self._stop_early()
                self._compact()
        finally:
            handle.remove()

    # --- admission: prefill or copy a prompt, draw the first token ---------------------------------------------

    def _prefill(self, r: int, slot: int) -> None:
        req, ctx = self.requests[r], self.context
        n = len(req.prompt)
        ctx.enable_prefill_mode()
        ctx.sequence_len_offset, ctx.batch_size_offset = 0, slot
        ids = torch.tensor([req.prompt], dtype=torch.long, device=self.device)
        positions = torch.arange(n, device=self.device).unsqueeze(0)
        fresh = not ctx.key_value_memory_dict  # megatron-core allocates the cache in this forward, uninitialised
        req.first = self.sampler._forward(ids, positions, ctx)
        ctx.batch_size_offset = 0
        if fresh:
            # Rows of other lengths are masked, not skipped, in a step whose slots sit at different offsets: the
            # values there are multiplied by 0, and a NaN left in fresh memory would still make NaN.
            for entry in ctx.key_value_memory_dict.values():
                for memory in entry:
                    written = memory[:n, slot].clone()
                    memory.zero_()
                    memory[:n, slot] = written

    def _admit(self) -> None:
        admitted = []
        for slot in range(self.size):
            if not self.pending:
                break
            if self.owner[slot] is not None:
                continue
            r, j = self.pending.popleft()
            req = self.requests[r]
            if self.prompt_of[slot] != r:
                src = next((s for s in range(self.size) if self.prompt_of[s] == r), None)
                if src is None:
                    self._prefill(r, slot)
                else:
                    copy_prompt_cache(self.context, src, [slot], len(req.prompt))
                self.prompt_of[slot] = r
            self.owner[slot], self.length[slot] = (r, j), len(req.prompt)
            self.gens[r, j] = sample_generator(req.params, j, self.device)
            self.waiting[r] -= 1
            admitted.append(slot)
        if not admitted:
            return
        picks = torch.zeros(self.size, dtype=torch.long, device=self.device)
        for r in sorted({self.owner[slot][0] for slot in admitted}):  # each prompt's new samples: one draw
            req, n = self.requests[r], len(self.requests[r].prompt)
            slots = [slot for slot in admitted if self.owner[slot][0] == r]
            rows = torch.tensor(slots, dtype=torch.long, device=self.device)
            self.tokens[rows, :n] = torch.tensor(req.prompt, dtype=torch.long, device=self.device)
            for slot in slots:
                self.texts[slot] = ""
            if self.sampler.last:
                logits, head = req.first
                if head is not None:
                    self.position_logits[rows, n - 1] = head[0]
                picks[rows], self.log_probs[rows, n] = draw(logits.expand(len(slots), -1), self.tokens[rows, :n],
                                                            req.params, [self.gens[self.owner[s]] for s in slots])
        self._broadcast(picks)
        tokens = picks.tolist()
        for slot in admitted:
            self._append(slot, tokens[slot])
        for r, req in enumerate(self.requests):  # a prompt whose samples all started needs its logits no more
            if not self.waiting[r]:
                req.first = None

    # --- one decode step for every slot --------------------------------------------------------------------------

    def _decode(self) -> None:
        offsets = []
        for slot in range(self.size):
            if self.owner[slot] is not None:
                offsets.append(self.length[slot] - 1)
            else:  # a free slot: its junk key goes right after the prompt it holds
                held = self.prompt_of[slot]
                offsets.append(len(self.requests[held].prompt) if held is not None else 0)
        at = torch.tensor(offsets, dtype=torch.long, device=self.device)
        rows = torch.arange(self.size, device=self.device)
        ctx = self.context
        ctx.enable_decode_mode()
        ctx.sequence_len_offset = max(1, max(offsets))  # megatron asserts one; the hook gives the per-slot ones
        self.offsets = at.to(torch.int32)
        try:
            logits, head = self.sampler._forward(self.tokens[rows, at].unsqueeze(1), at.unsqueeze(1), ctx)
        finally:
            self.offsets = None
        live = [s for s in range(self.size) if self.owner[s] is not None]
        picks = torch.zeros(self.size, dtype=torch.long, device=self.device)
        if self.sampler.last:
            rows = torch.tensor(live, dtype=torch.long, device=self.device)
            at_live = at[rows] + 1  # where each live slot's new token goes
            if head is not None:
                self.position_logits[rows, at_live - 1] = head[rows]
            for slots in self._by_params(live):  # the filters batched over slots that sample alike
                sub = torch.tensor(slots, dtype=torch.long, device=self.device)
                params = self.requests[self.owner[slots[0]][0]].params
                picks[sub], self.log_probs[sub, at[sub] + 1] = draw(
                    logits[sub], self._seen(slots, params), params, [self.gens[self.owner[s]] for s in slots])
        self._broadcast(picks)
        tokens = picks.tolist()
        for slot in live:
            self._append(slot, tokens[slot])

    def sequences(self, r: int) -> list[Sequence]:
        """The started samples of request ``r``: live ones from their slots, ended ones from the results."""
        req, out = self.requests[r], []
        live = {self.owner[s][1]: s for s in range(self.size) if self.owner[s] is not None and self.owner[s][0] == r}
        for j in range(req.k - self.waiting[r]):
            if j in live:
                s, n = live[j], self.length[live[j]]
                out.append(Sequence(r, j, self.tokens[s, :n], self.position_logits[s, :n], s))
            else:
                n = int(req.lengths[j])
                out.append(Sequence(r, j, req.tokens[j, :n], req.position_logits[j, :n], None))
        return out

    def _stop_early(self) -> None:
        """End the sequences the early-stopping rule names (decided on the last stage, sent to every stage)."""
        if self.stopper is None:
            return
        flags = torch.zeros(self.size, dtype=torch.long, device=self.device)
        if self.sampler.last:
            for slot in self.stopper(self):
                flags[slot] = 1
        self._broadcast(flags)
        for slot in flags.nonzero().flatten().tolist():
            r, j = self.owner[slot]
            self.requests[r].stopped[j] = True
            self._retire(slot, self.length[slot])

    def _by_params(self, slots: list[int]) -> list[list[int]]:
        """``slots`` grouped by how their prompts sample (all but the seed)."""
        groups: dict[tuple, list[int]] = {}
        for slot in slots:
            p = self.requests[self.owner[slot][0]].params
            groups.setdefault((p.temperature, p.top_p, p.top_k, p.repetition_penalty), []).append(slot)
        return list(groups.values())

    def _seen(self, slots: list[int], params: SamplingParams) -> torch.Tensor:
        """``[len(slots), n]`` each slot's tokens so far, for the repetition penalty: a slot shorter than the
        longest repeats its first token in the rest (a token it has, so the penalty is the same)."""
        rows = torch.tensor(slots, dtype=torch.long, device=self.device)
        if params.repetition_penalty == 1.0:
            return self.tokens[rows, :1]
        lengths = torch.tensor([self.length[s] for s in slots], device=self.device)
        n = int(lengths.max())
        seen = self.tokens[rows, :n]
        return torch.where(torch.arange(n, device=self.device) < lengths[:, None], seen, seen[:, :1])

    # --- bookkeeping ---------------------------------------------------------------------------------------------

    def _broadcast(self, picks: torch.Tensor) -> None:
        if self.sampler.pp > 1:  # every stage needs the tokens for its next forward and decisions
            dist.broadcast(picks, src=self.sampler.last_rank, group=self.sampler.pp_group)

    def _append(self, slot: int, token: int) -> None:
        """Put the slot's new token in place; retire the sequence if it ended (EOS, a stop string, its budget)."""
        r, j = self.owner[slot]
        req, n = self.requests[r], self.length[slot]
        self.tokens[slot, n] = token
        self.length[slot] = n + 1
        params = req.params
        ended = token in params.eos_token_ids
        if not ended and params.stop_strings and self.sampler.tokenizer is not None:
            piece = self.sampler.tokenizer.decode([token])
            self.texts[slot] += piece
            window = max(len(x) for x in params.stop_strings)
            ended = any(x in self.texts[slot][-(len(piece) + window):] for x in params.stop_strings)
        if ended or n + 1 >= req.max_len:
            self._retire(slot, n + 1)

    def _retire(self, slot: int, n: int) -> None:
        r, j = self.owner[slot]
        req = self.requests[r]
        req.tokens[j, :n] = self.tokens[slot, :n]
        req.log_probs[j, :n] = self.log_probs[slot, :n]
        req.position_logits[j, :n] = self.position_logits[slot, :n]
        req.lengths[j] = n
        self.log_probs[slot].zero_()
        self.position_logits[slot].zero_()
        self.owner[slot], self.length[slot] = None, 0
        del self.gens[r, j]

    def _compact(self) -> None:
        """With nothing waiting and half the slots or more free, keep only the live slots' rows."""
        live = [s for s in range(self.size) if self.owner[s] is not None]
        if self.pending or not live or 2 * len(live) > self.size:
            return
        keep = torch.tensor(live, dtype=torch.long, device=self.device)
        ctx = self.context
        for layer, (k, v) in list(ctx.key_value_memory_dict.items()):
            ctx.key_value_memory_dict[layer] = (k[:, keep].contiguous(), v[:, keep].contiguous())
        ctx.max_batch_size = self.size = len(live)
        self.tokens, self.log_probs = self.tokens[keep], self.log_probs[keep]
        self.position_logits = self.position_logits[keep]
        for name in ("length", "owner", "prompt_of", "texts"):
            values = getattr(self, name)
            setattr(self, name, [values[s] for s in live])
