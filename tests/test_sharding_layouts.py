"""Layer maps (:mod:`hf_lars.sharding`): unit tests, and 2-process tests under ZeRO-1/2/3, bf16 and FSDP2.

The distributed test launches ``tests/dist/layouts.py`` once per backend (``torchrun``, 2 processes: gloo on the
CPU, and NCCL on 2 GPUs, marked ``gpu`` and skipped without them): a probe optimizer records the pieces each
rank is handed at ``step()``; the pieces of all ranks, concatenated in rank order, must rebuild every layer
bitwise and its full-batch gradient.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from torch import nn

from hf_lars import AdamLARS, sharding
from hf_lars.layout import Segment, StepLayout, TensorLayout
from hf_lars.optim.ranger_lars import centralize_gradient
from hf_lars.sharding import zero3

from dist.launch import backend_params

# --------------------------------------------------------------------------------------- unit tests


def test_plain_layers_get_trivial_layouts() -> None:
    layers = [torch.zeros(3, 4), torch.zeros(4)]
    layouts = sharding.tensor_layouts([layers[1], layers[0]], layers)
    assert layouts == [TensorLayout.of_layer(1, layers[1]), TensorLayout.of_layer(0, layers[0])]
    assert all(lay.whole for lay in layouts)


def test_replaced_tensors_are_matched_by_position_and_shape() -> None:
    # DeepSpeed's fp16/bf16 stage-0 optimizer steps fp32 copies in the original order.
    layers = [torch.zeros(3, 4), torch.zeros(4)]
    copies = [t.clone() for t in layers]
    assert sharding.tensor_layouts([copies[1]], layers, copies) == [TensorLayout.of_layer(1, copies[1])]


def test_unrecognised_tensor_names_what_was_found_and_what_is_supported() -> None:
    layers = [torch.zeros(3, 4), torch.zeros(4)]
    stranger = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape \(5,\), dtype torch.float64") as info:
        sharding.tensor_layouts([stranger], layers, [stranger])
    message = str(info.value)
    assert "ZeRO-1/2/3" in message and "FSDP2" in message and "Fix:" in message
    # Same position but a different shape is not accepted either.
    with pytest.raises(ValueError, match="cannot tell which layers"):
        sharding.tensor_layouts([torch.zeros(4, 3)], layers, [torch.zeros(4, 3), torch.zeros(4)])


def test_layer_shape_prefers_zero3_ds_shape() -> None:
    p = nn.Parameter(torch.empty(0))
    assert sharding.layer_shape(p) == torch.Size([0])
    p.ds_shape = torch.Size([7, 3])
    assert sharding.layer_shape(p) == torch.Size([7, 3])


@pytest.mark.parametrize(
    ("ds_numel", "n", "rank", "real"),
    [(13, 7, 0, 7), (13, 7, 1, 6), (1, 1, 1, 0), (8, 4, 1, 4), (5, 1, 4, 1), (5, 1, 7, 0)],
)
def test_zero3_real_partition_numel(ds_numel: int, n: int, rank: int, real: int) -> None:
    assert zero3.real_partition_numel(ds_numel, n, rank) == real


class _Fragment:
    """Duck type of DeepSpeed's ``tensor_fragment`` (the two methods hf_lars reads)."""

    def __init__(self, flat: torch.Tensor, start: int, numel: int, layer_offset: int = 0) -> None:
        self.address = types.SimpleNamespace(start=start, numel=numel)
        self.lp_fragment_address = types.SimpleNamespace(start=layer_offset, numel=numel)
        self.hp = flat.narrow(0, start, numel)

    def get_hp_fragment_address(self) -> Any:
        return self.address

    def get_hp_fragment(self) -> torch.Tensor:
        return self.hp


def _linked(
    flat: torch.Tensor, spec: list[tuple[Any, ...]], group: object
) -> list[nn.Parameter]:
    """``spec``: ``(shape, start in flat or None, numel[, offset inside the layer])`` per layer."""
    layers = []
    for shape, start, numel, *offset in spec:
        p = nn.Parameter(torch.zeros(shape))
        p._hp_mapping = None if start is None else _Fragment(flat, start, numel, *offset)
        p._dp_group = group
        layers.append(p)
    return layers


def test_zero12_segments_from_fragment_addresses() -> None:
    group = object()
    flat = torch.zeros(10)
    # layer 0 lives on another rank; layer 1's tail and layer 2's head are here; 1 element of padding.
    layers = _linked(flat, [((4, 4), None, 0), ((3, 5), 0, 6, 9), ((6,), 7, 3, 0)], group)
    (layout,) = sharding.tensor_layouts([flat], layers, [flat])
    assert layout.segments == (Segment(1, 0, 6, 9), Segment(2, 7, 3, 0))
    assert layout.process_group is group and not layout.whole_rows and not layout.dtensor
    step = StepLayout([layout], num_layers=3)
    assert [p.numel() for p in step.pieces([flat])] == [6, 3]


def test_zero12_pieces_of_another_partition_are_an_error() -> None:
    group = object()
    mine, other = torch.zeros(10), torch.zeros(10)
    layers = _linked(other, [((2, 5), 0, 10)], group)
    with pytest.raises(ValueError, match="another flat partition"):
        sharding.tensor_layouts([mine], layers, [mine])


def test_zero12_overlapping_fragments_are_an_error() -> None:
    flat = torch.zeros(10)
    layers = _linked(flat, [((6,), 0, 6), ((6,), 4, 6)], object())
    with pytest.raises(ValueError, match="overlap"):
        sharding.tensor_layouts([flat], layers, [flat])


def test_zero12_rank_without_pieces_still_has_the_group() -> None:
    group = object()
    flat = torch.zeros(4)
    layers = _linked(flat, [((3,), None, 0)], group)
    (layout,) = sharding.tensor_layouts([flat], layers, [flat])
    assert layout.segments == () and layout.process_group is group


def test_zero_detection_by_attributes() -> None:
    p = nn.Parameter(torch.zeros(2, 2))
    assert not sharding.is_deepspeed_zero_param(p)
    p._hp_mapping = None  # ZeRO-1/2 rank without a piece of p: still managed by DeepSpeed
    assert sharding.is_deepspeed_zero_param(p)
    q = nn.Parameter(torch.zeros(2, 2))
    q._z3_optimizer = object()
    assert sharding.is_deepspeed_zero_param(q)


def test_row_centring_completes_rows_cut_between_pieces() -> None:
    """Gradient Centralization on flat pieces (docs/design.md, "Gradient Centralization"): a (3, 4) layer
    split at element 5 across two flat tensors (row 1 cut) and a (2, 3) layer whole in the second, plus a
    1-D layer (not centred); without a process group the cut row's two partial sums meet locally.  Equal
    to centring the whole gradients; the inputs are not modified."""
    g_a, g_b, g_c = torch.randn(3, 4) + 1.0, torch.randn(2, 3) - 2.0, torch.randn(5) + 3.0
    first = g_a.reshape(-1)[:5].clone()
    second = torch.cat([g_a.reshape(-1)[5:], g_b.reshape(-1), g_c])
    layouts = [
        TensorLayout((Segment(0, 0, 5, 0),), whole_rows=False),
        TensorLayout((Segment(0, 0, 7, 5), Segment(1, 7, 6, 0), Segment(2, 13, 5, 0)), whole_rows=False),
    ]
    step = StepLayout(layouts, num_layers=3, layer_shapes=[g_a.shape, g_b.shape, g_c.shape])
    plan = step.row_centring()
    assert plan.num_cut_rows == 1 and not plan.collective
    assert len(plan.cut) == 2 and {c.slot for c in plan.cut} == {0}
    inputs = [first.clone(), second.clone()]
    out = plan.centre(inputs, centralize_gradient)
    assert torch.equal(inputs[0], first) and torch.equal(inputs[1], second)
    got_a = torch.cat([out[0], out[1][:7]]).reshape(3, 4)
    torch.testing.assert_close(got_a, centralize_gradient(g_a))
    torch.testing.assert_close(out[1][7:13].reshape(2, 3), centralize_gradient(g_b))
    assert torch.equal(out[1][13:], g_c)


def test_row_centring_of_whole_rows_is_local() -> None:
    """Pieces that hold whole rows (unsharded, FSDP2 Shard(0)) are centred with the GC function itself."""
    g = torch.randn(4, 3)
    step = StepLayout([TensorLayout.of_layer(0, g)], num_layers=1, layer_shapes=[g.shape])
    plan = step.row_centring()
    assert plan.num_cut_rows == 0 and plan.local_tensors == [0]
    torch.testing.assert_close(plan.centre([g], centralize_gradient)[0], centralize_gradient(g))


# ---------------------------------------------------------------------------- 2 processes, one launch


@pytest.fixture(scope="module", params=backend_params("gloo", "nccl"))
def layouts_run(request: pytest.FixtureRequest) -> dict[str, Any]:
    from dist.launch import torchrun

    return torchrun("layouts.py", backend=request.param)


ENGINE_CASES = [
    "zero1",
    "zero2",
    "zero3",
    "zero1_gc",
    "zero2_gc",
    "zero3_gc",
    "zero3_init_gc",
    "zero2_bf16",
    "zero3_bf16",
    "zero1_bf16_optimizer",
    "fsdp2",
    "fsdp2_swapped",
    "fsdp2_wide",
]


@pytest.mark.distributed
@pytest.mark.parametrize("case", ENGINE_CASES)
def test_pieces_rebuild_every_layer(layouts_run: dict[str, Any], case: str) -> None:
    r = layouts_run[case]
    assert r["calls_per_rank"] == [r["step_calls"]], "ranks made different numbers of step() calls"
    assert r["same_group_order"], "ranks stepped different groups in the same step() call"
    assert r["missing_layers"] == [] and r["wrong_numel"] == []
    assert r["max_abs_weight_err"] == 0.0  # bitwise: the pieces are the layer
    # Gradients: fp32 engines within reduction-order rounding of the full-batch gradient; bf16 within
    # bf16 rounding (a wrong layout gives O(1) errors).
    assert r["max_rel_grad_err"] <= (2e-2 if "bf16" in case else 1e-6)
    assert r["split_layers"], "no layer is split across ranks: the case tests nothing"
    assert r["group_sizes"] == [2]
    if case.startswith("zero"):
        assert r["whole_rows"] == [False]
    else:
        assert r["whole_rows"] == [True]


@pytest.mark.distributed
def test_wrappers_and_padding_are_what_the_cases_claim(layouts_run: dict[str, Any]) -> None:
    assert layouts_run["zero1"]["wrappers"] == ["DeepSpeedZeroOptimizer"]
    assert layouts_run["zero1_bf16_optimizer"]["wrappers"] == ["BF16_Optimizer"]
    assert layouts_run["zero3"]["wrappers"] == ["DeepSpeedZeroOptimizer_Stage3"]
    # several ZeRO-3 sub-groups (sub_group_size 40 < a group's partition) and padding that is skipped
    assert layouts_run["zero3"]["step_calls"] >= 3
    assert layouts_run["zero3"]["padding_elements"] > 0
    assert layouts_run["zero2"]["padding_elements"] > 0


@pytest.mark.distributed
def test_row_centring_completes_cut_rows_under_zero(layouts_run: dict[str, Any]) -> None:
    """The *_gc cases centre each rank's pieces of the reduced gradient with RowCentring (what RangerLARS
    does in step()) and compare with the centred full-batch gradient: rows cut by ZeRO-1/2/3 partition
    boundaries (there are some: asserted) are completed exactly.  FSDP2 (whole rows) is centred locally."""
    for case in ("zero1_gc", "zero2_gc", "zero3_gc", "zero3_init_gc", "zero1_bf16_optimizer"):
        tol = 2e-2 if case == "zero1_bf16_optimizer" else 1e-6
        assert layouts_run[case]["max_rel_grad_err"] <= tol, case
        assert max(layouts_run[case]["cut_rows"]) > 0, f"{case}: no row is cut by a partition boundary"
    assert layouts_run["fsdp2"]["max_rel_grad_err"] <= 1e-6
    assert layouts_run["fsdp2"]["cut_rows"] == [0]
    # Control: without centring the ZeRO gradient is far from the centred one.
    assert layouts_run["zero2_gc_control"]["max_rel_grad_err"] > 0.1


@pytest.mark.distributed
def test_dtensor_placements(layouts_run: dict[str, Any]) -> None:
    d = layouts_run["dtensor"]
    assert d["hsdp_group_size"] == 2 and d["hsdp_whole_rows"] is True
    assert d["shard1_whole_rows"] is False
    assert d["replicate_group"] is True
    assert "2 mesh dimensions" in d["two_shard_dims"]
    assert "Partial" in d["partial"]
    assert "cannot tell which layers" in d["wrong_shape"]


def test_an_optimizer_built_before_an_fsdp1_wrap_refuses_to_step() -> None:
    """FSDP1 (GPU-only in torch 2.13) flattens the optimizer's own parameters into one flat shard per rank and
    marks them; stepping them as whole layers would give per-shard norms, so the step refuses with the fix."""
    from torch.distributed.fsdp import _common_utils

    from hf_lars.sharding import FSDP1_FLATTENED

    assert FSDP1_FLATTENED == _common_utils.FSDP_FLATTENED  # the name FSDP1 really sets
    model = torch.nn.Linear(4, 3)
    opt = AdamLARS(model.parameters(), lr=1e-2)
    for p in model.parameters():
        setattr(p, FSDP1_FLATTENED, True)  # what FullyShardedDataParallel(use_orig_params=True) does
    model(torch.randn(2, 4)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"does not support FSDP1.*fully_shard"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
