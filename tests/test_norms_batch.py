"""The batched step (docs/design.md, "One all-reduce per step() call") under FSDP2 on 2 gloo processes.

``tests/dist/norms_batch.py`` trains the same FSDP2 model (three adapted param groups, rank 1 holding an empty
shard of one) with the batched step and with it switched off; both must end bitwise equal (weights, state,
trust ratios), one with one all-reduce per ``step()``, the other with one per group, and a step skipped with
``found_inf`` must leave weights and state bitwise unchanged in both.  Exactness against unsharded training
is ``tests/test_sharded_exact.py``'s (model ``groups_adapted``).
"""

from __future__ import annotations

import pytest

from dist.launch import torchrun

pytestmark = pytest.mark.distributed

STEPS = 8  # tests/dist/norms_batch.py
GROUPS = 3


def test_batched_step_equals_the_per_group_step() -> None:
    run = torchrun("norms_batch.py")
    assert run["world"] == 2
    assert len(run["cases"]) == 6, sorted(run["cases"])  # 3 optimizers x per-tensor / foreach
    for key, ranks in run["cases"].items():
        for rank, r in enumerate(ranks):
            where = f"{key}, rank {rank}"
            assert not r.get("error"), f"{where}: {r.get('error')}"
            assert r["groups"] == GROUPS
            assert r["calls_batched"] == [1] * STEPS, where
            assert r["calls_per_group"] == [GROUPS] * STEPS, where
            assert r["equal_state"], f"{where}: the batched step changed weights or state"
            assert r["equal_ratios"] and r["ratios"] >= 1, where
            assert r["skip_kept"] == [True, True], f"{where}: a skipped step changed weights or state"
            assert r["moved"] > 1e-4, f"{where}: training barely moved the weights, the comparison is void"
