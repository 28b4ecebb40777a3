"""Accelerate's FSDP2 plugin path (``fsdp_version: 2``) on GPUs with hf_lars optimizers equals an unsharded run.

``accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes N tests/dist/e2e_fsdp2.py`` with
N = 2 when there are at least 2 GPUs, else 1 (one process still trains DTensor parameters: FSDP2 shards over a mesh
of one).  Accelerate builds the FSDP2 state from the shipped yaml itself (transformer-based wrap of
``LlamaDecoderLayer``, CPU-RAM-efficient loading, reshard after forward); ``prepare`` swaps the optimizer's
tensors for DTensors, which hf_lars maps back to layers by position in ``group["params"]``.  Every rank also trains
an unsharded copy on the whole global batch; weights, losses and trust ratios must agree.

The same script runs on the CPU in ``tests/test_e2e_zero.py`` (the FSDP state set by hand there).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA: Accelerate enables FSDP2 only on GPU backends"
    ),
]

LOSS_RTOL = 1e-5  # the two runs multiply matrices of other shapes (4 vs 4 * N rows): other cuBLAS kernels
WEIGHT_ATOL = 2e-5  # final fp32 weights (TF32 off); training moves them by 1e-3 to 4e-2
RATIO_RTOL = 1e-4
MIN_MOVED = 5e-4


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    from dist.e2e_launch import accelerate_launch

    n = min(2, torch.cuda.device_count())
    result = accelerate_launch("recipes/accelerate/fsdp2.yaml", "e2e_fsdp2.py", num_processes=n, timeout=600)
    result["_expected_processes"] = n
    return result


def test_accelerate_built_an_fsdp2_state_from_the_yaml(runs: dict[str, Any]) -> None:
    assert "_failure" not in runs, runs["_failure"]
    assert runs["distributed_type"] == "DistributedType.FSDP"
    assert runs["is_fsdp2"] and runs["fsdp_version"] == 2
    assert runs["num_processes"] == runs["_expected_processes"]
    assert runs["device"].startswith("cuda")


@pytest.mark.parametrize("optim", ["adam_lars", "ranger_lars", "lars"])
def test_fsdp2_matches_unsharded(runs: dict[str, Any], optim: str) -> None:
    assert optim in runs, runs.get("_failure", sorted(runs))
    got = runs[optim]
    assert got["model_class"].startswith("FSDP") and got["dtensor_params"]
    assert got["param_device"].startswith("cuda")
    assert got["placements"] == ["(Shard(dim=0),)"]
    assert got["optimizer_swapped"], "prepare should have swapped the optimizer's tensors for the DTensors"
    assert got["names_match"] and got["ratio_layers"] and got["ratio_layers"] == got["ref_ratio_layers"]
    assert got["losses"] == pytest.approx(got["ref_losses"], rel=LOSS_RTOL)
    assert got["ratio_max_rel_diff"] <= RATIO_RTOL
    assert got["moved"] > MIN_MOVED
    assert got["max_abs_diff"] <= WEIGHT_ATOL
