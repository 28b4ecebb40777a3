"""Layers stored ``(in, out)``: the group key ``transposed`` for ordinary matrices (transformers' ``Conv1D``,
GPT-2), the same mechanism as stacked experts (docs/design.md, "Mixture-of-experts: stacked layers").

Against the float64 reference (``tests/optim_reference.py``, whose Gradient Centralization centres the rows
of an ``(out, in)`` matrix), a ``Conv1D``-shaped weight ``[in, out]`` in a ``transposed=True`` group gives the
ratios and weights of the equivalent ``nn.Linear`` weight (its transpose), in every implementation; the same
weight undeclared centres the wrong axis (the control).  transformers' ``Conv1D`` weights are found without
user code, through ``build_param_groups`` and a Trainer ``--optim ranger_lars`` run of a tiny GPT-2.
"""

from __future__ import annotations

import math

import pytest
import torch
from optim_reference import ReferenceAdamLARS, ReferenceLARS, ReferenceRangerLARS
from test_moe import CASES, RTOL, _constructor_kwargs
from torch import nn

from hf_lars import build_param_groups, declare_transposed
from hf_lars.integrations.transformers.layers import transposed_parameters

IN, OUT = 6, 4
STEPS = 8  # RangerLARS: 5 unrectified steps, then 3 real ones
REFERENCES = {"lars": ReferenceLARS, "adam_lars": ReferenceAdamLARS, "ranger_lars": ReferenceRangerLARS}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _run(name: str, impl: str, declared: bool) -> tuple[list[dict[str, float]], torch.Tensor, ReferenceRangerLARS]:
    """STEPS steps of a ``[in, out]`` weight (declared or not) beside its reference on the ``(out, in)`` view."""
    cls, _, hp = CASES[name]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(IN, OUT, generator=g, dtype=torch.float64)
    w[:, 1] *= 30.0  # output columns of very different scale: centring the wrong axis shows
    weight = nn.Parameter(w.clone())
    flags = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    group = {"params": [("h.0.attn.c_attn.weight", weight)], **({"transposed": True} if declared else {})}
    opt = cls([group], **flags, **_constructor_kwargs(cls, hp))
    ref = REFERENCES[name](["w"], [w.T.contiguous()], [hp])
    ratios = []
    for _ in range(STEPS):
        gw = torch.randn(IN, OUT, generator=g, dtype=torch.float64) + torch.linspace(-2, 2, OUT, dtype=torch.float64)
        weight.grad = gw.clone()
        opt.step()
        expected = ref.step([gw.T.contiguous()])
        ratios.append({"got": float(opt.trust_ratios()["h.0.attn.c_attn.weight"]), "expected": expected["w"]})
    return ratios, weight.detach(), ref


IMPLS = [(name, impl) for name in CASES for impl in ("loop", "foreach", "fused") if (name, impl) != ("lars", "fused")]


@pytest.mark.parametrize("name,impl", IMPLS)  # LARS has no fused step
def test_conv1d_weight_equals_linear_weight_transposed(name: str, impl: str) -> None:
    ratios, weight, ref = _run(name, impl, declared=True)
    for r in ratios:
        assert math.isclose(r["got"], r["expected"], rel_tol=RTOL), r
    assert _rel(weight.T, ref.weights[0]) <= RTOL


@pytest.mark.parametrize("impl", ["loop", "fused"])
def test_undeclared_conv1d_weight_centres_the_wrong_axis(impl: str) -> None:
    """The control: GC over the dim-0 rows of an ``[in, out]`` weight is not GC of the layer."""
    _, weight, ref = _run("ranger_lars", impl, declared=False)
    assert _rel(weight.T, ref.weights[0]) > 1e3 * RTOL


def _tiny_gpt2() -> nn.Module:
    import transformers as tf

    from dist.hf_common import VOCAB

    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return tf.GPT2LMHeadModel(config)


def _conv1d_weights(model: nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)]


def test_gpt2_conv1d_weights_are_found_as_transposed() -> None:
    model = _tiny_gpt2()
    expected = _conv1d_weights(model)
    assert len(expected) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of two blocks
    assert transposed_parameters(model) == expected
    groups = build_param_groups(model, 0.01)
    transposed = [n for g in groups if g.get("transposed") for n, _ in g["params"]]
    assert transposed == expected  # the Conv1D biases (vectors) and the embeddings stay ordinary
    assert all(g.get("stacked_dim") is None for g in groups)


def test_declare_transposed_groups_a_custom_matrix() -> None:
    class XW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 3))  # used as x @ w
            self.bias = nn.Parameter(torch.zeros(3))
            self.gate = nn.Linear(5, 2)

    model = XW()
    assert declare_transposed(model.w) is model.w
    with pytest.raises(ValueError, match=r"shape \(3,\) is not a matrix"):
        declare_transposed(model.bias)
    groups = build_param_groups(model, 0.01)
    summary = [([n for n, _ in g["params"]], g.get("transposed"), g.get("excluded", False)) for g in groups]
    assert summary == [(["gate.weight"], None, False), (["w"], True, False), (["bias", "gate.bias"], None, True)]


def test_trainer_ranger_lars_finds_gpt2_conv1d_weights(tmp_path) -> None:
    from dist.hf_common import TokenBlocks, tiny_args

    from hf_lars.integrations import transformers as hft

    model = _tiny_gpt2()
    expected = _conv1d_weights(model)
    args = hft.LarsTrainingArguments(**tiny_args(tmp_path, optim="ranger_lars", max_steps=2))
    trainer = hft.LarsTrainer(model=model, args=args, train_dataset=TokenBlocks())
    trainer.train()
    inner = trainer.optimizer.optimizer
    transposed = [g for g in inner.param_groups if g.get("transposed")]
    assert [g["param_names"] for g in transposed] == [expected]
    assert not transposed[0]["excluded"]
    ratios = inner.trust_ratios()
    assert set(expected) <= set(ratios)  # adapted, one ratio each
    assert all(math.isfinite(float(ratios[n])) for n in expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_chunked_step_keeps_the_orientation(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """A group of ``(in, out)`` matrices is still trivial (whole, unsharded layers), so it steps a chunk at a
    time; each chunk centres columns, as one chunk does (fp64; bf16 parameters: fp32 working copies)."""
    import hf_lars.optim.working_copies as wc
    from hf_lars import RangerLARS

    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(IN, OUT, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]
    grads = [[torch.randn(IN, OUT, generator=g, dtype=torch.float64).to(dtype) + 1.0 for _ in weights]
             for _ in range(STEPS)]

    def run(chunk_elements: int, declared: bool = True) -> tuple[list[torch.Tensor], int]:
        monkeypatch.setattr(wc, "CHUNK_ELEMENTS", chunk_elements)
        params = [nn.Parameter(w.clone()) for w in weights]
        opt = RangerLARS([{"params": params, "transposed": declared}], lr=1e-2, k=3, foreach=False)
        for gs in grads:
            for p, gp in zip(params, gs):
                p.grad = gp.clone()
            opt.step()
        ((_, layout, plan, _),) = opt._layout_cache.values()
        assert layout.trivial
        return [p.detach() for p in params], len(wc.chunk_plans(plan, [p.numel() for p in params]))

    chunked, chunks = run(1)
    whole, one = run(1 << 20)
    assert (chunks, one) == (3, 1)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    undeclared, _ = run(1, declared=False)  # the control: the chunks really centre columns
    assert all(not torch.equal(a, b) for a, b in zip(undeclared, chunked))
