"""megatron_rgm.cpu: what it patches, that each patch does its job, and that it stays off with CUDA."""

from __future__ import annotations

import sys

import pytest
import torch

from helpers import finish, start, stop
from megatron_rgm import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mapping is inactive with CUDA")


@pytest.fixture(scope="module")
def patches():
    return cpu.activate()


def test_every_patch_is_listed_with_a_reason(patches):
    assert cpu.is_active()
    targets = {p.target for p in patches}
    for expected in ("torch.cuda.current_device", "torch.cuda.get_rng_state", "torch.zeros",
                     "torch.Tensor.type", "megatron.core.tensor_parallel.random._set_cuda_rng_state"):
        assert expected in targets
    assert all(p.reason for p in patches)
    assert cpu.activate() == patches  # idempotent


def test_cuda_literals_land_on_the_cpu(patches):
    for t in (torch.zeros(2, device="cuda"), torch.tensor([1], device=torch.device("cuda", 0)),
              torch.empty(3, device=torch.cuda.current_device()), torch.ones(2).cuda(),
              torch.ones(2).to("cuda"), torch.arange(3, device="cuda:0"),
              torch.tensor([1.0], device="cuda", pin_memory=True)):
        assert t.device.type == "cpu"
    x = torch.ones(2)
    assert x.to(torch.float64).dtype == torch.float64
    torch.cuda.synchronize()


def test_tensor_type_answers_cuda_names(patches):
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type("torch.cuda.HalfTensor").dtype == torch.float16


def test_megatron_rng_tracker_forks_the_cpu_generator(patches, single_rank):
    from megatron.core import tensor_parallel

    single_rank.initialize()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "the fork did not restore the default generator"
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b), "the forked state did not advance"
    single_rank.initialize()  # re-seeds
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a), "re-seeding did not reproduce the forked stream"


# Two checks in fresh interpreters (the patches last for the life of a process): both are started with this
# module's first test and collected by their own; most of each is imports, so they run beside each other.
CHILDREN = {
    "inactive_when_cuda_is_available": (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "from megatron_rgm import cpu\n"
        "assert cpu.activate() == [] and not cpu.is_active()\n"
        "assert not getattr(torch.zeros, '__rgm_cpu_patch__', False)\n"
        "print('ok')\n"
    ),
    "activate_before_importing_megatron": (
        "from megatron_rgm import cpu\n"
        "cpu.activate()\n"
        "import torch._dynamo, megatron.core\n"
        "from megatron.core.models.gpt import GPTModel\n"
        "print('ok')\n"
    ),
}


@pytest.fixture(scope="module", autouse=True)
def children():
    procs = {name: start([sys.executable, "-c", code]) for name, code in CHILDREN.items()}
    try:
        yield procs
    finally:
        stop(procs.values())


def test_inactive_when_cuda_is_available(children):
    out = finish(children["inactive_when_cuda_is_available"], timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_activate_before_importing_megatron(children):
    out = finish(children["activate_before_importing_megatron"], timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
