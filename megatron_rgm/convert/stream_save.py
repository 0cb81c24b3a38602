"""Save a converted model as a ``torch_dist`` checkpoint, producing each tensor only when it is written.

The usual path (fill every parameter, then ``dist_checkpointing.save``) holds a
rank's whole share of the weights while it writes, and megatron's
``FileSystemWriterAsync`` resolves every tensor before a forked writer process
(thread_count 2) writes them. Here the model's parameters stay untouched
``torch.empty`` memory (never resident) and serve only as the layout megatron
describes in ``sharded_state_dict()``; a planner resolves each write item,
when the writer reaches it, from the HF files (only the rank's slice), and
the writer writes it in this process and drops it. A rank holds about one
tensor shard at a time. Keys, shapes, sharding and file format are those of
``megatron.core.dist_checkpointing.save`` with its default torch_dist strategy;
only the order of the work differs.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import queue
import sys
from pathlib import Path
from typing import Callable

import torch
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.dist_checkpointing.strategies.state_dict_saver import save_state_dict_async_plan
from megatron.core.dist_checkpointing.strategies.torch import (MCoreSavePlanner, TorchDistSaveShardedStrategy,
                                                               _replace_state_dict_keys_with_sharded_keys,
                                                               mcore_to_pyt_state_dict)
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _write_item
from torch.distributed.checkpoint.planner import WriteItemType
from tqdm import tqdm

from megatron_rgm.compat.mcore import save_callbacks

# produce(tensor in the state dict) -> the data to write in its place, or None to write the tensor itself.
Producer = Callable[[torch.Tensor], "torch.Tensor | None"]


class _StreamingPlanner(MCoreSavePlanner):
    def __init__(self, produce: Producer, **kwargs):
        super().__init__(**kwargs)
        self._produce = produce

    def resolve_data(self, write_item):
        obj = self.lookup_object(write_item.index)
        if write_item.type != WriteItemType.BYTE_IO:
            made = self._produce(obj)
            if made is not None:
                return made
        return self.transform_object(write_item, obj)


class _StreamingWriter(FileSystemWriterAsync):
    """One file per rank, written in this process, each item resolved just before it is written."""

    progress: str | None = None  # a progress bar's label, or None for none

    def prepare_write_data(self, plan, planner) -> None:
        self._planner = planner
        # Bytes first, then tensors (megatron's order within a file); sorted() is stable.
        self._items = sorted(plan.items, key=lambda item: item.type != WriteItemType.BYTE_IO)
        self.write_buckets, self.results_queue = [], None
        if self._items:
            name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
            self.write_buckets.append((os.path.join(self.checkpoint_dir, name), name, ([], [])))
            self.results_queue = queue.Queue()  # in-process: no multiprocessing Manager is started

    def get_save_function_and_args(self):
        if not self.write_buckets:
            return None, None, []
        return self._write_all, None, []

    def _write_all(self) -> None:
        path, storage_key, _ = self.write_buckets[0]
        transforms = [self.transforms] if hasattr(self, "transforms") else []
        extra = {}
        if "serialization_format" in inspect.signature(_write_item).parameters:
            extra["serialization_format"] = dcp_filesystem.SerializationFormat.TORCH_SAVE
        results = []
        # An error propagates as it is (it names its cause): the launcher stops the other ranks.
        with open(path, "wb") as stream:
            for item in tqdm(self._items, desc=self.progress, disable=self.progress is None, file=sys.stdout):
                data = self._planner.resolve_data(item)
                if item.type != WriteItemType.BYTE_IO:
                    data = data.detach().to("cpu").contiguous()
                    if data.untyped_storage().nbytes() != data.numel() * data.element_size():
                        data = data.clone()  # torch.save writes a view's whole storage
                results.append(_write_item(*transforms, stream, data, item, storage_key, **extra))
                del data
            stream.flush()
            os.fsync(stream.fileno())
        self.results_queue.put({0: results})


class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron's torch_dist save strategy with the streaming planner and writer above (synchronous only)."""

    def __init__(self, produce: Producer, progress: str | None = None):
        super().__init__("torch_dist", 1, thread_count=1)
        self._produce, self._progress = produce, progress

    def async_save(self, sharded_state_dict, checkpoint_dir: Path, async_strategy: str = "mcore"):
        # async_strategy (0.19's save() passes it): always megatron's own machinery, run synchronously here
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict,
                                                                              self.keep_only_main_replica)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        writer = _StreamingWriter(checkpoint_dir, thread_count=1)
        writer.progress = self._progress
        planner = _StreamingPlanner(self._produce, dedup_replicated_tensors=not self.keep_only_main_replica,
                                    flatten_state_dict=False)
        ret = save_state_dict_async_plan(pyt_state_dict, writer, None, 0, planner=planner)[0]
        return save_callbacks(self, writer, ret)


def return_freed_memory() -> None:
    """Make glibc give every freed allocation of 1 MiB or more back to the system at once.

    By default glibc raises its mmap threshold to the size of the largest block
    freed so far (up to 32 MiB), so the shards of a streaming save, each freed
    after it is written, end up on the heap, which keeps them resident: the
    resident set grew by the shards' sizes over a save. A fixed threshold keeps
    it at about one shard. No-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols (ctypes.util.find_library would fork ldconfig)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (setting it also turns the dynamic threshold off)
    except (OSError, AttributeError):
        pass


def param_producer(model, make_shard: Callable[[str, torch.nn.Parameter], torch.Tensor],
                   keep: Callable[[str], bool]) -> Producer:
    """A :data:`Producer` that fills the model's parameters' places from ``make_shard(name, param)``.

    Every tensor megatron puts in the model's sharded state dict is a view of
    one parameter (a factory such as the gated FC1's gives two views of one).
    For a parameter with ``keep(name)`` false, the view is taken of
    ``make_shard(name, param)`` (shaped and typed like the parameter) instead;
    the last shard is cached, so the two halves of one FC1 read it once.
    Parameters with ``keep(name)`` true (the SPRM head) are written as they are.
    A tensor that is a view of no parameter is refused: it would be written
    from memory nothing has filled.
    """
    made, kept = {}, set()
    for name, param in model.named_parameters():
        ptr = param.untyped_storage().data_ptr()
        if keep(name):
            kept.add(ptr)
        elif not param.is_contiguous():
            raise ValueError(f"parameter {name} is not contiguous")
        else:
            made[ptr] = (name, param)
    last: list = [None, None]

    def produce(obj: torch.Tensor) -> torch.Tensor | None:
        ptr = obj.untyped_storage().data_ptr()
        if ptr in kept:
            return None
        if ptr not in made:
            raise RuntimeError(f"a checkpoint tensor of shape {tuple(obj.shape)} is a view of no parameter of the "
                               "model: the streaming save does not know what to write there")
        name, param = made[ptr]
        if last[0] != name:
            last[0], last[1] = None, None  # drop the previous shard before building the next
            shard = make_shard(name, param)
            if tuple(shard.shape) != tuple(param.shape):
                raise ValueError(f"{name}: built a shard of shape {tuple(shard.shape)}, the parameter is "
                                 f"{tuple(param.shape)}")
            shard = shard.to(param.dtype).contiguous()
            if shard.storage_offset() or shard.untyped_storage().nbytes() != shard.numel() * shard.element_size():
                shard = shard.clone()
            last[0], last[1] = name, shard
        shard = last[1]
        return shard.as_strided(obj.size(), obj.stride(), obj.storage_offset() - param.storage_offset())

    return produce
