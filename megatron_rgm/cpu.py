"""Run megatron-core on a machine without CUDA.

megatron-core assumes a GPU: it asks ``torch.cuda`` for the current device and
its RNG state, creates tensors with ``device="cuda"`` literals, compares
``Tensor.type()`` with ``torch.cuda.*Tensor`` names and calls ``.cuda()``.
:func:`activate` maps each of those onto the CPU so that the same model,
pipeline schedules, DDP, optimizer and ``dist_checkpointing`` code paths run
under gloo. It does nothing when CUDA is available, and every patch it applies
is listed by :func:`applied_patches` with the reason it exists.

On the CPU the "CUDA RNG" megatron forks for tensor-parallel regions *is* the
CPU generator: dropout on a CPU tensor draws from it, so saving, seeding and
restoring it gives megatron's tracker the semantics it has on a GPU.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["activate", "applied_patches", "is_active", "Patch"]


@dataclass(frozen=True)
class Patch:
    """One attribute replaced by :func:`activate`."""

    target: str
    reason: str


_APPLIED: list[Patch] = []

# Factory functions megatron calls with ``device="cuda"`` literals or with
# ``device=torch.cuda.current_device()``; ``pin_memory`` needs a GPU as well.
_FACTORIES = (
    "tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor",
)


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means a CUDA ordinal to torch.
    return isinstance(device, int) and not isinstance(device, bool)


def _on_cpu(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    wrapper.__rgm_cpu_patch__ = True
    return wrapper


def _tensor_to(original: Callable) -> Callable:
    @functools.wraps(original)
    def to(self, *args, **kwargs):
        if args and not isinstance(args[0], (torch.dtype, torch.Tensor)) and _is_cuda(args[0]):
            args = ("cpu",) + args[1:]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        return original(self, *args, **kwargs)

    return to


def _tensor_cuda(self, *args, **kwargs):
    return self


_CPU_TO_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}
_CUDA_TO_CPU_TYPE = {v: k for k, v in _CPU_TO_CUDA_TYPE.items()}


def _tensor_type(original: Callable) -> Callable:
    @functools.wraps(original)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = original(self)
            return _CPU_TO_CUDA_TYPE.get(name, name)
        if isinstance(dtype, str):
            dtype = _CUDA_TO_CPU_TYPE.get(dtype, dtype)
        return original(self, dtype, non_blocking, **kwargs)

    return type_


def _cpu_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def _seed_cpu(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _noop(name: str) -> Callable:
    # A distinct function per target: torch._dynamo refuses one object under two torch names.
    def noop(*args, **kwargs) -> None:
        return None

    noop.__name__ = noop.__qualname__ = name
    return noop


def _host_numbers(original: Callable) -> Callable:
    def move(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)
    return move


class _NullStream:
    """Stands in for ``torch.cuda.Stream``/``Event``: CPU work is synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _DropForkWarning(logging.Filter):
    """megatron warns when the CPU RNG moves inside a CUDA-RNG fork; on the CPU
    the two generators are one, so that move is the fork working as intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _set(owner: Any, name: str, value: Any, target: str, reason: str) -> None:
    setattr(owner, name, value)
    _APPLIED.append(Patch(target, reason))


def is_active() -> bool:
    """Whether :func:`activate` has patched this process."""
    return bool(_APPLIED)


def applied_patches() -> list[Patch]:
    """Every patch :func:`activate` applied in this process, in order."""
    return list(_APPLIED)


def activate(force: bool = False) -> list[Patch]:
    """Map megatron-core's CUDA calls onto the CPU.

    Idempotent. Does nothing when CUDA is available unless ``force`` (tests use
    ``force`` only in a subprocess of their own).

    Args:
        force: apply the patches even if ``torch.cuda.is_available()``.

    Returns:
        The patches applied (empty when CUDA is available and not forced).
    """
    if _APPLIED:
        return applied_patches()
    if torch.cuda.is_available() and not force:
        return []
    # Import megatron (and the torch._dynamo it pulls in through torch.compile
    # decorators) before patching, so both see the functions they were written for.
    import megatron.core  # noqa: F401

    cuda = torch.cuda
    _set(cuda, "current_device", lambda: "cpu", "torch.cuda.current_device",
         "megatron passes it as device= everywhere; answer 'cpu'")
    _set(cuda, "synchronize", _noop("synchronize"), "torch.cuda.synchronize", "CPU work is synchronous")
    _set(cuda, "set_device", _noop("set_device"), "torch.cuda.set_device", "there is one CPU device")
    for name in ("get_rng_state",):
        _set(cuda, name, _cpu_rng_state, f"torch.cuda.{name}",
             "megatron's RNG tracker saves the CUDA generator; on the CPU dropout draws from the CPU one")
        _set(cuda.random, name, _cpu_rng_state, f"torch.cuda.random.{name}", "same as torch.cuda.get_rng_state")
    _set(cuda, "set_rng_state", _set_cpu_rng_state, "torch.cuda.set_rng_state",
         "restore the CPU generator instead of the CUDA one")
    _set(cuda, "manual_seed", _seed_cpu, "torch.cuda.manual_seed",
         "seed the CPU generator that CPU dropout draws from (manual_seed_all stays lazy)")
    _set(cuda, "Stream", _NullStream, "torch.cuda.Stream", "DDP and p2p create side streams")
    _set(cuda, "Event", _NullStream, "torch.cuda.Event", "events on side streams")
    _set(cuda, "current_stream", lambda *a, **k: _NullStream(), "torch.cuda.current_stream",
         "stream waits become no-ops")
    _set(cuda, "stream", lambda *a, **k: _NullStream(), "torch.cuda.stream", "stream context becomes a no-op")

    for name in _FACTORIES:
        _set(torch, name, _on_cpu(getattr(torch, name)), f"torch.{name}",
             "megatron creates tensors with device='cuda' literals and pin_memory=True")
    _set(torch.Tensor, "cuda", _tensor_cuda, "torch.Tensor.cuda", "a CPU tensor stays where it is")
    _set(torch.Tensor, "to", _tensor_to(torch.Tensor.to), "torch.Tensor.to", "device 'cuda' means 'cpu'")
    _set(torch.Tensor, "type", _tensor_type(torch.Tensor.type), "torch.Tensor.type",
         "the optimizer and grad clipping compare type() with torch.cuda.*Tensor names")

    from megatron.core.tensor_parallel import random as mrandom

    _set(mrandom, "_get_cuda_rng_state", _cpu_rng_state,
         "megatron.core.tensor_parallel.random._get_cuda_rng_state", "read the CPU generator")
    _set(mrandom, "_set_cuda_rng_state", _set_cpu_rng_state,
         "megatron.core.tensor_parallel.random._set_cuda_rng_state", "restore the CPU generator")
    logging.getLogger(mrandom.__name__).addFilter(_DropForkWarning())
    _APPLIED.append(Patch("logging filter on megatron.core.tensor_parallel.random",
                          "drop the CPU-RNG-changed-in-fork warning: the generators are one"))

    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    host = _host_numbers(moe_utils.maybe_move_tensor_to_cpu)
    _set(moe_utils, "maybe_move_tensor_to_cpu", host,
         "megatron.core.transformer.moe.moe_utils.maybe_move_tensor_to_cpu", "the expert-parallel all-to-all's split sizes become host numbers (numpy) only from CUDA tensors; a CPU "
         "tensor stays a tensor, which all_to_all_single refuses")
    _set(token_dispatcher, "maybe_move_tensor_to_cpu", host,
         "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu", "imported there by name")

    # megatron's fused kernels need a GPU (torch.compile on the CPU would also
    # spend minutes compiling); the model config turns the fusions off and this
    # keeps any decorated helper eager.
    from megatron.core import jit

    jit.disable_jit_fuser()
    _APPLIED.append(Patch("megatron.core.jit.jit_fuser", "eager instead of torch.compile on the CPU"))
    return applied_patches()
