"""Layer maps (:mod:`hf_lars.sharding`): unit tests, and 2-process tests under ZeRO-1/2/3, bf16 and FSDP2.

The distributed test launches ``tests/dist/layouts.py`` once (``torchrun``, 2 CPU processes, gloo): a probe
optimizer records the pieces each rank is handed at ``step()``; the pieces of all ranks, concatenated in
rank order, must rebuild every layer bitwise and its full-batch gradient.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from torch import nn

from hf_lars import sharding
from hf_lars.layout import Segment, StepLayout, TensorLayout
from hf_lars.optim.ranger_lars import centralize_gradient
from hf_lars.sharding import zero3

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

    def __init__(self, flat: torch.Tensor, start: int, numel: int) -> None:
        self.address = types.SimpleNamespace(start=start, numel=numel)
        self.hp = flat.narrow(0, start, numel)

    def get_hp_fragment_address(self) -> Any:
        return self.address

    def get_hp_fragment(self) -> torch.Tensor:
        return self.hp


def _linked(
    flat: torch.Tensor, spec: list[tuple[tuple[int, ...], int | None, int]], group: object
) -> list[nn.Parameter]:
    layers = []
    for shape, start, numel in spec:
        p = nn.Parameter(torch.zeros(shape))
        p._hp_mapping = None if start is None else _Fragment(flat, start, numel)
        p._dp_group = group
        layers.append(p)
    return layers


def test_zero12_segments_from_fragment_addresses() -> None:
    group = object()
    flat = torch.zeros(10)
    # layer 0 lives on another rank; layer 1's tail and layer 2's head are here; 1 element of padding.
    layers = _linked(flat, [((4, 4), None, 0), ((3, 5), 0, 6), ((6,), 7, 3)], group)
    (layout,) = sharding.tensor_layouts([flat], layers, [flat])
    assert layout.segments == (Segment(1, 0, 6), Segment(2, 7, 3))
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


def test_gc_hooks_only_touch_deepspeed_parameters() -> None:
    lin = nn.Linear(3, 4)
    handles = sharding.install_grad_centralization_hooks(lin.parameters(), centralize_gradient)
    assert len(handles) == 1  # the weight; the bias is 1-D
    x = torch.randn(5, 3)
    lin(x).pow(2).sum().backward()
    plain = lin.weight.grad.clone()
    assert plain.mean(dim=1).abs().max() > 1e-3  # not centred: no engine manages the parameter
    lin.weight.grad = None
    lin.weight._hp_mapping = None  # now DeepSpeed ZeRO-1/2 "manages" it
    lin(x).pow(2).sum().backward()
    torch.testing.assert_close(lin.weight.grad, centralize_gradient(plain))
    for h in handles:
        h.remove()


def test_gc_hooks_use_the_full_zero3_shape() -> None:
    p = nn.Parameter(torch.empty(0))  # a ZeRO-3 parameter outside forward/backward
    p.ds_shape = torch.Size([4, 3])
    assert len(sharding.install_grad_centralization_hooks([p], centralize_gradient)) == 1
    q = nn.Parameter(torch.empty(0))
    q.ds_shape = torch.Size([12])
    assert sharding.install_grad_centralization_hooks([q], centralize_gradient) == []


# ---------------------------------------------------------------------------- 2 processes, one launch


@pytest.fixture(scope="module")
def layouts_run() -> dict[str, Any]:
    from dist.launch import torchrun

    return torchrun("layouts.py")


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
def test_gc_hooks_centre_before_deepspeed_reduces(layouts_run: dict[str, Any]) -> None:
    # The *_gc cases compare with the centred full-batch gradient: passing means the hooks ran on every
    # rank's gradient before ZeRO-1/2/3 reduced it.  The fsdp2 case installs the hooks too and compares
    # with the uncentred gradient: they must leave FSDP2 alone.
    for case in ("zero1_gc", "zero2_gc", "zero3_gc", "zero3_init_gc"):
        assert layouts_run[case]["max_rel_grad_err"] <= 1e-6, case
    assert layouts_run["fsdp2"]["max_rel_grad_err"] <= 1e-6
    # Control: without the hooks the ZeRO gradient is far from the centred one.
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
