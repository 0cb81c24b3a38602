"""The SPRM head as a torch module, and its files beside an HF export: ``score_module.pt`` (the reference
release's format), ``sprm_head.safetensors`` and ``sprm_config.json`` (which layer it reads, its step strings,
its width). Torch only: serving (:mod:`megatron_rgm.hf`) needs no megatron-core."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_rgm.config import ConfigError


class SPRMHead(torch.nn.Sequential):
    """``Linear(c, m*c) -> ReLU -> Dropout(p) -> Linear(m*c, 1)``.

    A ``Sequential`` so that its state dict keys are ``0.weight 0.bias 3.weight
    3.bias``, the format of the reference release's ``score_module.pt``.
    """

    def __init__(self, hidden_size: int, hidden_mult: int = 2, dropout: float = 0.5, dtype=torch.float32):
        inner = hidden_mult * hidden_size
        super().__init__(
            torch.nn.Linear(hidden_size, inner, dtype=dtype),
            torch.nn.ReLU(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(inner, 1, dtype=dtype),
        )

    @staticmethod
    def num_parameters(hidden_size: int, hidden_mult: int = 2) -> int:
        """Parameter count: ``2c^2 + 4c + 1`` for ``hidden_mult=2`` (26M at c=3584, 52M at c=5120)."""
        inner = hidden_mult * hidden_size
        return hidden_size * inner + inner + inner + 1

HEAD_KEYS = ("0.weight", "0.bias", "3.weight", "3.bias")  # Linear(c, 2c) -> ReLU -> Dropout -> Linear(2c, 1)


def load_head(path: str | os.PathLike, hidden_size: int) -> dict[str, torch.Tensor]:
    """A ``score_module.pt`` / ``sprm_head.safetensors`` state dict, checked against the model width."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--sprm-head {path} is not a file: pass score_module.pt or sprm_head.safetensors")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as h:
                sd = {k: h.get_tensor(k) for k in h.keys()}
        except SafetensorError as e:
            raise ConfigError(f"--sprm-head {path} is not a readable safetensors file ({e}): re-export it") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            # torch's own text suggests weights_only=False, i.e. running the file's code: name the cause only.
            found = re.search(r"GLOBAL (\S+)", str(e))
            cause = (f"it references {found.group(1)}" if found else
                     "empty or truncated file" if isinstance(e, EOFError) else "not a torch.save state dict")
            raise ConfigError(f"--sprm-head {path} is not a plain tensor state dict ({cause}; refused to unpickle it, "
                              "which could run code): save it with torch.save(head.state_dict()) or pass "
                              "sprm_head.safetensors") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"--sprm-head {path} does not hold a state dict of tensors")
    if set(sd) != set(HEAD_KEYS):
        raise ConfigError(f"--sprm-head {path} has keys {sorted(sd)}, expected {list(HEAD_KEYS)} "
                          "(Linear(c, 2c) -> ReLU -> Dropout -> Linear(2c, 1))")
    inner = sd["0.weight"].shape[0]
    want = {"0.weight": (inner, hidden_size), "0.bias": (inner,), "3.weight": (1, inner), "3.bias": (1,)}
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise ConfigError(f"--sprm-head {path}: {k} has shape {tuple(sd[k].shape)}, expected {shape} for a "
                              f"model of hidden size {hidden_size}")
    return sd


HEAD_CONFIG = "sprm_config.json"
HEAD_SAFETENSORS = "sprm_head.safetensors"  # the head beside an export, in safetensors (not a model shard)
# What a head is applied with, beside its weights: the layer it reads and which tokens end a step.
HEAD_FIELDS = ("sprm_layer", "sprm_step_tokens", "sprm_step_rule")
REFERENCE_HEAD = {"sprm_layer": -2, "sprm_step_tokens": [".\n\n"], "sprm_step_rule": "exact"}
# Before the step rule was recorded (configs, checkpoints, Megatron-LM args), a step token was any token
# containing a step string.
UNRECORDED_RULE = "contains"


def head_config(directory: str | os.PathLike) -> dict:
    """The :data:`HEAD_FIELDS` of the head in ``directory``, as it must be applied.

    ``sprm_config.json`` when there is one. Without it the head is the reference release's
    (``score_module.pt`` alone): the penultimate layer, and exactly the token ``".\\n\\n"``. A config written
    before the step rule was recorded is ours from then, when a step token was any token containing a step
    string: ``contains``.
    """
    path = Path(directory) / HEAD_CONFIG
    if not path.exists():
        return dict(REFERENCE_HEAD)
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg}): re-export the model or delete the file") from None
    return {**REFERENCE_HEAD, "sprm_step_rule": UNRECORDED_RULE, **{k: meta[k] for k in HEAD_FIELDS if k in meta}}


def save_head(out: Path, sd: dict[str, torch.Tensor], meta: dict) -> None:
    """``score_module.pt`` (reference format), ``sprm_head.safetensors`` and ``sprm_config.json``."""
    sd = {k: sd[k].detach().cpu().contiguous() for k in HEAD_KEYS}  # the reference file's key order
    torch.save(sd, out / "score_module.pt")
    save_file(sd, str(out / HEAD_SAFETENSORS))
    (out / HEAD_CONFIG).write_text(json.dumps(meta, indent=2))
