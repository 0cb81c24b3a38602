"""Rollout store (zarr): trajectories with their tokens, old log-probs, rewards and step scores.

Layout: one zarr group; attributes record the schema version, the tokenizer
(name and a fingerprint of its vocabulary), the model and the sampling
parameters. Each writer (data-parallel rank) owns a subgroup ``rank_NNNNN``,
so ranks append at the same time without touching each other's arrays::

    rank_00000/
        tokens, log_probs, response_mask      flat over tokens (trajectories concatenated)
        step_positions, step_scores           flat over steps
        token_start, token_count              per trajectory (chunked by trajectory)
        step_start, step_count, reward, correct, prompt_id, group_id
        COMMIT                                {"trajectories", "tokens", "steps"}, replaced atomically

A batch becomes visible when its writer replaces ``COMMIT`` after all arrays
are written; a batch half-written when its process died is beyond the
committed counts, ignored by readers and cut off by the next append. Reads
are lazy: one trajectory reads only the chunks it touches.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from megatron_rgm import faults
from megatron_rgm.config import ConfigError
from megatron_rgm.tokenizer import token_texts

SCHEMA_VERSION = 1
COMMIT = "COMMIT"
FLAT_TOKEN = {"tokens": "int32", "log_probs": "float32", "response_mask": "bool"}
FLAT_STEP = {"step_positions": "int32", "step_scores": "float32"}
PER_TRAJ = {"token_start": "int64", "token_count": "int32", "step_start": "int64", "step_count": "int32",
            "reward": "float32", "correct": "bool", "prompt_id": "int64", "group_id": "int64"}
TOKEN_CHUNK, STEP_CHUNK, TRAJ_CHUNK = 1 << 16, 1 << 14, 256


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of a tokenizer's vocabulary (sentencepiece, tokenizers or transformers): the text of every
    id, decoded in one batch where the tokenizer can (a 248k vocabulary in about a second)."""
    h = hashlib.sha1()
    texts = token_texts(tokenizer)
    h.update(str(len(texts)).encode())
    for text in texts:
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass
class Trajectory:
    """One trajectory, as sampled, stored and trained on (numpy arrays, python scalars)."""

    tokens: np.ndarray  # [n] prompt + response
    response_mask: np.ndarray  # [n] bool
    log_probs: np.ndarray  # [n] log-prob of token t under the sampling policy (0 on the prompt)
    step_positions: np.ndarray  # scored positions (the position before each step token)
    reward: float
    correct: bool
    prompt_id: int
    group_id: int  # the k trajectories of one prompt's group share it (GRPO's and the head's comparisons)
    step_scores: np.ndarray | None = None  # the head's probabilities at sampling time (a store needs them)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class RolloutStore:
    """Open (or create) a rollout store.

    Args:
        path: the store directory.
        mode: ``"r"`` (must exist), ``"a"`` (create or append).
        tokenizer: fingerprint (see :func:`tokenizer_fingerprint`) the store must match.
        attrs: on creation, recorded as attributes (model, sampling parameters, ...).
    """

    def __init__(self, path: str | os.PathLike, mode: str = "r", tokenizer: str | None = None,
                 attrs: dict | None = None):
        self.path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if mode == "r" and not self.path.exists():
            raise ConfigError(f"rollout store {self.path} does not exist: write it with tools/generate_rollouts.py")
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"rollout store {self.path} is a file, not a store directory: pass a new directory "
                              "or one written by tools/generate_rollouts.py")
        fresh = not (self.path / "zarr.json").exists()
        if fresh and mode == "r":
            raise ConfigError(f"{self.path} is not a rollout store (no zarr.json)")
        try:
            self.group = zarr.open_group(str(self.path), mode="a" if mode == "a" else "r")
        except (ValueError, KeyError) as e:  # a corrupt zarr.json (JSONDecodeError is a ValueError)
            raise ConfigError(f"rollout store {self.path} has an unreadable zarr.json ({e}): the store is damaged; "
                              "regenerate it") from None
        if fresh:
            self.group.attrs.update({"schema_version": SCHEMA_VERSION, "tokenizer": tokenizer, **(attrs or {})})
        meta = self.group.attrs.asdict()
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(f"rollout store {self.path} has schema version {meta.get('schema_version')}, this "
                              f"code reads {SCHEMA_VERSION}: regenerate it or use the matching megatron-rgm")
        if tokenizer is not None and meta.get("tokenizer") not in (None, tokenizer):
            raise ConfigError(f"rollout store {self.path} was written with tokenizer {meta.get('tokenizer')}, this run "
                              f"uses {tokenizer}: use a new store or the tokenizer it was written with")
        self.attrs = meta
        self._index: list[tuple[str, int]] | None = None

    # --- writing -----------------------------------------------------------------------------------

    def _rank_group(self, rank: int):
        name = f"rank_{rank:05d}"
        if name not in self.group:
            g = self.group.create_group(name)
            for arrays, chunk in ((FLAT_TOKEN, TOKEN_CHUNK), (FLAT_STEP, STEP_CHUNK), (PER_TRAJ, TRAJ_CHUNK)):
                for key, dtype in arrays.items():
                    g.create_array(key, shape=(0,), chunks=(chunk,), dtype=dtype)
        return self.group[name], self.path / name / COMMIT

    def _committed(self, commit_file: Path) -> dict:
        if not commit_file.exists():
            return {"trajectories": 0, "tokens": 0, "steps": 0}
        try:
            done = json.loads(commit_file.read_text())
            return {key: int(done[key]) for key in ("trajectories", "tokens", "steps")}
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"rollout store {self.path}: {commit_file.parent.name}/{COMMIT} is unreadable: the store "
                              "is damaged; regenerate it") from None

    def _array(self, name: str, key: str):
        """``name/key``, or one clear message when the store lost it or its metadata."""
        try:
            return self.group[name][key]
        except (KeyError, ValueError):
            raise ConfigError(f"rollout store {self.path}: {name}/{key} is missing or unreadable: the store is "
                              "damaged; regenerate it") from None

    def append(self, rank: int, trajectories: Sequence[Trajectory]) -> None:
        """Append a batch written by ``rank``; visible to readers once this returns."""
        g, commit_file = self._rank_group(rank)
        name = commit_file.parent.name
        done = self._committed(commit_file)
        # Cut off whatever a dead writer left beyond the last commit; never pad a truncated array.
        sizes = ((FLAT_TOKEN, done["tokens"]), (FLAT_STEP, done["steps"]), (PER_TRAJ, done["trajectories"]))
        for arrays, n in sizes:
            for key in arrays:
                self._check_length(name, key, self._array(name, key).shape[0], n)
        for arrays, n in sizes:
            for key in arrays:
                if g[key].shape[0] != n:
                    g[key].resize((n,))
        lens = [len(t.tokens) for t in trajectories]
        steps = [len(t.step_positions) for t in trajectories]
        for t in trajectories:
            if not (len(t.tokens) == len(t.response_mask) == len(t.log_probs)):
                raise ValueError("tokens, response_mask and log_probs of a trajectory must have the same length")
            if t.step_scores is None or len(t.step_positions) != len(t.step_scores):
                raise ValueError("step_positions and step_scores of a trajectory must have the same length")
        cat = lambda xs, dt: np.concatenate([np.asarray(x, dtype=dt) for x in xs]) if xs else np.zeros(0, dt)  # noqa
        g["tokens"].append(cat([t.tokens for t in trajectories], "int32"))
        g["log_probs"].append(cat([t.log_probs for t in trajectories], "float32"))
        g["response_mask"].append(cat([t.response_mask for t in trajectories], "bool"))
        g["step_positions"].append(cat([t.step_positions for t in trajectories], "int32"))
        g["step_scores"].append(cat([t.step_scores for t in trajectories], "float32"))
        g["token_start"].append(done["tokens"] + np.concatenate([[0], np.cumsum(lens)[:-1]]).astype("int64"))
        g["token_count"].append(np.asarray(lens, dtype="int32"))
        g["step_start"].append(done["steps"] + np.concatenate([[0], np.cumsum(steps)[:-1]]).astype("int64"))
        g["step_count"].append(np.asarray(steps, dtype="int32"))
        g["reward"].append(np.asarray([t.reward for t in trajectories], dtype="float32"))
        g["correct"].append(np.asarray([t.correct for t in trajectories], dtype="bool"))
        g["prompt_id"].append(np.asarray([t.prompt_id for t in trajectories], dtype="int64"))
        g["group_id"].append(np.asarray([t.group_id for t in trajectories], dtype="int64"))
        faults.reach("store.before_commit", rank=rank)
        _write_json_atomic(commit_file, {"trajectories": done["trajectories"] + len(trajectories),
                                         "tokens": done["tokens"] + sum(lens), "steps": done["steps"] + sum(steps)})
        self._index = None

    # --- reading -----------------------------------------------------------------------------------

    def _build_index(self) -> list[tuple[str, int]]:
        index = []
        for name in sorted(k for k in self.group.group_keys() if k.startswith("rank_")):
            done = self._committed(self.path / name / COMMIT)
            sizes = ((FLAT_TOKEN, done["tokens"]), (FLAT_STEP, done["steps"]), (PER_TRAJ, done["trajectories"]))
            for arrays, n in sizes:
                for key in arrays:
                    self._check_length(name, key, self._array(name, key).shape[0], n)
            index += [(name, i) for i in range(done["trajectories"])]
        return index

    def _check_length(self, name: str, key: str, have: int, committed: int) -> None:
        if have < committed:
            raise ConfigError(f"rollout store {self.path} is truncated: {name}/{key} holds {have} entries but "
                              f"{committed} were committed; regenerate the store")

    def __len__(self) -> int:
        if self._index is None:
            self._index = self._build_index()
        return len(self._index)

    def __getitem__(self, i: int) -> Trajectory:
        if self._index is None:
            self._index = self._build_index()
        name, j = self._index[i]
        g = self.group[name]
        try:
            t0, tn = int(g["token_start"][j]), int(g["token_count"][j])
            s0, sn = int(g["step_start"][j]), int(g["step_count"][j])
            return Trajectory(
                tokens=g["tokens"][t0:t0 + tn], response_mask=g["response_mask"][t0:t0 + tn],
                log_probs=g["log_probs"][t0:t0 + tn], step_positions=g["step_positions"][s0:s0 + sn],
                step_scores=g["step_scores"][s0:s0 + sn], reward=float(g["reward"][j]), correct=bool(g["correct"][j]),
                prompt_id=int(g["prompt_id"][j]), group_id=int(g["group_id"][j]))
        except (RuntimeError, ValueError) as e:  # a chunk cut short or overwritten: the codec cannot decode it
            raise ConfigError(f"rollout store {self.path}: trajectory {i} ({name}) cannot be read ({e}): the store "
                              "is damaged; regenerate it") from None

    def group_ids(self) -> np.ndarray:
        """``group_id`` of every committed trajectory, in index order (one read per writer)."""
        if self._index is None:
            self._index = self._build_index()
        out, cached = [], {}
        for name, j in self._index:
            if name not in cached:
                array = self._array(name, "group_id")
                try:
                    cached[name] = np.asarray(array[:])
                except (RuntimeError, ValueError) as e:
                    raise ConfigError(f"rollout store {self.path}: {name}/group_id cannot be read ({e}): the store is "
                                      "damaged; regenerate it") from None
            out.append(int(cached[name][j]))
        return np.asarray(out, dtype=np.int64)

    def prompt_ids(self) -> set[int]:
        """Prompts with at least one committed trajectory (a generator resumes after them)."""
        return {self[i].prompt_id for i in range(len(self))}
