"""The pieces every config is made of: :func:`option` (a field with its flag), :class:`ConfigError`, the
named choices and the range check."""

from __future__ import annotations

import sys
from dataclasses import MISSING, field
from typing import Any, Callable

AGGREGATIONS = ("geometric", "arithmetic", "product", "min", "last")
SPRM_LOSSES = ("spr", "bce")
STEP_RULES = ("exact", "contains", "text")  # which tokens end a step (megatron_rgm.steps)
STAGES = ("rgm", "sft", "backbone-check")
VERIFIERS = ("math", "exact")  # final-answer grading (megatron_rgm.rollout.rewards.make_verifier)
PROMPT_TEMPLATE = "{problem}\n<think>\n"  # how a problem becomes the model's prompt (the reference's)
CHAT = "chat"  # --prompt-template chat: the tokenizer's own chat template, the problem as the user turn


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


def decode_escapes(s: str) -> str:
    """``\\n`` and friends as typed on a command line -> the characters (a string without ``\\`` is kept)."""
    return s.encode("utf-8").decode("unicode_escape") if "\\" in s else s


def option(default: Any = MISSING, help: str | None = None, *, flag: str | None = None, choices=None,
           metavar: str | None = None, parse: Callable[[str], Any] | None = None, default_factory=MISSING,
           required: bool = False, cli: bool = True):
    """A config field with its command-line flag.

    Args:
        flag: the flag, when it is not ``--`` + the field name with dashes.
        parse: applied to each string the command line gives (e.g. :func:`decode_escapes`).
        required: the command line must give it (a tool's input).
        cli: False for a field the command line does not set (derived, or set by code).
    """
    meta = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "parse": parse, "cli": cli,
            "required": required}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def template_option():
    """The ``--prompt-template`` field (training data and the tools' prompts)."""
    return option(PROMPT_TEMPLATE, "how a problem becomes the model's prompt: a string with {problem} (escapes such "
                  "as \\n are decoded), or 'chat': the tokenizer's chat template with the problem as the user turn "
                  "and the generation prompt added", parse=decode_escapes)


def verifier_option():
    """The ``--verifier`` field: how final answers are graded."""
    return option("math", "final-answer grading: math-verify equivalence or exact string match", choices=VERIFIERS)


def check_template(template: str) -> None:
    if template != CHAT and "{problem}" not in template:
        raise ConfigError(f"--prompt-template {template!r} has no {{problem}} field: add one (or pass 'chat' for the "
                          "tokenizer's chat template)")


def at_least(owner: object, names: tuple[str, ...], low: float) -> None:
    for name in names:
        value = getattr(owner, name)
        if value is not None and value < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low:g}, got {value}")


DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")  # Megatron-LM's (WSD needs more flags)
