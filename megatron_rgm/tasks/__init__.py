"""The synthetic reasoning task of the tiny preset (multi-step addition).

Data preparation (tokenizer, prompt and SFT files) is
``megatron_rgm.tasks.prepare.prepare`` / ``python -m megatron_rgm.tasks.prepare``;
it is not re-exported here because the function shares its module's name.
"""

from megatron_rgm.tasks.arithmetic import (
    PROMPT_TEMPLATE,
    STEP,
    Problem,
    Step,
    make_problems,
    make_steps,
    make_trace,
    parse_steps,
    prompt_text,
    render,
    sft_texts,
    train_tokenizer,
)

__all__ = [
    "PROMPT_TEMPLATE", "STEP", "Problem", "Step", "make_problems", "make_steps", "make_trace", "parse_steps",
    "prompt_text", "render", "sft_texts", "train_tokenizer",
]
