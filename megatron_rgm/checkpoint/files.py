"""A save directory on disk: its layout, which iteration is current, and what one checkpoint holds.

Layout (Megatron-LM's)::

    <dir>/iter_0000010/                  one dist checkpoint per saved iteration
    <dir>/latest_checkpointed_iteration.txt
    <dir>/hf_assets/                     the tokenizer (and HF config.json), when the run had one
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megatron_rgm.config import ConfigError

LATEST = "latest_checkpointed_iteration.txt"
ASSETS = "hf_assets"  # tokenizer (and HF config.json) beside the iteration directories
RUN_CONFIG = "run_config.yaml"  # where a Megatron-Bridge save records its model (iter_XXXXXXX/)
HEAD_PREFIX = "sprm_head."


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as asked; the message names it and the fix."""


def iteration_dir(save_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put a finished ``tmp`` (a file or a directory, on the same filesystem) at ``final`` by renaming it.

    A file replaces the old one in one atomic rename. A directory cannot, so the old ``final`` is renamed
    aside first and removed only once the new one is in place: a crash in between leaves it as
    ``<final>.old``, never nothing. Every checkpoint, export and asset directory is published this way.
    """
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(final.name + ".old")
    if final.is_dir():
        if old.is_dir():
            shutil.rmtree(old)  # from a publish that died after its second rename: final is the newer copy
        os.replace(final, old)
    os.replace(tmp, final)
    if old.is_dir():  # this publish's, or one left by a publish that died between the renames
        shutil.rmtree(old)


def latest_iteration(save_dir: str | os.PathLike) -> int | None:
    """The iteration the ``latest`` file points at, or None if there is none."""
    path = Path(save_dir) / LATEST
    if not path.exists():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number: delete it or point --load elsewhere")
    return int(text)


def resolve_checkpoint(path: str | os.PathLike, iteration: int | None = None) -> tuple[Path, int]:
    """The ``iter_XXXXXXX`` directory to load and its iteration.

    Args:
        path: a save directory (its ``latest`` file, or ``iteration``) or one checkpoint directory.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist: pass a directory written by --save")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a file, not a directory: pass the --save directory")
    if (path / "metadata.json").exists() or path.name.startswith("iter_"):
        return path, int(path.name[5:12]) if path.name[5:12].isdigit() else 0
    iteration = latest_iteration(path) if iteration is None else iteration
    if iteration is None:
        raise CheckpointError(f"{path} has no {LATEST}: it holds no finished checkpoint")
    ckpt = iteration_dir(path, iteration)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist (the latest file points at a missing directory)")
    return ckpt, iteration


def read_common_state(ckpt: str | os.PathLike) -> dict:
    """The common (non-sharded) state of one checkpoint directory: ``rgm_extra``, Megatron-LM's ``args``, ..."""
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
    except Exception as e:  # a torn or foreign directory: name it rather than show a loader's internals
        raise CheckpointError(f"{ckpt} is not a readable dist checkpoint ({type(e).__name__}: {e}): pass a "
                              "directory written by megatron-rgm's or Megatron-LM's save_checkpoint") from None
    return common if isinstance(common, dict) else {}


def read_tensor_names(ckpt: str | os.PathLike) -> list[str]:
    """The sharded tensors one checkpoint directory holds (model, optimizer and RNG entries alike)."""
    return list(read_tensor_shapes(ckpt))


def read_tensor_shapes(ckpt: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The global shape of each sharded tensor one checkpoint directory holds."""
    from megatron.core import dist_checkpointing

    return {k: tuple(v.global_shape) for k, v in dist_checkpointing.load_tensors_metadata(str(ckpt)).items()}
