"""Stacked MoE experts are exact under ZeRO-2/3 and FSDP2 (2 CPU processes, gloo): ``tests/dist/moe_exact.py``.

Each engine's launch runs LARS, AdamLARS and RangerLARS (GC on) on a dense-routed MoE with experts stored
``(out, in)`` and ``(in, out)`` (plus per-expert biases), 3 experts 100x apart in scale (FSDP2: 2 on rank 0,
1 on rank 1) and 1 expert (FSDP2: rank 1 holds none), 10 steps, against one process on the whole batch.
Measured (gloo, 2 ranks): relative error per parameter <= 5.4e-7 (LARS), 1.1e-7 (AdamLARS), 3.1e-9
(RangerLARS); the control without the declaration differs by 7e-2 (LARS/AdamLARS) and 1.2e-3 (RangerLARS)
on the 3-expert model.  ZeRO cuts experts (3 per run; asserted) and, for RangerLARS, the columns of a cut
``(in, out)`` expert are completed in the cut-row all-reduce (2 collectives per group step at most);
FSDP2's ``Shard(0)`` never cuts an expert (asserted) and takes one collective per group step at most.
GPT-2's ``Conv1D`` (weights stored ``(in, out)``, found without a declaration) is exact under every engine
(worst relative error 9e-7 AdamLARS, 8e-8 RangerLARS under ZeRO-2 and FSDP2; RangerLARS's control without
``transposed`` 8.5e-4), its columns completed in the one cut-row all-reduce (2 collectives per group step
under ZeRO, column slots asserted); FSDP2 ``Shard(1)``: AdamLARS exact (<= 6e-8), RangerLARS refused by name.
"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.distributed

TOL = 1e-5
_RUNS: dict[str, dict[str, Any]] = {}


def _run(engine: str) -> dict[str, Any]:
    if engine not in _RUNS:
        from dist.launch import torchrun

        _RUNS[engine] = torchrun("moe_exact.py", "--engine", engine, partial=True)
    return _RUNS[engine]


@pytest.mark.parametrize("model", ["moe3", "moe1", "conv1d"])
@pytest.mark.parametrize("optimizer", ["lars", "adam_lars", "ranger_lars"])
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_stacked_experts_exact_under_sharding(engine: str, optimizer: str, model: str) -> None:
    results = _run(engine)
    case = results.get(f"{optimizer}/{model}")
    assert case is not None, results.get("_failure")
    assert "error" not in case, case.get("error")
    worst = max(case["errors"].values())
    assert worst <= TOL, case["errors"]
    if model == "moe3":  # one expert stacked is one layer either way; three 100x apart are not
        assert case["control"] > 100 * TOL, case["control"]
    if (model, optimizer) == ("conv1d", "ranger_lars"):  # orientation only matters to GC (measured 8.5e-4)
        assert case["control"] > 50 * TOL, case["control"]
    gc = 1 if optimizer == "ranger_lars" else 0  # GC's one all-reduce of cut-row / column sums, then the norms
    if model == "conv1d":
        assert case["cut_experts"] == 0
        assert case["calls_per_group"] <= 1 + gc
        if gc:  # ZeRO cuts a Conv1D weight, FSDP2's Shard(0) splits its input rows: its columns are completed
            assert case["column_slots"] > 0
    elif engine == "fsdp2":
        assert case["cut_experts"] == 0  # Shard(0) gives whole experts (2 + 1, or 1 + 0)
        assert case["calls_per_group"] <= 1
    else:
        assert case["cut_experts"] > 0  # a ZeRO partition boundary runs through an expert
        assert case["calls_per_group"] <= 1 + gc
        if gc:
            assert case["column_slots"] > 0  # a cut (in, out) expert's column sums went through the all-reduce


def test_fsdp2_shard1_exact_for_norms_refused_for_gc() -> None:
    """A ``Shard(1)`` placement splits every row of an ``nn.Linear`` weight across ranks: the norms (sums of
    squares) stay exact, Gradient Centralization cannot complete the rows and refuses at the first step,
    naming the parameter, the placement and the fix."""
    results = _run("fsdp2")
    assert "shard1" not in results, results.get("shard1")
    errors = results["shard1/adam_lars"]["errors"]
    assert max(errors.values()) <= TOL, errors
    refused = results["shard1/ranger_lars"]["refused"]
    assert refused is not None, "RangerLARS stepped a Shard(1) parameter"
    for text in ("'fc2.weight'", "shape (4, 6)", "Shard(d) with d > 0", "shard_placement_fn", "use_gc=False"):
        assert text in refused, refused
