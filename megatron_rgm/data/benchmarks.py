"""Benchmark loaders: every format normalised to ``{"id", "problem", "answer"}``.

Known files (by name): AIME 2024/2025 and HMMT Feb 2025 (``prompt`` already
ending in the "Please reason step by step..." instruction, ``answer``),
MATH-500 (``problem``, ``answer``), GSM8K (``question``, ``answer`` ending in
``#### N``). Anything else: a jsonl with ``--problem-key`` / ``--answer-key``.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_rgm.config import ConfigError

# file stem -> (problem key, answer key)
KNOWN = {
    "aime24": ("prompt", "answer"),
    "aime25": ("prompt", "answer"),
    "hmmt25": ("prompt", "answer"),
    "math500": ("problem", "answer"),
    "gsm8k_test": ("question", "answer"),
}


def gsm8k_answer(text: str) -> str:
    """The number after ``####`` in a GSM8K solution, commas dropped."""
    if "####" not in text:
        raise ValueError("no '####' marker")
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a jsonl file; a corrupt line is reported with its line number."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} is not a file: pass a jsonl benchmark or prompt file")
    rows = []
    with open(path, "rb") as f:  # bytes, so that a line that is not UTF-8 is reported with its number
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{path}:{n}: not valid UTF-8: re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg}): fix or remove that line") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def load_benchmark(path: str | Path, problem_key: str | None = None, answer_key: str | None = None) -> list[dict]:
    """``[{"id", "problem", "answer"}]`` from a known benchmark file or a generic jsonl.

    Args:
        path: the jsonl file.
        problem_key, answer_key: field names (override the known ones; a generic
            file defaults to ``problem`` / ``answer``, what this package writes).
    """
    path = Path(path)
    known = KNOWN.get(path.stem) or ("problem", "answer")
    pk = problem_key or known[0]
    ak = answer_key or known[1]
    out = []
    for n, row in enumerate(read_jsonl(path), 1):
        for key in (pk, ak):
            if key not in row:
                raise ConfigError(f"{path}: record {n} has no field {key!r} (fields: {sorted(row)}): "
                                  "pass --problem-key/--answer-key")
        answer = row[ak]
        if path.stem == "gsm8k_test" and answer_key is None:
            try:
                answer = gsm8k_answer(str(answer))
            except ValueError:
                raise ConfigError(f"{path}: record {n}: GSM8K answer without '#### N'") from None
        out.append({"id": str(row.get("id", row.get("idx", n - 1))), "problem": str(row[pk]), "answer": str(answer)})
    return out
