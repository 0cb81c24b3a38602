"""Serve an HF export as a user would, with no megatron-rgm code in the loop: does each prompt get an answer, and stop?

    python tools/serve_check.py --hf-path EXPORT --prompts eval_prompts.jsonl [--limit 8] [--engine vllm]

Loads the export with ``AutoTokenizer`` + ``AutoModelForCausalLM`` (``--engine transformers``) or ``vllm.LLM``
(``--engine vllm``, its CPU build works), renders each problem with the export's own chat template, decodes
greedily with the export's ``generation_config.json`` (its EOS ends a response) and prints one JSON line per
prompt (the response, whether it stopped at EOS, the ``\\boxed{}`` answer and whether it is the gold one), then a
summary line. Exits 1 when a response did not stop at EOS or has no ``\\boxed{}`` answer within
``--max-new-tokens``: an export that serves answers and stops.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _transformers(path: str, prompts: list[str], max_new: int, memory: float) -> list[tuple[str, bool]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stop = GenerationConfig.from_pretrained(path).eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    out = []
    for text in prompts:
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new, do_sample=False)
        new = gen[0, ids["input_ids"].shape[1]:].tolist()
        out.append((tok.decode(new, skip_special_tokens=True), bool(new) and new[-1] in stop))
    return out


def _vllm(path: str, prompts: list[str], max_new: int, memory: float) -> list[tuple[str, bool]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype="float32", enforce_eager=True, gpu_memory_utilization=memory)
    results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new))
    return [(r.outputs[0].text, r.outputs[0].finish_reason == "stop") for r in results]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-path", required=True, help="an export written by mcore-to-hf")
    p.add_argument("--prompts", required=True, help="jsonl with problem and answer fields")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--engine", choices=("transformers", "vllm"), default="transformers")
    p.add_argument("--vllm-memory", type=float, default=0.25, help="vLLM's gpu_memory_utilization: on its CPU "
                   "build, the fraction of host memory it reserves (its default, 0.92, fails beside other work)")
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in open(a.prompts, encoding="utf-8") if line.strip()][: a.limit]
    tok = AutoTokenizer.from_pretrained(a.hf_path)
    if not tok.chat_template:
        print(f"error: {a.hf_path} has no chat template: export it with mcore-to-hf", file=sys.stderr)
        return 2
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["problem"]}], tokenize=False,
                                       add_generation_prompt=True) for r in rows]
    run = _vllm if a.engine == "vllm" else _transformers
    served = run(a.hf_path, prompts, a.max_new_tokens, a.vllm_memory)
    stopped = answered = correct = 0
    for row, (text, eos) in zip(rows, served):
        boxed = BOXED.findall(text)
        answer = boxed[-1].strip() if boxed else None
        right = answer is not None and answer == str(row.get("answer"))
        stopped, answered, correct = stopped + eos, answered + (answer is not None), correct + right
        print(json.dumps({"id": row.get("id"), "response": text, "stopped": eos, "answer": answer,
                          "correct": right}))
    n = len(rows)
    print(json.dumps({"engine": a.engine, "prompts": n, "stopped": stopped, "answered": answered,
                      "correct": correct}))
    return 0 if stopped == answered == n else 1


if __name__ == "__main__":
    sys.exit(main())
