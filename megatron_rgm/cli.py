"""The command line, generated from the config dataclasses (:mod:`megatron_rgm.config`).

A field declared with :func:`megatron_rgm.config.option` becomes one flag: its type from the
annotation (``int | None`` -> ``type=int``; ``list[str]`` -> ``nargs="+"``; a bool -> ``--x`` and
``--no-x``, a field named ``no_x`` -> ``--no-x`` alone), its default from the dataclass, so a default
is written once. :func:`from_namespace` reads the parsed values back into the dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from megatron_rgm.config import ConfigError, check_template, option, template_option, verifier_option

T = TypeVar("T")


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def dest_of(f: dataclasses.Field) -> str:
    return flag_of(f)[2:].replace("-", "_")


def cli_fields(cls: type, only: Callable[[str], bool] | None = None) -> list[dataclasses.Field]:
    """The fields of ``cls`` the command line sets (those ``only`` keeps, by field name)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False) and (only is None or only(f.name))]


def _scalar(annotation: Any) -> tuple[type, bool]:
    """(element type, is a list) of a field annotation such as ``int | None`` or ``list[str]``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def add_arguments(parser: argparse.ArgumentParser, cls: type, title: str,
                  only: Callable[[str], bool] | None = None) -> argparse.ArgumentParser:
    """Register ``cls``'s flags as one argument group of ``parser``; returns ``parser``."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title)
    for f in cli_fields(cls, only):
        kind, many = _scalar(hints[f.name])
        m, default = f.metadata, _default(f)
        kw: dict[str, Any] = {"dest": dest_of(f), "default": default, "help": m.get("help")}
        if m.get("required"):
            kw["required"] = True
        if kind is bool:
            # --x / --no-x (a preset may turn a flag on that a command line turns off); a --no-x field: store_true
            kw["action"] = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            if many:
                kw["nargs"] = "+"
            if m.get("choices"):
                kw["choices"] = m["choices"]
            if m.get("metavar"):
                kw["metavar"] = m["metavar"]
        group.add_argument(flag_of(f), **kw)
    return parser


def from_namespace(cls: type[T], ns: argparse.Namespace, only: Callable[[str], bool] | None = None,
                   **overrides: Any) -> T:
    """``cls`` built from the parsed flags (its ``parse`` applied to command-line strings) and ``overrides``.

    A field the namespace lacks (a parser that did not register it) keeps its default.
    """
    values: dict[str, Any] = {}
    for f in cli_fields(cls, only):
        if not hasattr(ns, dest_of(f)):
            continue
        value, parse = getattr(ns, dest_of(f)), f.metadata.get("parse")
        if parse is not None and value is not None:
            value = [parse(v) for v in value] if isinstance(value, list) else parse(value)
        values[f.name] = value
    values.update(overrides)
    return cls(**values)


# --- flag groups the tools share (generate_rollouts, best_of_n) ------------------------------------------------

@dataclass
class PromptFileConfig:
    """A tool's prompts: the file, which fields hold problem and answer, the template, the grading."""

    prompts: str | None = option(None, "a known benchmark file or any jsonl (--problem-key/--answer-key)",
                                 required=True)
    problem_key: str | None = option(None, "problem field (default: problem / prompt / question)")
    answer_key: str | None = option(None, "gold-answer field (omit with --problem-key for a file without them)")
    limit: int | None = option(None, "the first N prompts only")
    prompt_template: str = template_option()
    verifier: str = verifier_option()

    def __post_init__(self) -> None:
        check_template(self.prompt_template)
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")


@dataclass
class ModelSource:
    """Which model a tool runs: a Megatron checkpoint at a layout, or an HF export."""

    backend: str = option("megatron", "megatron: a checkpoint at a TP x PP layout; hf: an export on transformers; "
                          "vllm: an export sampled by vLLM and scored by transformers (the same weights)",
                          choices=("megatron", "hf", "vllm"))
    mcore_path: str | None = option(None, "Megatron checkpoint (hf-to-mcore, --save, or Megatron-LM's)")
    hf_path: str | None = option(None, "HF export with score_module.pt (mcore-to-hf)")
    tokenizer: str | None = option(None, "sentencepiece .model or HF tokenizer directory (default: the checkpoint's)")
    tp: int = option(1, "tensor-parallel size (megatron backend)")
    pp: int = option(1, "pipeline-parallel size (megatron backend)")
    vllm_python: str | None = option(None, "vllm backend: an interpreter that has vLLM (vLLM pins its own torch, "
                                     "so it may live in a venv of its own; default: this one)")
    vllm_kv_cache_gb: float = option(2.0, "vllm backend: the engine's KV cache in GiB")

    def __post_init__(self) -> None:
        if self.backend in ("hf", "vllm") and not self.hf_path:
            raise ConfigError(f"--backend {self.backend} needs --hf-path (an export written by mcore-to-hf)")
        if self.vllm_kv_cache_gb <= 0:
            raise ConfigError(f"--vllm-kv-cache-gb must be > 0, got {self.vllm_kv_cache_gb}")
        if self.vllm_python and self.backend != "vllm":
            raise ConfigError("--vllm-python sets the vllm backend's interpreter: add --backend vllm, or drop it")
        if self.backend == "megatron" and not self.mcore_path:
            raise ConfigError("--backend megatron needs --mcore-path (a checkpoint written by hf-to-mcore or --save)")
        if self.tp < 1 or self.pp < 1:
            raise ConfigError(f"--tp and --pp must be >= 1, got {self.tp} and {self.pp}")
