"""The training loop: joint GRPO + SPR (``--stage rgm``) and the language-model warm start (``--stage sft``).

One RGM iteration:

1. rollouts: each data-parallel replica samples ``--grpo-group-size`` (k)
   trajectories for its share of ``--prompts-per-iter`` prompts with the native
   sampler, step scores coming from the same forwards; or reads as many groups
   of a rollout store (``--rollouts``), with their old log-probs;
2. rewards (final-answer verifier) -> GRPO advantages over each group of k;
3. reference log-probs from the frozen reference model when ``--grpo-kl-coef > 0``;
4. one optimizer step per ``--global-batch-size`` trajectories, each through
   megatron-core's ``get_forward_backward_func`` (micro-batches, gradient
   accumulation): clipped policy loss + KL + entropy bonus + SPR loss, the head
   in its own param group with its own learning rate and gradient clip;
5. metrics (last rank), checkpoint every ``--save-interval``.

Every choice of data is a function of (seed, iteration, prompt), so a run
resumed from a checkpoint continues as the uninterrupted one would have.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from megatron_rgm import distributed
from megatron_rgm.config import ConfigError
from megatron_rgm.data.sources import (PromptSource, Sample, SFTSource, StoreSource, collate, padded_length,
                                        sft_sample)
from megatron_rgm.steps import vocab_size_of
from megatron_rgm.training.calibration import calibration_shift, orient_head
from megatron_rgm.training.logging import MetricsLogger
from megatron_rgm.training.optimizer import build_optimizer, optimizer_step, set_learning_rates


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite steps in a row); the message says at which iteration and what to try."""


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class Trainer:
    """Model, optimizer, data and reference model of one run, on this rank."""

    def __init__(self, args):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads

        from megatron_rgm.model import build_model

        self.args, self.run = args, args.run
        self.train_head = True  # False: GRPO alone, no SPR loss (the overhead benchmark's baseline)
        self._store = None  # --save-rollouts, opened on first use
        self.nonfinite_in_a_row = 0
        self.iteration_now = 0
        self.info = distributed.initialize(args.parallel)
        self.ps = ps
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.last_stage = ps.is_pipeline_last_stage()
        self.logging_rank = dist.get_rank() == dist.get_world_size() - 1  # Megatron-LM logs on the last rank
        self._check_batch_sizes()

        chunks = build_model(args)
        if self.run.sprm_only:
            for chunk in chunks:
                for name, p in chunk.named_parameters():
                    p.requires_grad_(name.startswith("sprm_head."))
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=self.run.use_distributed_optimizer)
        self.model = [DistributedDataParallel(args.transformer, ddp_config, m) for m in chunks]
        self.optimizer = build_optimizer(self.model, self.run, args.transformer)
        args.transformer.finalize_model_grads_func = finalize_model_grads
        args.transformer.grad_scale_func = self.optimizer.scale_loss

        self.tokenizer = self._tokenizer()
        self.vocab = vocab_size_of(self.tokenizer) if self.tokenizer is not None else args.namespace.vocab_size
        if self.vocab > args.vocab_size:
            raise ConfigError(f"the tokenizer has {self.vocab} tokens but --vocab-size is {args.namespace.vocab_size}:"
                              f" set --vocab-size {self.vocab} or more")
        self.source = self._source()
        # The reference is built before loading, so that a resumed run's RNG continues from the checkpoint's.
        self.ref = self._reference_model() if self._needs_reference() else None
        self.start_iteration = self._load()
        if self.ref is not None and self.start_iteration > 1 and not self.run.pretrained_checkpoint:
            raise ConfigError("the KL reference is the starting policy, but this run resumes without "
                              "--pretrained-checkpoint: pass the checkpoint it started from, or --grpo-kl-coef 0")
        self.logger = MetricsLogger(self.logging_rank, self.run.train_iters, self.run.tensorboard_dir,
                                    self.run.wandb_project, self.run.metrics_file,
                                    run_config=vars(args.namespace))

    # --- set-up ----------------------------------------------------------------------------------------

    def _check_batch_sizes(self) -> None:
        run, data, dp = self.run, self.args.data, self.dp
        micro = run.micro_batch_size
        if run.stage == "rgm":
            if data.prompts_per_iter % dp:
                raise ConfigError(f"--prompts-per-iter {data.prompts_per_iter} is not a multiple of the data-parallel "
                                  f"size {dp}: every replica samples the same number of prompts")
            per_iter = data.prompts_per_iter * data.group_size
            self.samples_per_iteration = per_iter  # trajectories trained on per iteration, in global batches
            self.global_batch = run.global_batch_size or per_iter
            if per_iter % self.global_batch:
                raise ConfigError(f"--global-batch-size {self.global_batch} does not divide the {per_iter} trajectories "
                                  f"of an iteration (--prompts-per-iter x --grpo-group-size)")
        else:
            self.global_batch = run.global_batch_size or micro * dp
            self.samples_per_iteration = self.global_batch
        if self.global_batch % (micro * dp):
            raise ConfigError(f"--global-batch-size {self.global_batch} is not a multiple of --micro-batch-size "
                              f"{micro} x data-parallel size {dp}: change one of them")
        self.num_micro = self.global_batch // (micro * dp)

    def _tokenizer(self):
        if not self.args.data.tokenizer:
            return None
        from megatron_rgm.tokenizer import load_tokenizer

        return load_tokenizer(self.args.data.tokenizer)

    def _source(self):
        data, seed = self.args.data, self.args.parallel.seed
        if self.run.stage == "sft":
            return SFTSource(data.sft_data, self.tokenizer, self.global_batch, seed)
        if self.run.stage != "rgm":
            return None
        if data.rollouts:
            from megatron_rgm.data.store import tokenizer_fingerprint

            fp = tokenizer_fingerprint(self.tokenizer) if self.tokenizer is not None else None
            source = StoreSource(data.rollouts, data.prompts_per_iter, seed, fp)
            sizes = {len(g) for g in source.groups}
            if sizes != {data.group_size}:
                raise ConfigError(f"rollout store {data.rollouts} has groups of {sorted(sizes)} trajectories but "
                                  f"--grpo-group-size is {data.group_size}: pass the store's k")
            return source
        from megatron_rgm.steps import StepSegmenter

        self.segmenter = StepSegmenter.from_tokenizer(self.tokenizer, self.args.rgm.sprm_step_tokens)
        return PromptSource(data.prompts, data.problem_key, data.answer_key, data.prompts_per_iter, seed)

    def _load(self) -> int:
        from pathlib import Path

        from megatron_rgm.checkpoint import latest_iteration, load_checkpoint

        load = self.run.load
        if load and (latest_iteration(load) is not None or (Path(load) / "metadata.json").exists()):
            opt = None if self.run.no_load_optim else self.optimizer
            return load_checkpoint(load, self.model, optimizer=opt).iteration + 1
        if self.run.pretrained_checkpoint:
            load_checkpoint(self.run.pretrained_checkpoint, self.model)
        return 1

    def _needs_reference(self) -> bool:
        return self.run.stage == "rgm" and not self.run.sprm_only and self.args.grpo.kl_coef > 0

    def _reference_model(self):
        """The frozen policy the KL term pulls towards: the starting weights (pretrained checkpoint or init)."""
        from megatron_rgm.model import build_model
        from megatron_rgm.checkpoint import load_checkpoint, rng_state, set_rng_state

        saved = rng_state()  # building draws initial weights: leave the run's random streams untouched
        ref = build_model(self.args)
        set_rng_state(saved)
        if self.run.pretrained_checkpoint:
            load_checkpoint(self.run.pretrained_checkpoint, ref)
        else:  # the reference is the policy as initialised
            for r, m in zip(ref, self.model):
                r.load_state_dict(_unwrap(m).state_dict())
        for r in ref:
            r.eval()
            r.requires_grad_(False)
        return ref

    # --- rollouts --------------------------------------------------------------------------------------

    def rollouts(self, iteration: int) -> list[list[Sample]]:
        """This replica's groups of k samples for ``iteration``."""
        if isinstance(self.source, StoreSource):
            return self.source.for_iteration(iteration, self.dp_rank, self.dp)
        from megatron_rgm.rollout.rewards import make_verifier
        from megatron_rgm.rollout.sampler import Sampler, SamplingParams
        from megatron_rgm.steps import encode

        data = self.args.data
        model = _unwrap(self.model[0])
        sampler = Sampler(model, self.vocab, self.segmenter, self.tokenizer)
        verifier = make_verifier(data.verifier)
        eos = self.tokenizer.eos_token_id
        groups = []
        for index, prompt in self.source.for_iteration(iteration, self.dp_rank, self.dp):
            ids = encode(self.tokenizer, data.prompt_template.format(problem=prompt["problem"]))
            room = model.max_sequence_length - len(ids)
            if room < 1:
                raise ConfigError(f"prompt {prompt.get('id', index)} has {len(ids)} tokens, more than the model's "
                                  f"{model.max_sequence_length} positions: raise --max-position-embeddings or drop it")
            params = SamplingParams(temperature=data.temperature, top_p=data.top_p,
                                    max_new_tokens=min(data.max_response_length, room),
                                    eos_token_ids=[eos] if eos is not None else [],
                                    seed=_seed(self.args.parallel.seed, iteration, index))
            r = sampler.generate(ids, data.group_size, params)
            probs = torch.sigmoid(r.step_logits)
            group = []
            for j in range(data.group_size):
                n = int(r.lengths[j])
                text = self.tokenizer.decode(r.tokens[j, len(ids):n].tolist())
                grade = verifier(text, str(prompt["answer"]))
                lo, hi = int(r.cu_steps[j]), int(r.cu_steps[j + 1])
                group.append(Sample(tokens=r.tokens[j, :n].numpy(), response_mask=np.arange(n) >= len(ids),
                                    log_probs=r.log_probs[j, :n].numpy(),
                                    step_positions=r.step_mask[j, :n].nonzero().flatten().numpy(),
                                    reward=grade.reward, correct=grade.reward > 0, group=index,
                                    step_scores=probs[lo:hi].numpy()))
            groups.append(group)
        for m in self.model:
            m.train()
        if data.save_rollouts:
            self._record(iteration, groups)
        return groups

    def _record(self, iteration: int, groups: list[list[Sample]]) -> None:
        """Append this replica's rollouts to ``--save-rollouts`` (one writer per replica)."""
        from megatron_rgm.data.store import RolloutStore, Trajectory, tokenizer_fingerprint

        if self._store is None:
            fp = tokenizer_fingerprint(self.tokenizer)
            if dist.get_rank() == 0:
                RolloutStore(self.args.data.save_rollouts, "a", tokenizer=fp,
                             attrs={"k": self.args.data.group_size, "source": "megatron_rgm.pretrain",
                                    "temperature": self.args.data.temperature})
            dist.barrier()
            self._store = RolloutStore(self.args.data.save_rollouts, "a", tokenizer=fp)
        if self.ps.get_tensor_model_parallel_rank() != 0 or not self.last_stage:
            return
        self._store.append(self.dp_rank, [
            Trajectory(tokens=s.tokens, response_mask=s.response_mask, log_probs=s.log_probs,
                       step_positions=s.step_positions, step_scores=s.step_scores, reward=s.reward,
                       correct=s.correct, prompt_id=s.group, group_id=iteration * 1_000_000 + s.group)
            for g in groups for s in g])

    # --- one iteration ---------------------------------------------------------------------------------

    def _forward_backward(self, batches: list[dict], length: int, forward_only: bool = False, model=None,
                          step_func=None):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        model = model or self.model
        return get_forward_backward_func()(
            forward_step_func=step_func or self._step_func(),
            data_iterator=[iter(batches) for _ in model] if len(model) > 1 else iter(batches),
            model=model, num_microbatches=len(batches), seq_length=length,
            micro_batch_size=self.run.micro_batch_size, forward_only=forward_only)

    def _step_func(self):
        from megatron_rgm.integration import forward_step

        return partial(forward_step, rgm_config=self.args.rgm, grpo=self.args.grpo, vocab_size=self.vocab,
                       policy_loss=not self.run.sprm_only)

    def _reference_log_probs(self, batches: list[dict], length: int) -> None:
        """Adds ``ref_log_probs`` to each batch (last stage; other stages only pass activations)."""
        from megatron_rgm.rl import vocab_parallel_log_probs

        grpo, vocab = self.args.grpo, self.vocab

        def step(data_iterator, model):
            batch = next(data_iterator)
            b, s = batch["tokens"].shape
            out = model(batch["tokens"], torch.arange(s).unsqueeze(0).expand(b, s), None)

            def loss(output):
                logp = vocab_parallel_log_probs(output / grpo.temperature, batch["labels"], vocab)
                batch["ref_log_probs"] = logp.detach()
                return torch.zeros((), device=output.device), {}
            return out, loss

        with torch.no_grad():
            self._forward_backward(batches, length, forward_only=True, model=self.ref, step_func=step)

    @torch.no_grad()
    def calibrate_head(self, samples: list[Sample]) -> dict[str, float]:
        """Shift the head's output bias so ``samples``' step logits (all DP ranks) straddle 0, and orient it.

        The SPR loss weighs masked positives by N/(P+N) and masked negatives by
        P/(P+N): with every logit on one side of 0 one count is 0 and so is the
        loss, and the head never starts learning. A fresh head on a small model
        is often in that state. With ``--sprm-orient-head`` the head's output
        is also negated when its geometric-mean scores rank the batch's correct
        trajectories below the incorrect ones of the same prompt: the mask keeps
        only steps the head already agrees with, so a reversed start is a fixed
        point of the SPR loss (docs/RESULTS.md). Returns the metrics to log
        (last stage; empty elsewhere or without steps).
        """
        length = self._length(samples)
        micro = self.run.micro_batch_size
        batches = [collate(samples[i:i + micro], length) for i in range(0, len(samples), micro)]
        collected, counts = [], []

        def step(data_iterator, model):
            batch = next(data_iterator)
            b, s = batch["tokens"].shape
            out = model(batch["tokens"], torch.arange(s).unsqueeze(0).expand(b, s), None, step_mask=batch["step_mask"])
            counts.append(batch["step_mask"].sum(1))

            def loss(output):
                collected.append(output[1].detach().float().cpu())
                return torch.zeros(()), {}
            return out, loss

        for m in self.model:
            m.eval()
        self._forward_backward(batches, length, forward_only=True, step_func=step)
        for m in self.model:
            m.train()
        if not self.last_stage:
            return {}
        local = (torch.cat(collected) if collected else torch.zeros(0), torch.cat(counts) if counts else
                 torch.zeros(0, dtype=torch.long), [s.correct for s in samples], [s.group for s in samples])
        gathered = [None] * self.dp
        dist.all_gather_object(gathered, local, group=self.ps.get_data_parallel_group())
        logits = torch.cat([g[0] for g in gathered])
        if logits.numel() == 0:
            return {}
        shift, margin = calibration_shift(logits)
        head = _unwrap(self.model[-1]).sprm_head
        head[-1].bias.sub_(shift)
        out = {"sprm calibration shift": shift, "sprm calibration margin": margin}
        if self.run.sprm_orient:
            steps = torch.cat([g[1] for g in gathered])
            cu = torch.cat([torch.zeros(1, dtype=torch.long), steps.cumsum(0)])
            out.update(orient_head(head, logits - shift, cu, [c for g in gathered for c in g[2]],
                                   [p for g in gathered for p in g[3]]))
        self.optimizer.reload_model_params()
        return out

    def _length(self, samples: list[Sample]) -> int:
        multiple = 8 * (self.args.parallel.tensor_model_parallel_size if self.args.parallel.sequence_parallel else 1)
        limit = self.args.max_position_embeddings
        length = torch.tensor([padded_length(samples, multiple, limit)], device=_device())
        dist.all_reduce(length, op=dist.ReduceOp.MAX)  # every stage must agree on activation shapes
        return int(length)

    def train_step(self, samples: list[Sample], advantages: torch.Tensor | None):
        """Optimizer steps over this replica's samples.

        Returns:
            (step metrics, loss reports of the micro-batches, times, response tokens trained on)
        """
        micro = self.run.micro_batch_size
        rl = self.run.stage == "rgm"
        length = self._length(samples)
        batches = [collate(samples[i:i + micro], length, rl=rl, spr=self.train_head,
                           advantages=None if advantages is None else advantages[i:i + micro])
                   for i in range(0, len(samples), micro)]
        times = {}
        if self.ref is not None:
            t = time.time()
            self._reference_log_probs(batches, length)
            times["reference"] = time.time() - t
        t = time.time()
        reports, norms = [], []
        for k in range(0, len(batches), self.num_micro):
            for m in self.model:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            reports += self._forward_backward(batches[k:k + self.num_micro], length)
            result = optimizer_step(self.optimizer, self.run.clip_grad, self.run.sprm_clip_grad)
            norms.append(result)
            self.nonfinite_in_a_row = 0 if result.ok else self.nonfinite_in_a_row + 1
            if self.nonfinite_in_a_row >= self.run.max_consecutive_nonfinite:
                raise TrainingError(
                    f"iteration {self.iteration_now}: {self.nonfinite_in_a_row} optimizer steps in a row had NaN/Inf "
                    f"gradients and were skipped (--max-consecutive-nonfinite {self.run.max_consecutive_nonfinite}); "
                    "the weights were not updated with them. Lower --lr / --sprm-lr, check the rollouts' log-probs, "
                    "or resume from the last checkpoint with --load")
        times["train"] = time.time() - t
        metrics = {"grad norm": _mean([n.grad_norm for n in norms]),
                   "sprm grad norm": _mean([n.head_grad_norm for n in norms]),
                   "skipped steps": float(sum(not n.ok for n in norms))}
        return metrics, reports, times, sum(int(b["loss_mask"].sum()) for b in batches)

    def iteration(self, it: int) -> dict:
        t0 = time.time()
        self.iteration_now = it
        lrs = set_learning_rates(self.optimizer, self.run, it)
        times = {}
        if self.run.stage == "sft":
            samples = [sft_sample(*x) for x in self.source.for_iteration(it, self.dp_rank, self.dp)]
            advantages, rollout_metrics = None, {}
        else:
            from megatron_rgm.rl import group_advantages

            groups = self.rollouts(it)
            times["generate"] = time.time() - t0
            samples = [s for g in groups for s in g]
            advantages = torch.cat([group_advantages(torch.tensor([s.reward for s in g]), len(g),
                                                     self.args.grpo.advantage_eps) for g in groups])
            rollout_metrics = self._rollout_metrics(samples)
            if it == 1 and self.run.sprm_calibrate:
                rollout_metrics.update(self.calibrate_head(samples))
        step_metrics, reports, step_times, tokens = self.train_step(samples, advantages)
        times.update(step_times)
        metrics = {**lrs, **rollout_metrics, **step_metrics, **self._loss_metrics(reports)}
        tokens = _dp_sum(self.ps, [float(tokens)])[0]
        times["total"] = time.time() - t0
        metrics["tokens/s"] = tokens / times["total"]
        return metrics, times

    # --- metrics ---------------------------------------------------------------------------------------

    def _rollout_metrics(self, samples: list[Sample]) -> dict:
        from megatron_rgm.ops import segment_aggregate

        scores = [torch.as_tensor(np.asarray(s.step_scores if s.step_scores is not None else [], np.float32))
                  for s in samples]
        cu = torch.tensor([0] + np.cumsum([len(x) for x in scores]).tolist(), dtype=torch.int32)
        agg = segment_aggregate(torch.cat(scores) if scores else torch.zeros(0), cu, self.args.rgm.sprm_aggregation,
                                from_probs=True)
        correct = torch.tensor([s.correct for s in samples], dtype=torch.bool)
        length = torch.tensor([float(s.response_mask.sum()) for s in samples])
        sums = _dp_sum(self.ps, [len(samples), float(correct.sum()), sum(s.reward for s in samples),
                                 float(length.sum()), float(agg[correct].sum()), float(agg[~correct].sum()),
                                 float(sum(len(x) for x in scores))])
        n, n_correct, reward, length, score_c, score_i, steps = sums
        return {"reward": reward / n, "accuracy": n_correct / n, "response length": length / n,
                "steps per trajectory": steps / n,
                "score correct": score_c / n_correct if n_correct else float("nan"),
                "score incorrect": score_i / (n - n_correct) if n - n_correct else float("nan")}

    def _loss_metrics(self, reports: list[dict]) -> dict:
        """Token-weighted means of the loss reports over micro-batches and data-parallel ranks (last stage)."""
        if not self.last_stage or not reports:
            return {}
        keys = sorted(reports[0])
        counts = ("spr positives", "spr negatives")  # already summed over data-parallel ranks
        values = []
        for k in keys:
            per_micro = [r[k][0] / r[k][1].clamp(min=1) for r in reports]
            if k in counts:
                values += [float(sum(per_micro)) / self.dp, 1.0]
            elif k == "steps":
                values += [float(sum(per_micro)), 1.0]
            else:
                values += [float(sum(r[k][0] for r in reports)), float(sum(r[k][1] for r in reports))]
        summed = _dp_sum(self.ps, values)
        out = {}
        for i, k in enumerate(keys):
            total, weight = summed[2 * i], summed[2 * i + 1]
            out[k] = total if k in counts + ("steps",) else total / max(weight, 1.0)
        if "steps" in out and "spr positives" in out:
            out["masked step fraction"] = (out["spr positives"] + out["spr negatives"]) / max(out["steps"], 1.0)
        return out

    # --- the run ---------------------------------------------------------------------------------------

    def save(self, it: int) -> None:
        """A checkpoint the converter, the rollout generator and Best-of-N can use as they are.

        Beside the weights: the flags that rebuild the model, the vocabulary
        sizes, the HF architecture (when one matches) and, once per save
        directory, the tokenizer under ``hf_assets/``.
        """
        import json
        from pathlib import Path

        from megatron_rgm.convert.mapping import hf_config_from_args
        from megatron_rgm.checkpoint import ASSETS, save_checkpoint

        hf_config = hf_config_from_args(self.args, self.vocab)
        extra = {"model_argv": self.args.namespace.model_argv, "stage": self.run.stage,
                 "padded_vocab_size": self.args.vocab_size, "vocab_size": self.vocab}
        if hf_config is not None:
            extra["hf_config"] = hf_config
        # Megatron-LM counts consumed samples (and its scheduler's steps) as iteration x global batch.
        save_checkpoint(self.run.save, it, self.model, optimizer=self.optimizer, extra=extra,
                        global_batch_size=self.samples_per_iteration)
        assets = Path(self.run.save) / ASSETS
        if dist.get_rank() == 0 and self.tokenizer is not None and not assets.exists():
            tmp = assets.with_name(ASSETS + ".tmp")
            self.tokenizer.save_pretrained(tmp)
            if hf_config is not None:
                (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
            tmp.rename(assets)
        dist.barrier()

    def train(self) -> list[dict]:
        history = []
        for it in range(self.start_iteration, self.run.train_iters + 1):
            metrics, times = self.iteration(it)
            if self.logging_rank:
                history.append({"iteration": it, **metrics})
                if it % self.run.log_interval == 0 or it == self.run.train_iters:
                    self.logger.log(it, metrics, times)
            if self.run.save and (it == self.run.train_iters or
                                  (self.run.save_interval and it % self.run.save_interval == 0)):
                self.save(it)
        self.logger.close()
        return history


def _unwrap(module):
    from megatron_rgm.model import unwrap

    return unwrap(module)


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _device() -> torch.device:
    """Where collectives' tensors live: the GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _dp_sum(ps, values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, group=ps.get_data_parallel_group())
    return t.tolist()


def train(args) -> list[dict]:
    """Run ``args.run.stage`` for ``--train-iters``; returns the per-iteration metrics on the logging rank."""
    return Trainer(args).train()
