"""Mixture-of-experts: a tensor that stacks experts along dim 0 is one layer per expert (docs/design.md,
"Mixture-of-experts: stacked layers").

Against the float64 reference (``tests/optim_reference.py``), a stacked tensor whose experts' weight norms
differ by 100x (and one expert's gradient by 100x: a rarely routed expert) gives the per-expert ratios and
weights of separate per-expert tensors, for LARS, AdamLARS and RangerLARS (Gradient Centralization per
expert row, or per output column for experts stored ``(in, out)``), in every implementation; without the
declaration the experts share one ratio (the control).  Declarations reach the optimizer the same way
through every front door that builds param groups; bad ones fail at construction.
"""

from __future__ import annotations

import math

import pytest
import torch
from optim_reference import ReferenceAdamLARS, ReferenceLARS, ReferenceRangerLARS
from torch import nn

import hf_lars
from hf_lars import LARS, AdamLARS, RangerLARS, build_param_groups, create_optimizer
from hf_lars.layout import Segment, StepLayout, TensorLayout
from hf_lars.registry import declare_stacked

EXPERTS, OUT, IN = 3, 4, 5
STEPS = 8  # RangerLARS: 5 unrectified steps, then 3 real ones
RTOL = 1e-6  # fp32 working copies of float64 weights, relative per expert after STEPS steps

CASES = {
    "lars": (LARS, ReferenceLARS, dict(lr=0.5, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02, eps=1e-8,
                                       nesterov=False, trust_clip=False, exclude_1d=True, adapt_excluded=True)),
    "adam_lars": (AdamLARS, ReferenceAdamLARS, dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                                                    bias_correction=True, trust_clip=False, trust_bounds=None,
                                                    exclude_1d=True, adapt_excluded=False)),
    "ranger_lars": (RangerLARS, ReferenceRangerLARS, dict(lr=1e-2, betas=(0.95, 0.999), eps=1e-6, weight_decay=0.01,
                                                          use_gc=True, k=3, alpha=0.5, rectify_threshold=5.0,
                                                          exclude_1d=True, adapt_excluded=False,
                                                          degenerated_to_sgd=False)),
}


def _assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Relative error of the whole tensor (one expert) within ``RTOL``."""
    err = float((got.double() - expected.double()).norm() / expected.double().norm())
    assert err <= RTOL, err


def _constructor_kwargs(cls: type, hp: dict) -> dict:
    return {k: v for k, v in hp.items() if k in cls.__init__.__code__.co_varnames}


def _expert(t: torch.Tensor, e: int, transposed: bool) -> torch.Tensor:
    """Expert ``e`` as a separate ``(out, in)`` tensor, the form the reference's GC (over dim 0 rows) expects."""
    return t[e].T if transposed and t.dim() > 2 else t[e]


def _weights_and_grads(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(EXPERTS, OUT, IN, generator=g, dtype=torch.float64)
    w[1] *= 100.0  # the experts' weight norms differ by 100x
    bias = torch.randn(EXPERTS, OUT, generator=g, dtype=torch.float64)
    grads = []
    for _ in range(STEPS):
        gw = torch.randn(EXPERTS, OUT, IN, generator=g, dtype=torch.float64)
        gw[2] *= 0.01  # a rarely routed expert: a 100x smaller gradient
        grads.append(gw)
    return w, bias, grads


@pytest.mark.parametrize("impl", ["loop", "foreach"])
@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "in_out"])
@pytest.mark.parametrize("name", list(CASES))
def test_stacked_experts_equal_separate_tensors(name: str, transposed: bool, impl: str) -> None:
    cls, ref_cls, hp = CASES[name]
    w, bias, grads = _weights_and_grads()
    weight = nn.Parameter(w.clone())
    stacked_bias = nn.Parameter(bias.clone())  # [experts, out]: each expert's bias is 1-D, so excluded
    plain = nn.Parameter(w[0].clone())  # an ordinary matrix beside the experts (the router)
    opt = cls(
        [
            {"params": [("experts.w", weight), ("experts.b", stacked_bias)], "stacked_dim": 0,
             "transposed": transposed},
            {"params": [("router.weight", plain)]},
        ],
        foreach=impl == "foreach",
        **_constructor_kwargs(cls, hp),
    )
    names = [f"experts.w[{e}]" for e in range(EXPERTS)] + [f"experts.b[{e}]" for e in range(EXPERTS)] + ["router"]
    ref = ref_cls(
        names,
        [_expert(w, e, transposed) for e in range(EXPERTS)] + [bias[e] for e in range(EXPERTS)] + [w[0]],
        [hp] * len(names),
    )
    for gw in grads:
        weight.grad, stacked_bias.grad, plain.grad = gw.clone(), gw[:, :, 0].clone(), gw[1].clone()
        opt.step()
        expected = ref.step(
            [_expert(gw, e, transposed) for e in range(EXPERTS)] + [gw[e, :, 0] for e in range(EXPERTS)] + [gw[1]]
        )
        got = opt.trust_ratios()
        assert set(got) == {k.replace("router", "router.weight") for k in expected}
        for key, value in expected.items():
            assert math.isclose(float(got[key.replace("router", "router.weight")]), value, rel_tol=RTOL), key
    spread = [expected[f"experts.w[{e}]"] for e in range(EXPERTS)]
    assert max(spread) / min(spread) > 5.0, spread  # the experts' ratios really differ
    for e in range(EXPERTS):
        _assert_close(_expert(weight.detach(), e, transposed), ref.weights[e])
        _assert_close(stacked_bias.detach()[e], ref.weights[EXPERTS + e])
    _assert_close(plain.detach(), ref.weights[-1])


@pytest.mark.parametrize("name,transposed", [("ranger_lars", True), ("adam_lars", False)])
def test_fused_stacked_experts_equal_eager(name: str, transposed: bool) -> None:
    cls, _, hp = CASES[name]
    w, _, grads = _weights_and_grads()
    params = [nn.Parameter(w.clone()) for _ in range(2)]
    opts = [
        cls([{"params": [p], "stacked_dim": 0, "transposed": transposed}], **flags, **_constructor_kwargs(cls, hp))
        for p, flags in zip(params, [{"foreach": False}, {"fused": True}])
    ]
    for gw in grads:
        for p, opt in zip(params, opts):
            p.grad = gw.clone()
            opt.step()
    for e in range(EXPERTS):
        _assert_close(params[1].detach()[e], params[0].detach()[e])
    assert len(opts[1].trust_ratios()) == EXPERTS


def test_without_declaration_experts_share_one_ratio() -> None:
    """The control: the same tensor undeclared is one layer, so the 100x-apart experts get one ratio."""
    cls, ref_cls, hp = CASES["adam_lars"]
    w, _, grads = _weights_and_grads()
    weight = nn.Parameter(w.clone())
    opt = cls([("experts.w", weight)], **_constructor_kwargs(cls, hp))
    ref = ref_cls([f"e{e}" for e in range(EXPERTS)], [w[e] for e in range(EXPERTS)], [hp] * EXPERTS)
    weight.grad = grads[0]
    opt.step()
    expected = ref.step([grads[0][e] for e in range(EXPERTS)])
    assert list(opt.trust_ratios()) == ["experts.w"]
    shared = float(opt.trust_ratios()["experts.w"])
    assert all(not math.isclose(shared, v, rel_tol=0.05) for v in expected.values())


def test_unnamed_experts_are_named_by_index() -> None:
    opt = AdamLARS([{"params": [torch.zeros(2, 2, requires_grad=True)]},
                    {"params": [nn.Parameter(torch.randn(3, 2, 2))], "stacked_dim": 0}])
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()
    assert sorted(opt.trust_ratios()) == ["0", "1[0]", "1[1]", "1[2]"]


# ------------------------------------------------------------------------------- Gradient Centralization
def test_column_centring_completes_cut_experts() -> None:
    """Experts stored (in, out), cut into pieces at arbitrary offsets (as a ZeRO partition cuts them): each
    output column is centred over the whole expert, also when its elements lie in several pieces."""
    rows, cols = 5, 4
    g = torch.randn(2, rows * cols, dtype=torch.float32)
    flat = g.reshape(-1).clone()
    cuts = [0, 7, 13, 26, 40]  # pieces of 7, 6, 13, 14 elements: rows and both experts cut
    halves = [flat[:13].clone(), flat[13:].clone()]
    layouts = []
    for t_idx, (lo, hi) in enumerate([(0, 13), (13, 40)]):
        segments = []
        for a, b in zip(cuts, cuts[1:]):
            a, b = max(a, lo), min(b, hi)
            if a >= b:
                continue
            while a < b:
                e = a // (rows * cols)
                end = min(b, (e + 1) * rows * cols)
                segments.append(Segment(e, a - lo, end - a, a - e * rows * cols))
                a = end
        layouts.append(TensorLayout(tuple(segments), whole_rows=False))
    layout = StepLayout(layouts, 2, layer_shapes=[torch.Size([rows, cols])] * 2, layer_transposed=[True, True])
    plan = layout.row_centring()
    assert plan.num_slots == 2 * cols and plan.num_cut_rows == 0  # both experts cut, column sums completed
    centred = torch.cat(plan.centre(halves, lambda t: t))
    expected = torch.cat([(m - m.mean(dim=0, keepdim=True)).reshape(-1) for m in g.view(2, rows, cols)])
    torch.testing.assert_close(centred, expected)


# ------------------------------------------------------------------------------------ bad declarations
@pytest.mark.parametrize(
    "group,match",
    [
        ({"params": [torch.zeros(3, 2, 2)], "stacked_dim": 3}, r"shape \(3, 2, 2\) \(dimension out of range"),
        ({"params": [torch.zeros(3, 2, 2)], "stacked_dim": -4}, r"dimension out of range"),
        ({"params": [torch.zeros(4)], "stacked_dim": 0}, r"shape \(4,\): a tensor with 1 dimension\(s\) cannot stack"),
        ({"params": [torch.zeros(3, 2, 2)], "stacked_dim": 1}, r"only the leading dimension \(0\) can stack"),
        ({"params": [torch.zeros(3, 2, 2)], "stacked_dim": True}, r"Invalid stacked_dim value: True"),
        ({"params": [torch.zeros(3, 2, 2)], "stacked_dim": "0"}, r"Invalid stacked_dim value: '0'"),
        ({"params": [torch.zeros(3, 2, 2)], "stacked_dim": 0, "transposed": 1}, r"Invalid transposed value: 1"),
        ({"params": [torch.zeros(3, 2)], "transposed": "yes"}, r"Invalid transposed value: 'yes'"),
    ],
)
@pytest.mark.parametrize("cls", [LARS, AdamLARS, RangerLARS])
def test_bad_declarations_fail_at_construction(cls: type, group: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls([dict(group)], lr=0.1)  # a copy: torch fills a group's defaults in place
    opt = cls([torch.zeros(2, 2, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group(dict(group))
    assert len(opt.param_groups) == 1  # a rejected group leaves the optimizer as it was


def test_bad_declaration_names_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"parameter 'experts\.scale' of shape \(3,\)"):
        AdamLARS([{"params": [("experts.w", torch.zeros(3, 2, 2)), ("experts.scale", torch.zeros(3))], "stacked_dim": 0}])
    with pytest.raises(ValueError, match=r"cannot stack layers"):
        declare_stacked(nn.Parameter(torch.zeros(5)))


# ------------------------------------------------------------------------------------- front doors
class CustomExperts(nn.Module):
    """A user's own MoE layer: experts stacked along dim 0, ``w_in`` (out, in), ``w_out`` (in, out)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(4, 3)
        self.w_in = nn.Parameter(torch.randn(3, 6, 4))
        self.w_out = nn.Parameter(torch.randn(3, 6, 4))
        self.bias = nn.Parameter(torch.zeros(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.softmax(self.router(x), dim=-1)
        h = torch.einsum("bi,eoi->beo", x, self.w_in).relu()
        return (gate.unsqueeze(-1) * (torch.einsum("beo,eoi->bei", h, self.w_out) + self.bias)).sum(1)


def _declared_model() -> CustomExperts:
    torch.manual_seed(0)
    model = CustomExperts()
    declare_stacked(model.w_in)
    declare_stacked(model.w_out, transposed=True)
    declare_stacked(model.bias, transposed=True)
    return model


def _group_summary(groups: list[dict]) -> list[tuple]:
    out = []
    for g in groups:
        names = [n for n, _ in g["params"]] if isinstance(g["params"][0], tuple) else g.get("param_names")
        out.append((tuple(names), g.get("stacked_dim"), g.get("transposed"), g.get("excluded", False)))
    return out


def test_build_param_groups_takes_declared_stacked_parameters() -> None:
    groups = build_param_groups(_declared_model(), 0.01)
    assert _group_summary(groups) == [
        (("router.weight",), None, None, False),
        (("w_in",), 0, False, False),
        (("w_out",), 0, True, False),
        (("router.bias",), None, None, True),
        (("bias",), 0, True, True),
    ]


def test_every_front_door_gives_the_same_steps() -> None:
    """Group keys written by hand, build_param_groups + the class, and create_optimizer: equal results."""
    x = torch.randn(8, 4)

    def train(make: object) -> tuple[dict, dict]:
        model = _declared_model()
        opt = make(model)  # type: ignore[operator]
        for _ in range(6):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return {n: p.detach().clone() for n, p in model.named_parameters()}, {k: float(v) for k, v in opt.trust_ratios().items()}

    def by_hand(model: CustomExperts) -> torch.optim.Optimizer:
        return RangerLARS(
            [
                {"params": [("router.weight", model.router.weight)]},
                {"params": [("w_in", model.w_in)], "stacked_dim": 0},
                {"params": [("w_out", model.w_out)], "stacked_dim": 0, "transposed": True},
                {"params": [("router.bias", model.router.bias)], "weight_decay": 0.0, "excluded": True},
                {"params": [("bias", model.bias)], "weight_decay": 0.0, "excluded": True, "stacked_dim": 0,
                 "transposed": True},
            ],
            lr=1e-2, weight_decay=0.01, k=2,
        )

    results = [
        train(by_hand),
        train(lambda m: RangerLARS(build_param_groups(m, 0.01), lr=1e-2, weight_decay=0.01, k=2)),
        train(lambda m: create_optimizer(m, "ranger_lars", lr=1e-2, weight_decay=0.01, k=2)),
    ]
    assert sorted(results[0][1]) == sorted([f"w_in[{e}]" for e in range(3)] + [f"w_out[{e}]" for e in range(3)]
                                           + ["router.weight"])
    for weights, ratios in results[1:]:
        assert ratios == results[0][1]
        for n, w in weights.items():
            torch.testing.assert_close(w, results[0][0][n], rtol=0, atol=0)


def test_declarations_are_not_hyperparameters_of_the_constructor() -> None:
    """``--optim_args`` and DeepSpeed JSON ``params`` are constructor arguments, the same for every tensor:
    they cannot say which tensors stack experts, so the declaration is refused there with the valid keys."""
    from hf_lars.integrations.transformers.optim_args import parse_optim_args

    with pytest.raises(TypeError):
        AdamLARS([torch.zeros(3, 2, 2, requires_grad=True)], stacked_dim=0)
    with pytest.raises(ValueError, match="Unknown key 'stacked_dim'"):
        parse_optim_args("stacked_dim=0", "adam_lars")


def test_state_dict_round_trip_keeps_the_declaration() -> None:
    model = _declared_model()
    opt = AdamLARS(build_param_groups(model, 0.01))
    model(torch.randn(4, 4)).sum().backward()
    opt.step()
    again = AdamLARS(build_param_groups(model, 0.01))
    again.load_state_dict(opt.state_dict())
    assert [g.get("stacked_dim") for g in again.param_groups] == [None, 0, 0, None, 0]
    model(torch.randn(4, 4)).sum().backward()
    again.step()
    assert len(again.trust_ratios()) == 7


# ------------------------------------------------------------------------------ transformers models
def _tiny(family: str, vocab_size: int = 32) -> nn.Module:
    import transformers as tf

    base = dict(hidden_size=16, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=vocab_size)
    configs = {
        "mixtral": (tf.MixtralConfig, dict(num_local_experts=3)),
        "qwen2_moe": (tf.Qwen2MoeConfig, dict(num_experts=3, moe_intermediate_size=8, shared_expert_intermediate_size=8)),
        "qwen3_moe": (tf.Qwen3MoeConfig, dict(num_experts=3, moe_intermediate_size=8)),
        "olmoe": (tf.OlmoeConfig, dict(num_experts=3, eos_token_id=1, pad_token_id=0)),
        "deepseek_v3": (tf.DeepseekV3Config, dict(n_routed_experts=3, moe_intermediate_size=8, first_k_dense_replace=0,
                                                  q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4,
                                                  qk_nope_head_dim=4, v_head_dim=4, n_group=1, topk_group=1,
                                                  num_experts_per_tok=2)),
        "gpt_oss": (tf.GptOssConfig, dict(num_local_experts=3, num_experts_per_tok=2, head_dim=8)),
        "llama4": (tf.Llama4TextConfig, dict(num_local_experts=3, intermediate_size_mlp=16, head_dim=8)),
    }
    cls, extra = configs[family]
    config = cls(**{**base, **extra})
    torch.manual_seed(0)
    return tf.Llama4ForCausalLM(config) if family == "llama4" else tf.AutoModelForCausalLM.from_config(config)


# family -> (experts module path, {parameter: stored (in, out)}), read from each model's forward
MOE_FAMILIES = {
    "mixtral": ("mlp.experts", {"gate_up_proj": False, "down_proj": False}),
    "qwen2_moe": ("mlp.experts", {"gate_up_proj": False, "down_proj": False}),
    "qwen3_moe": ("mlp.experts", {"gate_up_proj": False, "down_proj": False}),
    "olmoe": ("mlp.experts", {"gate_up_proj": False, "down_proj": False}),
    "deepseek_v3": ("mlp.experts", {"gate_up_proj": False, "down_proj": False}),
    "gpt_oss": ("mlp.experts", {"gate_up_proj": True, "gate_up_proj_bias": True, "down_proj": True,
                                "down_proj_bias": True}),
    "llama4": ("feed_forward.experts", {"gate_up_proj": True, "down_proj": True}),
}


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_transformers_moe_experts_are_found(family: str) -> None:
    from hf_lars.integrations.transformers.layers import stacked_parameters

    model = _tiny(family)
    path, expected = MOE_FAMILIES[family]
    found = stacked_parameters(model)
    assert found == {f"model.layers.0.{path}.{n}": t for n, t in expected.items()}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for n in found:
        assert shapes[n][0] == 3
    routers = [n for n, s in shapes.items() if len(s) == 2 and s[0] == 3 and n not in found]
    assert routers, "the router weight [num_experts, hidden] stays an ordinary layer"
    groups = build_param_groups(model, 0.01)
    stacked = {n for g in groups if g.get("stacked_dim") == 0 for n, _ in g["params"]}
    assert stacked == set(found)


def test_mixtral_expert_orientation_is_out_in() -> None:
    """Checked numerically: expert e of gate_up_proj maps hidden -> 2*intermediate as F.linear(x, W[e])."""
    model = _tiny("mixtral")
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(1, 16)
    w = experts.gate_up_proj[0]
    assert w.shape == (24, 16) and nn.functional.linear(x, w).shape == (1, 24)


def test_trainer_adam_lars_finds_mixtral_experts(tmp_path) -> None:
    from dist.hf_common import VOCAB, TokenBlocks, tiny_args

    from hf_lars.integrations import transformers as hft

    model = _tiny("mixtral", VOCAB)
    args = hft.LarsTrainingArguments(**tiny_args(tmp_path, optim="adam_lars", max_steps=2))
    trainer = hft.LarsTrainer(model=model, args=args, train_dataset=TokenBlocks())
    trainer.train()
    inner = trainer.optimizer.optimizer
    stacked = [g for g in inner.param_groups if g.get("stacked_dim") == 0]
    assert [g["param_names"] for g in stacked] == [
        ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    ]
    ratios = inner.trust_ratios()
    experts = sorted(n for n in ratios if "experts" in n)
    assert experts == sorted(f"model.layers.0.mlp.experts.{p}[{e}]" for p in ("gate_up_proj", "down_proj")
                             for e in range(3))
    plain = sum(len(g["params"]) for g in inner.param_groups if g.get("stacked_dim") is None and not g["excluded"])
    assert len(ratios) == plain + 6  # every ordinary adapted matrix, and one ratio per expert


def test_public_surface() -> None:
    assert hf_lars.registry.declare_stacked is declare_stacked
    assert hf_lars.declare_transposed is hf_lars.registry.declare_transposed
