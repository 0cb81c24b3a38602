"""RGMConfig: everything about the SPRM head, its loss and step-score aggregation."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

AGGREGATIONS = ("geometric", "arithmetic", "product", "min", "last")
SPRM_LOSSES = ("spr", "bce")


class ConfigError(ValueError):
    """An invalid option or combination of options; the message names the fix."""


def run_tool(body: Callable[[], object]) -> int:
    """Run a command-line tool's body: a user's mistake (ConfigError) prints one line and exits 2."""
    try:
        body()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


@dataclass
class RGMConfig:
    """Options of the Self-supervised Process Reward Model (SPRM) head.

    Attributes:
        sprm_layer: transformer layer whose output feeds the head; negative
            counts from the end (-2: the penultimate layer, as in the paper).
        sprm_hidden_mult: the head's hidden width is ``mult * hidden_size``.
        sprm_dropout: dropout between the head's two linears.
        sprm_backbone_grad_scale: s in ``f*s + f.detach()*(1-s)``: the share
            of the SPR-loss gradient that reaches the backbone.
        sprm_step_tokens: strings whose tokens end a reasoning step.
        sprm_loss: ``spr`` (masked, class-weighted) or ``bce`` (ablation).
        sprm_pos_weight: weight multiplier of positive masked steps.
        sprm_loss_weight: weight of the SPR loss in the total loss.
        sprm_aggregation: how step scores become a trajectory score.
    """

    sprm_layer: int = -2
    sprm_hidden_mult: int = 2
    sprm_dropout: float = 0.5
    sprm_backbone_grad_scale: float = 1e-4
    sprm_step_tokens: list[str] = field(default_factory=lambda: [".\n\n"])
    sprm_loss: str = "spr"
    sprm_pos_weight: float = 1.5
    sprm_loss_weight: float = 1.0
    sprm_aggregation: str = "geometric"

    def __post_init__(self) -> None:
        if self.sprm_hidden_mult < 1:
            raise ConfigError(f"--sprm-hidden-mult must be >= 1, got {self.sprm_hidden_mult}")
        if not 0.0 <= self.sprm_dropout < 1.0:
            raise ConfigError(f"--sprm-dropout must be in [0, 1), got {self.sprm_dropout}")
        if not 0.0 <= self.sprm_backbone_grad_scale <= 1.0:
            raise ConfigError(
                f"--sprm-backbone-grad-scale must be in [0, 1], got {self.sprm_backbone_grad_scale}"
            )
        if self.sprm_loss not in SPRM_LOSSES:
            raise ConfigError(f"--sprm-loss must be one of {SPRM_LOSSES}, got {self.sprm_loss!r}")
        if self.sprm_aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"--sprm-aggregation must be one of {AGGREGATIONS}, got {self.sprm_aggregation!r}"
            )
        if not self.sprm_step_tokens or any(not t for t in self.sprm_step_tokens):
            raise ConfigError("--sprm-step-tokens needs at least one non-empty string")
        if self.sprm_pos_weight <= 0:
            raise ConfigError(f"--sprm-pos-weight must be > 0, got {self.sprm_pos_weight}")

    def resolve_layer(self, num_layers: int) -> int:
        """The 0-based index of the feature layer in a model of ``num_layers`` layers."""
        index = self.sprm_layer + num_layers if self.sprm_layer < 0 else self.sprm_layer
        if not 0 <= index < num_layers:
            raise ConfigError(
                f"--sprm-layer {self.sprm_layer} is outside a model of {num_layers} layers: "
                f"use a value in [{-num_layers}, {num_layers - 1}] (-2 is the penultimate layer)"
            )
        return index
