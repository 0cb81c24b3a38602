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
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

from megatron_rgm import distributed
from megatron_rgm.checkpoint import latest_iteration, load_checkpoint
from megatron_rgm.config import ConfigError
from megatron_rgm.data.sources import (
    PromptSource,
    SFTSource,
    StoreSource,
    padded_length,
    sft_sample,
    to_device,
)
from megatron_rgm.data.store import Trajectory, tokenizer_fingerprint
from megatron_rgm.head import HEAD_FIELDS
from megatron_rgm.model import build_model, from_first_cp_rank, unwrap
from megatron_rgm.model.load import describe_checkpoint
from megatron_rgm.rl import group_advantages
from megatron_rgm.rollout.colocated import RolloutRecorder, sample_groups
from megatron_rgm.steps import StepSegmenter
from megatron_rgm.tokenizer import load_tokenizer, vocab_size_of
from megatron_rgm.training.batching import MicroBatcher, length_multiple
from megatron_rgm.training.calibration import calibrate_head
from megatron_rgm.training.logging import MetricsLogger
from megatron_rgm.training.metrics import (
    device,
    dp_sum,
    loss_metrics,
    mean,
    moe_router_losses,
    rollout_metrics,
)
from megatron_rgm.training.optimizer import (
    build_optimizer,
    ddp_config,
    optimizer_step,
    set_learning_rates,
)
from megatron_rgm.training.saving import save_run
from megatron_rgm.training.vllm_rollouts import VLLMRollouts
from megatron_rgm.training.step import (
    add_reference_log_probs,
    forward_backward,
    head_step_logits,
    offload_weights,
    onload_weights,
    reference_model,
    training_step_func,
)


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite steps in a row); the message says at which iteration and what to try."""


class Trainer:
    """Model, optimizer, data and reference model of one run, on this rank."""

    def __init__(self, args):
        self.args, self.run = args, args.run
        self.nonfinite_in_a_row = 0
        self.iteration_now = 0
        self.info = distributed.initialize(args.parallel)
        self.ps = ps
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.last_stage = ps.is_pipeline_last_stage()
        self.logging_rank = dist.get_rank() == dist.get_world_size() - 1  # Megatron-LM logs on the last rank
        self._check_batch_sizes()
        self.batcher = MicroBatcher(args)
        # The loss is normalised over each optimizer step's tokens, not per micro-batch (training/batching.py).
        args.transformer.calculate_per_token_loss = True
        if self.run.max_tokens_per_microbatch:
            args.transformer.variable_seq_lengths = True  # micro-batches of their own lengths through the stages
        if self.run.pack_sequences:
            # megatron's fused causal softmax ignores a given mask: packed rows need the masked path.
            args.transformer.masked_softmax_fusion = False

        chunks = build_model(args)
        if self.run.sprm_only:
            for chunk in chunks:
                for name, p in chunk.named_parameters():
                    p.requires_grad_(name.startswith("sprm_head."))
        self.model = [DistributedDataParallel(args.transformer, ddp_config(args), m) for m in chunks]
        if args.parallel.overlap_grad_reduce:  # as Megatron-LM: the reduction waits for the last micro-batch
            no_sync = [m.no_sync for m in self.model]
            args.transformer.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self.optimizer = build_optimizer(self.model, args.optim, args.transformer)
        args.transformer.finalize_model_grads_func = finalize_model_grads
        args.transformer.grad_scale_func = self.optimizer.scale_loss

        self.tokenizer = load_tokenizer(args.data.tokenizer) if args.data.tokenizer else None
        self.vocab = vocab_size_of(self.tokenizer) if self.tokenizer is not None else args.model.vocab_size
        if self.vocab > args.vocab_size:
            raise ConfigError(f"the tokenizer has {self.vocab} tokens but --vocab-size is {args.model.vocab_size}:"
                              f" set --vocab-size {self.vocab} or more")
        self.source = self._source()
        self.recorder = (RolloutRecorder(args.data.save_rollouts, self.tokenizer, args.data)
                         if args.data.save_rollouts else None)
        # The reference is built before loading, so that a resumed run's RNG continues from the checkpoint's.
        needs_reference = self.run.stage == "rgm" and not self.run.sprm_only and args.grpo.kl_coef > 0
        self.ref = reference_model(args, self.model) if needs_reference else None
        self.start_iteration = self._load()
        # The engine samples colocated rollouts (arguments.check_stage refuses it elsewhere).
        self.vllm = VLLMRollouts(args, self.model, self.tokenizer, self.vocab) \
            if args.data.rollout_backend == "vllm" else None
        if self.ref is not None and self.start_iteration > 1 and not self.run.pretrained_checkpoint:
            raise ConfigError("the KL reference is the starting policy, but this run resumes without "
                              "--pretrained-checkpoint: pass the checkpoint it started from, or --grpo-kl-coef 0")
        self.logger = MetricsLogger(self.logging_rank, self.run.train_iters, self.run.tensorboard_dir,
                                    self.run.wandb_project, self.run.metrics_file, run_config=args.config_dict())

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

    def _source(self):
        data, seed = self.args.data, self.args.parallel.seed
        if self.run.stage == "sft":
            return SFTSource(data.sft_data, self.tokenizer, self.global_batch, seed)
        if self.run.stage != "rgm":
            return None
        if data.rollouts:
            fp = tokenizer_fingerprint(self.tokenizer) if self.tokenizer is not None else None
            source = StoreSource(data.rollouts, data.prompts_per_iter, seed, fp)
            sizes = {len(g) for g in source.groups}
            if sizes != {data.group_size}:
                raise ConfigError(f"rollout store {data.rollouts} has groups of {sorted(sizes)} trajectories but "
                                  f"--grpo-group-size is {data.group_size}: pass the store's k")
            return source
        self.segmenter = StepSegmenter.from_config(self.tokenizer, self.args.rgm)
        return PromptSource(data.prompts, data.problem_key, data.answer_key, data.prompts_per_iter, seed)

    def _load(self) -> int:
        """Load ``--load`` (a resume) or ``--pretrained-checkpoint``; returns the first iteration to run."""
        load, pretrained = self.run.load, self.run.pretrained_checkpoint
        self.head_trained, self.head_source = False, None  # a fresh head, initialised by build_model
        if load and (latest_iteration(load) is not None or (Path(load) / "metadata.json").exists()):
            opt = None if self.run.no_load_optim else self.optimizer
            start = load_checkpoint(load, self.model, optimizer=opt).iteration + 1
            self._loaded_head(load)
            return start
        if pretrained:
            load_checkpoint(pretrained, self.model)
            self._loaded_head(pretrained)
        return 1

    def _loaded_head(self, path: str) -> None:
        """Whether the head just loaded from ``path`` was trained; a trained head must be applied as trained."""
        checkpoint = describe_checkpoint(path)
        if not (checkpoint.has_head and checkpoint.head_trained):
            return
        self.head_trained, self.head_source = True, path
        mine, recorded = self.args.rgm, checkpoint.sprm
        differ = [f"--{name.replace('_', '-')} {getattr(recorded, name)!r} (this run: {getattr(mine, name)!r})"
                  for name in HEAD_FIELDS if getattr(recorded, name) != getattr(mine, name)]
        if differ:
            raise ConfigError(f"the SPRM head in {path} was trained with {'; '.join(differ)}: a head scores the "
                              "positions it was trained on. Pass the same flags, or --use-checkpoint-args")

    def head_plan(self) -> str:
        """What iteration 1 does to the head, in words (logged when the run starts)."""
        if self.run.stage != "rgm" or self.start_iteration > 1:
            return ""
        if self.head_trained:
            if self.calibrates_head():
                return f"SPRM head: trained, from {self.head_source}; recalibrated on iteration 1 (--sprm-recalibrate-head)"
            return (f"SPRM head: trained, from {self.head_source}; left exactly as it is "
                    "(--sprm-recalibrate-head calibrates it)")
        source = f"from {self.run.pretrained_checkpoint}, never trained" if self.run.pretrained_checkpoint else "new"
        if self.calibrates_head():
            return f"SPRM head: fresh ({source}); calibrated on iteration 1"
        return f"SPRM head: fresh ({source}); not calibrated (--no-sprm-calibrate-head)"

    def calibrates_head(self) -> bool:
        """Whether iteration 1 calibrates the head: a fresh one, or a trained one when asked."""
        return self.run.sprm_calibrate_head and (not self.head_trained or self.run.sprm_recalibrate_head)

    # --- one iteration ---------------------------------------------------------------------------------

    def rollouts(self, iteration: int) -> tuple[list[list[Trajectory]], dict[str, float]]:
        """This replica's groups of k samples for ``iteration`` (read from the store, or sampled now), and what the
        rollout backend adds to the iteration's metrics."""
        if isinstance(self.source, StoreSource):
            return self.source.for_iteration(iteration, self.dp_rank, self.dp), {}
        prompts = self.source.for_iteration(iteration, self.dp_rank, self.dp)
        if self.vllm is not None:
            groups = self.vllm.sample(prompts, self.args.parallel.seed, iteration, self.segmenter)
            samples = [s for g in groups for s in g]
            extra = self.vllm.score(groups, self._length(samples), self.run.micro_batch_size)
        else:
            extra = {}  # (context-parallel ranks take CP rank 0's rollouts: their shares must be of the same ones)
            groups = from_first_cp_rank(lambda: sample_groups(unwrap(self.model[0]), self.vocab, self.tokenizer,
                                        self.segmenter, self.args.data, prompts, self.args.parallel.seed, iteration))
        for m in self.model:
            m.train()
        if self.recorder is not None:
            writer = self.last_stage and self.ps.get_tensor_model_parallel_rank() == self.ps.get_context_parallel_rank() == 0
            self.recorder.append(iteration, groups, self.dp_rank, writer)
        return groups, extra

    @torch.no_grad()
    def calibrate_head(self, samples: list[Trajectory]) -> dict[str, float]:
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
        batches = [to_device(b, device()) for b in self.batcher.padded(samples, None, length)]
        logits, counts = head_step_logits(self.model, batches, length, self.run.micro_batch_size)
        if not self.last_stage:
            return {}
        gathered = [None] * self.dp
        local = (logits, counts, [s.correct for s in samples], [s.group_id for s in samples])
        dist.all_gather_object(gathered, local, group=self.ps.get_data_parallel_group())
        logits = torch.cat([g[0] for g in gathered])
        if logits.numel() == 0:
            return {}
        out = calibrate_head(unwrap(self.model[-1]).sprm_head, logits, torch.cat([g[1] for g in gathered]),
                             [c for g in gathered for c in g[2]], [p for g in gathered for p in g[3]],
                             self.run.sprm_orient_head)
        self.optimizer.reload_model_params()
        return out

    def _length(self, samples: list[Trajectory]) -> int:
        multiple = length_multiple(self.args)
        length = torch.tensor([padded_length(samples, multiple, self.args.max_position_embeddings)], device=device())
        dist.all_reduce(length, op=dist.ReduceOp.MAX)  # every stage must agree on activation shapes
        return int(length)

    def train_step(self, samples: list[Trajectory], advantages: torch.Tensor | None, spr: bool = True):
        """Optimizer steps over this replica's samples (``spr=False``: without the SPR loss, GRPO alone).

        Returns:
            (step metrics, loss reports of the micro-batches, times, response tokens trained on)
        """
        micro, optim = self.run.micro_batch_size, self.args.optim
        length = 0 if self.run.max_tokens_per_microbatch else self._length(samples)
        per_step = self.num_micro * micro  # this replica's samples per optimizer step
        steps = [self.batcher(samples[i:i + per_step], None if advantages is None else advantages[i:i + per_step],
                              length, rl=self.run.stage == "rgm", spr=spr)
                 for i in range(0, len(samples), per_step)]
        times = {}
        if self.ref is not None:
            t = time.time()
            offloaded = self.run.offload_reference
            if offloaded:
                onload_weights(self.ref)
            for batches in steps:
                add_reference_log_probs(self.ref, batches, self._seq_length(batches, length), micro,
                                        self.args.grpo, self.vocab)
            if offloaded:
                offload_weights(self.ref)
            times["reference"] = time.time() - t
        t = time.time()
        reports, norms = [], []
        step_func = training_step_func(self.args, self.vocab, self.iteration_now)
        for batches in steps:
            for m in self.model:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            reports += forward_backward(self.model, batches, self._seq_length(batches, length), micro, step_func)
            result = optimizer_step(self.optimizer, optim.clip_grad, optim.sprm_clip_grad)
            norms.append(result)
            self.nonfinite_in_a_row = 0 if result.ok else self.nonfinite_in_a_row + 1
            if self.nonfinite_in_a_row >= self.run.max_consecutive_nonfinite:
                raise TrainingError(
                    f"iteration {self.iteration_now}: {self.nonfinite_in_a_row} optimizer steps in a row had NaN/Inf "
                    f"gradients and were skipped (--max-consecutive-nonfinite {self.run.max_consecutive_nonfinite}); "
                    "the weights were not updated with them. Lower --lr / --sprm-lr, check the rollouts' log-probs, "
                    "or resume from the last checkpoint with --load")
        times["train"] = time.time() - t
        metrics = {"grad norm": mean([n.grad_norm for n in norms]),
                   "sprm grad norm": mean([n.head_grad_norm for n in norms]),
                   "skipped steps": float(sum(not n.ok for n in norms))}
        if self.args.transformer.num_moe_experts:
            metrics.update(moe_router_losses(self.ps, sum(map(len, steps)), self.args.transformer.num_layers))
        return metrics, reports, times, sum(int(b["loss_mask"].sum()) for batches in steps for b in batches)

    @staticmethod
    def _seq_length(batches: list[dict], length: int) -> int:
        """The schedule's sequence length: ``length``, or under a token budget the longest micro-batch's (the
        stages then exchange each micro-batch's shape: ``variable_seq_lengths``)."""
        return length or max(b["tokens"].shape[1] for b in batches)

    def iteration(self, it: int) -> tuple[dict[str, float], dict[str, float]]:
        """One iteration: rollouts, advantages, (calibration), optimizer steps. Returns (metrics, times)."""
        t0 = time.time()
        self.iteration_now = it
        lrs = set_learning_rates(self.optimizer, self.args.optim, it, self.run.train_iters)
        times = {}
        if self.run.stage == "sft":
            samples = [sft_sample(*x) for x in self.source.for_iteration(it, self.dp_rank, self.dp)]
            advantages, metrics = None, {}
        else:
            groups, extra = self.rollouts(it)
            times["generate"] = time.time() - t0
            samples = [s for g in groups for s in g]
            advantages = torch.cat([group_advantages(torch.tensor([s.reward for s in g]), len(g),
                                                     self.args.grpo.advantage_eps) for g in groups])
            metrics = {**rollout_metrics(self.ps, samples, self.args.rgm.sprm_aggregation), **extra}
            if it == 1 and self.calibrates_head():
                metrics.update(self.calibrate_head(samples))
            self.head_trained = True  # it is trained from this iteration's step on
        step_metrics, reports, step_times, tokens = self.train_step(samples, advantages)
        times.update(step_times)
        metrics = {**lrs, **metrics, **step_metrics, **(loss_metrics(self.ps, reports) if self.last_stage else {})}
        tokens = dp_sum(self.ps, [float(tokens)])[0]
        times["total"] = time.time() - t0
        metrics["tokens/s"] = tokens / times["total"]
        return metrics, times

    # --- the run ---------------------------------------------------------------------------------------

    def save(self, it: int) -> None:
        save_run(self.args, it, self.model, self.optimizer, self.tokenizer, self.vocab, self.samples_per_iteration,
                 self.head_trained)

    def train(self) -> list[dict]:
        try:
            return self._train()
        finally:
            if self.vllm is not None:  # the engine's process goes with the run, however it ends
                self.vllm.close()

    def _train(self) -> list[dict]:
        history = []
        plan = self.head_plan()
        if plan and self.logging_rank:
            print(plan, flush=True)
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


def train(args) -> list[dict]:
    """Run ``args.run.stage`` for ``--train-iters``; returns the per-iteration metrics on the logging rank."""
    return Trainer(args).train()
