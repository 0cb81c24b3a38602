"""The vLLM side of :class:`megatron_rgm.rollout.vllm_engine.VLLMEngine`: one ``vllm.LLM`` in a process of its own.

Run by path, not imported: vLLM pins its own torch, so this file may run in another venv, where
megatron_rgm is not installed. It needs the standard library, torch and vLLM only.

    python vllm_worker.py SOCKET        # key in MEGATRON_RGM_VLLM_KEY (hex)

Protocol, over a ``multiprocessing.connection`` socket (plain dicts, lists, ints, floats, strings):
  * first message: the engine's options; the reply ``{"ok": True, "vllm": version}`` once the model is loaded;
  * ``{"op": "generate", "prompts": [[id, ...]], "n": k, "params": [{...}]}``: ``k`` samples of each prompt,
    replied as ``{"outputs": [[[tokens], [log-probs]] x k] x prompts}``;
  * ``{"op": "load_weights", "shm": name, "bytes": total, "tensors": [[name, dtype, shape, offset], ...]}``: HF-named
    tensors in a shared-memory block, loaded into the running model (replied ``{"loaded": count}``);
  * ``{"op": "close"}``.
An exception in a request is replied as ``{"error": text}``; the process goes on serving.
"""

from __future__ import annotations

import math
import os
import sys
import traceback
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.connection import Client

import torch
import vllm
from vllm import LLM, SamplingParams
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def start(spec: dict) -> LLM:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))  # before LLM(), which leaves the count as it finds it
    options = dict(model=spec["model"], dtype=spec["dtype"], enforce_eager=True, seed=spec["seed"],
                   logprobs_mode="raw_logprobs", max_num_seqs=spec["max_num_seqs"],
                   load_format="dummy" if spec["dummy"] else "auto")
    for key in ("kv_cache_memory_bytes", "max_model_len", "gpu_memory_utilization"):
        if spec.get(key):
            options[key] = spec[key]
    return LLM(**options)


def generate(llm: LLM, msg: dict) -> dict:
    params, greedy = [], [p["temperature"] == 0 for p in msg["params"]]
    for p, one in zip(msg["params"], greedy):
        params.append(SamplingParams(
            n=1 if one else msg["n"], temperature=p["temperature"], top_p=p["top_p"], top_k=p["top_k"] or -1,
            repetition_penalty=p["repetition_penalty"], max_tokens=p["max_tokens"], seed=p["seed"],
            # The caller's stop ids only (the sampler's contract), whatever generation_config.json says.
            ignore_eos=True, stop_token_ids=p["stop_token_ids"], stop=p["stop"] or None,
            include_stop_str_in_output=True, detokenize=bool(p["stop"]), logprobs=0,
            # A stop string may be a special token (</think>): the text it is matched in keeps them, as written.
            skip_special_tokens=False, spaces_between_special_tokens=False))
    outs = llm.generate([{"prompt_token_ids": ids} for ids in msg["prompts"]], params, use_tqdm=False)
    replies = []
    for out, one in zip(outs, greedy):
        # vLLM refuses n > 1 at temperature 0: one greedy sample stands for all k, which are the same.
        samples = sorted(out.outputs, key=lambda c: c.index) * (msg["n"] if one else 1)
        replies.append([[list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]]
                        for c in samples])
    return {"outputs": replies}


def attach(name: str) -> shared_memory.SharedMemory:
    """The sender's block, not tracked here: the sender unlinks it (before Python 3.13 an attach registers the
    block with this process's resource tracker, which would unlink it again, with a warning, at exit)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    block = shared_memory.SharedMemory(name=name)
    resource_tracker.unregister(block._name, "shared_memory")  # noqa: SLF001 - the name it registered
    return block


def load_weights(llm: LLM, msg: dict) -> dict:
    block = attach(msg["shm"])
    try:  # copied out at once: the sender may unlink the block as soon as this replies
        data = torch.empty(msg["bytes"], dtype=torch.uint8)
        data.numpy()[:] = block.buf[:msg["bytes"]]
    finally:
        block.close()

    def tensors():
        for name, dtype, shape, offset in msg["tensors"]:
            size = math.prod(shape) * DTYPES[dtype].itemsize
            yield name, data[offset:offset + size].view(DTYPES[dtype]).view(shape)

    # reload_weights, not the model's load_weights: on a CPU, vLLM's linear layers run on packed copies of
    # their weights, which only the reload path rebuilds.
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors()})
    llm.collective_rpc(retie)
    llm.reset_prefix_cache()  # cached prefixes were computed by the old weights
    return {"loaded": len(msg["tensors"])}


def retie(worker) -> None:
    """A tied output layer reads the embedding again. vLLM's reload loads the embedding only (the checkpoint has
    no lm_head) and puts the output layer's old weight back, with the kernel's packed copy built from it."""
    model = worker.model_runner.model
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return
    head = model.lm_head
    embedding = next(m for m in model.modules() if isinstance(m, VocabParallelEmbedding)
                     and not isinstance(m, ParallelLMHead))
    head.tie_weights(embedding)
    head.quant_method.process_weights_after_loading(head)


def main() -> int:
    conn = Client(sys.argv[1], family="AF_UNIX", authkey=bytes.fromhex(os.environ["MEGATRON_RGM_VLLM_KEY"]))
    llm = start(conn.recv())
    conn.send({"ok": True, "vllm": vllm.__version__})
    handlers = {"generate": generate, "load_weights": load_weights}
    while True:
        msg = conn.recv()
        if msg["op"] == "close":
            conn.send({"closed": True})
            return 0
        try:
            conn.send(handlers[msg["op"]](llm, msg))
        except Exception as e:  # noqa: BLE001 - reported to the caller, who raises it
            conn.send({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]})


if __name__ == "__main__":
    sys.exit(main())
