"""The frozen KL reference offloaded to host memory between its forwards (``--offload-reference``)."""

from __future__ import annotations

import pytest
import torch

from megatron_rgm.training.step import offload_weights, onload_weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (offloading moves GPU weights)")
def test_offload_frees_the_weights_and_onload_restores_them_exactly():
    module = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 8)).cuda().bfloat16()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    expected = module(x)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    offload_weights([module])
    assert all(p.device.type == "cpu" and p.is_pinned() for p in module.parameters())
    assert torch.cuda.memory_allocated() <= allocated - 1024 * 1024 * 2  # the first weight's bytes at least
    for _ in range(2):  # the pinned copy is kept: a second round trip copies nothing back
        onload_weights([module])
        assert all(p.device.type == "cuda" for p in module.parameters())
        assert torch.equal(module(x), expected)
        offload_weights([module])
    onload_weights([module])
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_on_a_cpu_run_offloading_changes_nothing():
    module = torch.nn.Linear(8, 8)
    weight = module.weight
    offload_weights([module])
    onload_weights([module])
    assert module.weight is weight and module.weight.device.type == "cpu"
    assert not hasattr(module.weight, "_rgm_host")
