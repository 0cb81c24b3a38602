"""The typed config tree: every option of a run, its default, its flag and its own range checks, once.

A run is seven dataclasses: :class:`ModelConfig` (geometry and precision), :class:`ParallelConfig`
(layout), :class:`RGMConfig` (the SPRM head, its loss and aggregation) in :mod:`.model`;
:class:`GRPOConfig` (policy loss), :class:`OptimConfig`, :class:`DataConfig` (prompts, rollouts,
sampling) and :class:`RunConfig` in :mod:`.train`. A field declared with :func:`option` (:mod:`.options`)
carries its command-line flag (Megatron-LM's name where Megatron has the flag; RGM's own start with
``--sprm-`` or ``--grpo-``) and help text, and :mod:`megatron_rgm.cli` generates the parser from them.
Checks that involve one config live in its ``__post_init__``; checks across configs (and the
TransformerConfig) in :mod:`megatron_rgm.arguments`. Checkpoints record ``model`` and ``sprm`` as plain
dicts (:func:`dataclasses.asdict`).
"""

from megatron_rgm.config.model import GEOMETRY, ModelConfig, ParallelConfig, RGMConfig
from megatron_rgm.config.options import (AGGREGATIONS, CHAT, DECAY_STYLES, PROMPT_TEMPLATE, SPRM_LOSSES, STAGES,
                                         STEP_RULES, VERIFIERS, ConfigError, at_least, check_template,
                                         decode_escapes, option, run_tool, template_option, verifier_option)
from megatron_rgm.config.train import DataConfig, GRPOConfig, OptimConfig, RunConfig

__all__ = ["GEOMETRY", "AGGREGATIONS", "CHAT", "DECAY_STYLES", "PROMPT_TEMPLATE", "SPRM_LOSSES", "STAGES", "STEP_RULES",
           "VERIFIERS", "ConfigError", "DataConfig", "GRPOConfig", "ModelConfig", "OptimConfig", "ParallelConfig",
           "RGMConfig", "RunConfig", "at_least", "check_template", "decode_escapes", "option", "run_tool",
           "template_option", "verifier_option"]
