"""Run Megatron-LM's own training loop (``megatron.training``) on a machine without CUDA.

``megatron.training`` (``pretrain()``, its argument parser, ``initialize_megatron``,
``checkpointing``) ships in megatron-core's wheel from 0.17 on (Python 3.12);
the 0.16.1 wheel on Python 3.11 has none. Megatron-LM assumes a GPU in a few
places beyond what megatron-core does: :func:`activate` first applies
:func:`megatron_rgm.cpu.activate` (megatron-core's CUDA calls mapped onto the
CPU), then the patches below, each found necessary by removing it (0.19.2,
gloo, 2 ranks, TP=2):

``CUDA_DEVICE_MAX_CONNECTIONS=1`` (environment, set only when unset)
    ``validate_args`` asserts it whenever TP or CP > 1 on a pre-Blackwell GPU;
    it means nothing on the CPU.
``megatron.training.arguments.get_device_arch_version`` -> 0
    ``validate_args`` asks ``torch.cuda.get_device_properties("cuda:0")``,
    which raises without a GPU. 0 reads as "older than Blackwell": no
    Blackwell-only stream priorities are switched on.
``megatron.training.training.initialize_megatron`` (and ``megatron.training.initialize_megatron``)
    ``pretrain()`` calls it without ``allow_no_cuda``, so it asserts
    "Megatron requires CUDA." The wrapper passes ``allow_no_cuda=True`` and,
    for the length of the call, makes ``torch.cuda.device_count()`` answer 1:
    ``_initialize_distributed`` skips ``initialize_model_parallel`` and
    ``_set_random_seed`` skips ``model_parallel_cuda_manual_seed`` when it
    answers 0, leaving no TP/PP groups and no RNG tracker. Outside that call
    ``device_count()`` is left alone (0), so nothing else believes a GPU exists.
``megatron.training.training.load_checkpoint``
    with the distributed optimizer on torch's Adam (no apex or Transformer
    Engine: the CPU), resuming fails: an assertion on the still empty optimizer
    state, then a KeyError on Adam's per-parameter ``step``, and the fp32 copy
    into a leaf view. The wrapper gives the optimizer its state first
    (:func:`megatron_rgm.compat.mcore.materialise_optimizer_state`, which
    also applies :func:`megatron_rgm.compat.mcore.distributed_optimizer_with_torch_adam`),
    and clears it again where nothing was loaded (``--finetune``, ``--no-load-optim``).
``DistributedOptimizer.sharded_param_state_fully_reshardable``
    :func:`megatron_rgm.compat.mcore.fully_reshardable_bucket_offsets`: with
    ``--dist-ckpt-optim-fully-reshardable`` and more than one gradient bucket
    its saves held other parameters' states.
``megatron.core.datasets.utils.compile_helpers`` -> no-op (only when the prebuilt helper imports)
    ``initialize_megatron`` runs ``make`` in the datasets folder on rank 0;
    the wheel ships ``helpers_cpp`` prebuilt but no Makefile, so ``make``
    fails and rank 0 exits. Where the prebuilt module is missing, nothing is
    patched and Megatron-LM's own error stays.

Everything is listed by :func:`applied_patches` with its reason. Import of
``megatron.training`` happens only inside this module's functions.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Any, Callable

import torch

from megatron_rgm import cpu
from megatron_rgm.compat.mcore import (forget_unloaded_state, fully_reshardable_bucket_offsets,
                                       materialise_optimizer_state)
from megatron_rgm.config import ConfigError
from megatron_rgm.cpu import Patch

__all__ = ["activate", "applied_patches", "available", "require", "Patch"]

_APPLIED: list[Patch] = []


def available() -> bool:
    """Whether Megatron-LM's ``megatron.training`` is importable here (megatron-core 0.17+ wheels ship it)."""
    try:
        return importlib.util.find_spec("megatron.training") is not None
    except (ImportError, ValueError):
        return False


def require() -> None:
    """Raise a :class:`ConfigError` naming the fix when ``megatron.training`` is missing."""
    if not available():
        import megatron.core

        raise ConfigError(
            f"megatron.training (Megatron-LM's pretrain loop) is not importable with megatron-core "
            f"{megatron.core.__version__}: it ships in the megatron-core wheel from 0.17 on (Python 3.12); "
            "install megatron-core>=0.19 on Python 3.12 or put a Megatron-LM checkout on PYTHONPATH")


def applied_patches() -> list[Patch]:
    """The Megatron-LM patches :func:`activate` applied in this process (megatron-core's are in
    :func:`megatron_rgm.cpu.applied_patches`)."""
    return list(_APPLIED)


@contextlib.contextmanager
def _one_device():
    original = torch.cuda.device_count
    torch.cuda.device_count = lambda: 1
    try:
        yield
    finally:
        torch.cuda.device_count = original


def _initialize_without_cuda(original: Callable) -> Callable:
    @functools.wraps(original)
    def initialize_megatron(*args: Any, **kwargs: Any):
        kwargs["allow_no_cuda"] = True
        with _one_device():
            finish = original(*args, **kwargs)
        if finish is None:
            return None

        # --lazy-mpu-init: the groups and seeds are set up when the caller runs this.
        @functools.wraps(finish)
        def finish_on_cpu(*a, **k):
            with _one_device():
                return finish(*a, **k)

        return finish_on_cpu

    initialize_megatron.__rgm_cpu_patch__ = True
    return initialize_megatron


def _load_with_optimizer_state(original: Callable) -> Callable:
    @functools.wraps(original)
    def load_checkpoint(ddp_model, optimizer, *args: Any, **kwargs: Any):
        made = materialise_optimizer_state(optimizer) if optimizer is not None else []
        try:
            return original(ddp_model, optimizer, *args, **kwargs)
        finally:  # --finetune, --no-load-optim, nothing to resume: the optimizer starts fresh, not at step 1
            forget_unloaded_state(made)

    return load_checkpoint


def _set(owner: Any, name: str, value: Any, target: str, reason: str) -> None:
    setattr(owner, name, value)
    _APPLIED.append(Patch(target, reason))


def activate(force: bool = False) -> list[Patch]:
    """Make ``megatron.training.pretrain()`` run on the CPU (gloo). Idempotent.

    Does nothing when CUDA is available unless ``force``. Call it before
    ``parse_and_validate_args`` (the parser queries the device).

    Args:
        force: apply the patches even if ``torch.cuda.is_available()``.

    Returns:
        megatron-core's CPU patches followed by the Megatron-LM ones (empty when CUDA is available).
    """
    if _APPLIED:
        return cpu.applied_patches() + applied_patches()
    if torch.cuda.is_available() and not force:
        return []
    require()
    cpu.activate(force=force)

    import megatron.training  # noqa: F401  (Megatron-LM, not megatron-core)
    from megatron.core.datasets import utils as dataset_utils
    from megatron.training import arguments, training
    from megatron.training import utils as training_utils

    if "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ:
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
        _APPLIED.append(Patch("env CUDA_DEVICE_MAX_CONNECTIONS=1",
                              "validate_args asserts it for TP/CP > 1 before Blackwell; meaningless on the CPU"))
    arch = lambda: 0  # noqa: E731
    _set(arguments, "get_device_arch_version", arch, "megatron.training.arguments.get_device_arch_version",
         "validate_args reads the GPU's compute capability (raises without one); 0 = pre-Blackwell")
    _set(training_utils, "get_device_arch_version", arch, "megatron.training.utils.get_device_arch_version",
         "same, for callers that look it up in megatron.training.utils")
    wrapped = _initialize_without_cuda(training.initialize_megatron)
    _set(training, "initialize_megatron", wrapped, "megatron.training.training.initialize_megatron",
         "pretrain() calls it without allow_no_cuda (asserts CUDA); the wrapper passes allow_no_cuda=True and "
         "answers torch.cuda.device_count() == 1 during the call, else model-parallel groups and the "
         "tensor-parallel RNG tracker are skipped")
    _set(megatron.training, "initialize_megatron", wrapped, "megatron.training.initialize_megatron",
         "same wrapper, for scripts that call it themselves")
    _set(training, "load_checkpoint", _load_with_optimizer_state(training.load_checkpoint),
         "megatron.training.training.load_checkpoint",
         "resuming the distributed optimizer on torch's Adam fails before its first step (no state to shape the "
         "load) and on Adam's per-parameter step; the wrapper materialises the state and fixes the step first")
    fully_reshardable_bucket_offsets()
    _APPLIED.append(Patch("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer."
                          "sharded_param_state_fully_reshardable",
                          "with several gradient buckets (a tied embedding at PP > 1) it saves each parameter after the "
                          "first bucket with its neighbours' state: --dist-ckpt-optim-fully-reshardable checkpoints "
                          "would resume wrong"))
    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None:
        _set(dataset_utils, "compile_helpers", lambda: None, "megatron.core.datasets.utils.compile_helpers",
             "initialize_megatron runs `make` for the dataset helper; the wheel ships it prebuilt "
             "(helpers_cpp) but no Makefile, so make fails and rank 0 exits")
    return cpu.applied_patches() + applied_patches()
