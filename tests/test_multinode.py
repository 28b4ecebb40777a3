"""Two "nodes" of one process each (``torchrun --nnodes 2 --node_rank {0,1}`` on 127.0.0.1) running ZeRO-2
with every hf_lars optimizer: the result equals one process on the same global batches.

The same script as ``test_sharded_exact.py`` (``tests/dist/exact.py``), on the one-group model whose every
rank holds adapted pieces; what this adds is the multi-node rendezvous (two launchers, node ranks,
``LOCAL_RANK`` 0 on both "nodes", DeepSpeed choosing its inter-node path).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.distributed

OPTIMIZERS = ("lars", "adam_lars", "ranger_lars")


@pytest.fixture(scope="module")
def two_nodes() -> dict[str, Any]:
    from dist.launch import HERE, free_port, run_procs

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmds = [
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                str(HERE / "exact.py"),
                "--engine",
                "zero2",
                "--models",
                "single",
                "--out",
                str(out),
            ]
            for node in (0, 1)
        ]
        return run_procs(cmds, out)


def test_two_nodes_were_used(two_nodes: dict[str, Any]) -> None:
    assert two_nodes["world"] == 2
    assert two_nodes["nodes"] == 2 and two_nodes["local_world_size"] == 1


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_two_nodes_match_one_process(two_nodes: dict[str, Any], opt: str) -> None:
    case = two_nodes["cases"][f"{opt}/single"]
    assert "error" not in case, case.get("error")
    assert max(case["moved"].values()) > 0.05
    assert case["max_rel_err"] <= 1e-5, case["rel_err"]
    # one all-reduce for the norms, plus RangerLARS's cut-row sums of Gradient Centralization where a row is cut
    for s in case["step_calls"]:
        assert s["calls"] == 1 + s["gc_collectives"] and s["gc_collectives"] == (s["cut_rows"] > 0), s
        assert s["payload"] <= max(s["max_payload"], s["cut_rows"]), s
