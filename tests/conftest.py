"""Shared fixtures (the helpers they use, and that test modules import, are in helpers.py)."""

from __future__ import annotations

import concurrent.futures

import pytest

from helpers import QWEN2_KINDS, convert, free_port, qwen2_conversions, qwen2_hf, torchrun


@pytest.fixture(scope="session")
def single_rank():
    """This pytest process as a one-rank gloo job (megatron's parallel state re-initialised per use)."""
    import torch.distributed as dist

    from megatron_rgm import distributed

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield distributed
    distributed.shutdown()


@pytest.fixture(scope="session")
def qwen2_checkpoints(request, tmp_path_factory):
    """The tiny Qwen2 checkpoints of test_best_of_n and test_generate_rollouts: ``{kind: (root, done)}``.

    ``done()`` waits for that kind's conversions (and re-raises their failure, in the module that waits). Only
    the kinds of the selected modules are built. The HF directories are written here, one after the other, on
    this thread (they are seeded: the same bytes as when each module built its own); the conversions are
    children, one chain per kind on a thread of its own that only waits on them, so the second module's
    conversions run beside the first module's children (one thread each, two cores) instead of after them.
    """
    selected = {item.path.stem for item in request.session.items}
    kinds = [kind for kind, module in QWEN2_KINDS.items() if module in selected] or list(QWEN2_KINDS)
    roots = {kind: tmp_path_factory.mktemp(kind) for kind in kinds}
    for kind in kinds:
        qwen2_hf(kind, roots[kind])

    def chain(kind):
        for args in qwen2_conversions(kind, roots[kind]):
            convert(*args)

    with concurrent.futures.ThreadPoolExecutor(len(kinds)) as pool:
        futures = {kind: pool.submit(chain, kind) for kind in kinds}
        yield {kind: (roots[kind], futures[kind].result) for kind in kinds}


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory):
    """The arithmetic task's files (sentencepiece tokenizer, SFT texts, prompts), small."""
    from megatron_rgm.tasks.prepare import prepare

    return prepare(tmp_path_factory.mktemp("task"), seed=0, n_train=100, n_eval=20, n_sft=400)


@pytest.fixture(scope="session")
def tiny_sft(tiny_task, tmp_path_factory):
    """A short SFT run of the tiny preset (two layers): it learns the format and the EOS after the answer.
    Shared by the serving and vLLM tests."""
    out = tmp_path_factory.mktemp("sft") / "sft"
    torchrun("-m megatron_rgm.pretrain", 1, [
        "--preset", "tiny", "--num-layers", "2", "--stage", "sft", "--sft-data", str(tiny_task["sft"]),
        "--tokenizer", str(tiny_task["tokenizer"]), "--train-iters", "150", "--global-batch-size", "16",
        "--micro-batch-size", "16", "--lr", "2e-3", "--lr-warmup-iters", "10", "--log-interval", "50",
        "--save", str(out)])
    return out


@pytest.fixture(scope="session")
def tiny_export(tiny_sft, tmp_path_factory):
    """The short SFT run exported by mcore-to-hf."""
    out = tmp_path_factory.mktemp("export") / "hf"
    convert("mcore-to-hf", "--mcore-path", str(tiny_sft), "--output", str(out))
    return out
