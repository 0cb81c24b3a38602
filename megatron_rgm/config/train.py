"""What a run does with a model: the policy loss, the optimizer, the data and the run itself."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rgm.config.options import (DECAY_STYLES, STAGES, ConfigError, at_least, check_template, option,
                                         template_option, verifier_option)


@dataclass
class GRPOConfig:
    """GRPO coefficients (the reference's defaults)."""

    clip_low: float = option(0.2, flag="--grpo-clip-low")
    clip_high: float = option(0.2, flag="--grpo-clip-high")
    kl_coef: float = option(0.001, "0 skips the reference model", flag="--grpo-kl-coef")
    entropy_coef: float = option(0.001, flag="--grpo-entropy-coef")
    advantage_eps: float = option(1e-6, "added to a group's reward std", flag="--grpo-advantage-eps")
    # The sampling temperature: logits are divided by it, as the old log-probs were (set from the rollouts').
    temperature: float = option(1.0, cli=False)

    def __post_init__(self) -> None:
        for name in ("clip_low", "clip_high", "kl_coef", "entropy_coef", "advantage_eps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--grpo-{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")


@dataclass
class OptimConfig:
    """Adam, its schedule and gradient clipping; the SPRM head is a param group of its own."""

    lr: float = option(1e-6)
    sprm_lr: float | None = option(None, "head learning rate (default 10 x --lr)")
    weight_decay: float = option(0.01)
    sprm_weight_decay: float = option(0.01)
    clip_grad: float = option(1.0, "gradient-norm clip of the policy (0: off)")
    sprm_clip_grad: float = option(1.0, "the head's own gradient-norm clip (0: off)")
    lr_warmup_iters: int = option(0)
    lr_decay_style: str = option("constant", "after the warm-up (Megatron-LM's schedules)", choices=DECAY_STYLES)
    lr_decay_iters: int | None = option(None, "iterations from 0 to the end of the decay (default: --train-iters)")
    min_lr: float | None = option(None, "where the decay ends (default 0; the head's: x --sprm-lr / --lr)")
    use_distributed_optimizer: bool = option(False)

    def __post_init__(self) -> None:
        at_least(self, ("lr", "sprm_lr", "weight_decay", "sprm_weight_decay", "clip_grad", "sprm_clip_grad",
                         "lr_warmup_iters", "min_lr"), 0)
        at_least(self, ("lr_decay_iters",), 1)
        if self.lr_decay_style == "constant" and (self.min_lr is not None or self.lr_decay_iters is not None):
            raise ConfigError("--min-lr and --lr-decay-iters shape a decaying learning rate: add --lr-decay-style "
                              f"{'|'.join(DECAY_STYLES[1:])}, or drop them for the constant one")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr:g} is above --lr {self.lr:g}: the decay would end above its "
                              "start; lower --min-lr")

    @property
    def head_lr(self) -> float:
        return self.sprm_lr if self.sprm_lr is not None else 10 * self.lr

    def floors(self) -> tuple[float, float]:
        """The policy's and the head's ``min_lr``: their lr when constant (as checkpoints have recorded it)."""
        low = self.min_lr or 0.0
        return (self.lr, self.head_lr) if self.lr_decay_style == "constant" else (low, low * self.head_lr / (
            self.lr or 1.0))


@dataclass
class DataConfig:
    """Where prompts, rollouts and SFT texts come from, and how colocated rollouts are sampled."""

    tokenizer: str | None = option(None, "sentencepiece .model file or HF tokenizer directory")
    prompts: str | None = option(None, "prompts jsonl (id, problem, answer) for colocated rollouts")
    problem_key: str | None = option(None, "prompt field of --prompts (default: problem / prompt / question)")
    answer_key: str | None = option(None, "gold-answer field of --prompts (default: answer)")
    prompt_template: str = template_option()
    verifier: str = verifier_option()
    rollouts: str | None = option(None, "train from a rollout store (tools/generate_rollouts.py) with its old "
                                  "log-probs instead of sampling", metavar="STORE")
    prompts_per_iter: int = option(2, "prompts per iteration over all data-parallel ranks")
    sft_data: str | None = option(None, "jsonl of {text} or {prompt, response} for --stage sft")
    save_rollouts: str | None = option(None, "append every iteration's colocated rollouts (with their step "
                                       "scores) to this rollout store; group id = iteration x 1e6 + prompt "
                                       "index", metavar="STORE")
    group_size: int = option(8, "k: samples per prompt", flag="--grpo-group-size")
    temperature: float = option(0.6, flag="--rollout-temperature")
    top_p: float = option(0.95, flag="--rollout-top-p")
    max_response_length: int = option(256, "new tokens per rollout")
    rollout_max_batch: int | None = option(None, "sequences a rank decodes at once in colocated rollouts (KV-cache "
                                           "slots; a finished one's slot is refilled); default: every sample of "
                                           "the rank's prompts")
    rollout_backend: str = option("native", "who samples colocated rollouts: native (the policy's own forwards, "
                                  "step scores from them) or vllm (a vLLM engine per replica, the weights pushed "
                                  "before each iteration's rollouts; log-probs and step scores then from one "
                                  "forward of the policy)", choices=("native", "vllm"))
    vllm_python: str | None = option(None, "with --rollout-backend vllm: an interpreter that has vLLM (vLLM pins "
                                     "its own torch; default: this one)")
    vllm_kv_cache_gb: float = option(2.0, "with --rollout-backend vllm: the engine's KV cache in GiB")
    vllm_gpu_memory: float = option(0.3, "with --rollout-backend vllm on a GPU: the share of its memory the engine "
                                    "may take (weights and cache; the trainer keeps the rest)")

    def __post_init__(self) -> None:
        check_template(self.prompt_template)
        for flag, value in {"--prompts-per-iter": self.prompts_per_iter, "--grpo-group-size": self.group_size,
                            "--max-response-length": self.max_response_length,
                            "--rollout-max-batch": self.rollout_max_batch or 1}.items():
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.rollout_backend != "vllm" and self.vllm_python:
            raise ConfigError("--vllm-python configures --rollout-backend vllm: add it, or drop it")
        if self.vllm_kv_cache_gb <= 0 or not 0 < self.vllm_gpu_memory < 1:
            raise ConfigError(f"--vllm-kv-cache-gb must be > 0 and --vllm-gpu-memory in (0, 1), got "
                              f"{self.vllm_kv_cache_gb} and {self.vllm_gpu_memory}")
        if self.rollout_backend == "vllm" and self.temperature > 2:
            raise ConfigError(f"--rollout-temperature {self.temperature}: vLLM samples at 2 at most; lower it, or "
                              "use --rollout-backend native")
        if self.temperature < 0:
            raise ConfigError(f"--rollout-temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--rollout-top-p must be in (0, 1], got {self.top_p}")


@dataclass
class RunConfig:
    """What a run does, beside the model, its layout, its optimizer and its data."""

    stage: str = option("rgm", "rgm: joint GRPO + SPR training; sft: language-model warm start on --sft-data "
                        "texts; backbone-check: a synthetic next-token task that only exercises model, layout and "
                        "optimizer", choices=STAGES)
    micro_batch_size: int = option(1)
    global_batch_size: int | None = option(None)
    max_tokens_per_microbatch: int | None = option(
        None, "group each optimizer step's samples by length into micro-batches of at most this many tokens "
        "(rows x longest, or with --pack-sequences the samples' own lengths) instead of --micro-batch-size samples "
        "each; at least --max-position-embeddings")
    pack_sequences: bool = option(False, "with --max-tokens-per-microbatch, put the samples of a micro-batch back to "
                                         "back in one row, each attending to itself only, with its own positions")
    train_iters: int = option(3)
    save: str | None = option(None)
    load: str | None = option(None)
    save_interval: int | None = option(None)
    pretrained_checkpoint: str | None = option(None, "weights to start from when --load holds no checkpoint (e.g. "
                                               "the SFT stage's); also the frozen KL reference")
    offload_reference: bool = option(
        False, "keep the frozen KL reference model's weights in pinned host memory and copy them to the GPU only for "
        "its forward pass: its weights take no GPU memory during the policy's step, for one host-to-device copy per "
        "iteration")
    no_load_optim: bool = option(False, "resume weights and iteration, not the optimizer")
    use_checkpoint_args: bool = option(False, "take the model's geometry (and the head's) from the checkpoint "
                                       "--load resumes, else --pretrained-checkpoint, instead of the model flags")
    log_interval: int = option(1)
    max_consecutive_nonfinite: int = option(5, "stop after this many optimizer steps in a row skipped for a "
                                            "NaN/Inf gradient")
    tensorboard_dir: str | None = option(None)
    wandb_project: str | None = option(None, "log to Weights & Biases (needs wandb installed)")
    metrics_file: str | None = option(None, "append each iteration's metrics as a JSON line (last rank)")
    sprm_calibrate_head: bool = option(
        True, "on a run's first iteration, shift the head's output bias so the batch's step logits straddle 0 "
        "(0 midway across the widest gap near the median, so no logit sits on the SPR mask's boundary): the SPR "
        "loss needs steps on both sides of 0 (with every logit of one sign, P or N is 0 and so is the loss)")
    sprm_orient_head: bool = option(
        True, "with --sprm-calibrate-head, also negate the head's output when its scores rank the first batch's "
        "correct trajectories below the incorrect ones of the same prompt (within-prompt pairwise accuracy < 0.5): "
        "the SPR loss trains only steps the head already agrees with, so a head that starts reversed stays reversed")
    sprm_recalibrate_head: bool = option(
        False, "also calibrate (and orient) a head that was trained, loaded with --pretrained-checkpoint: by default "
        "only a fresh head is calibrated and a trained one is left exactly as it is")
    sprm_only: bool = option(False, "freeze the policy and train only the head on rollouts (adding an SPRM to a "
                                    "policy)")
    sprm_mask_warmup_iters: int = option(
        0, "train the head with plain BCE (every step labelled with its trajectory's outcome, no mask) on iterations "
        "1..N, and with the SPR loss from N+1: the SPR mask trains only steps the head already agrees with, so it "
        "starts from a head the data has oriented (docs/RESULTS.md, the knobbed task)")

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "train_iters", "log_interval", "max_consecutive_nonfinite",
                     "max_tokens_per_microbatch"):
            value = getattr(self, name)
            if value is None:
                continue
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.sprm_mask_warmup_iters < 0:
            raise ConfigError(f"--sprm-mask-warmup-iters must be >= 0, got {self.sprm_mask_warmup_iters}")
        if self.sprm_mask_warmup_iters and self.stage != "rgm":
            raise ConfigError("--sprm-mask-warmup-iters schedules the head's loss: use it with --stage rgm")
        if self.stage not in STAGES:
            raise ConfigError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
