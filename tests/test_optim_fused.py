"""The fused path (``fused=True``, ``optim/fused.py``) equals the eager path, never syncs, never recompiles.

Compilation dominates the cost of these tests (~2-7 s per compiled function on 2 CPU cores, cold; inductor's
on-disk cache makes later runs faster), so the cases are the reference inputs whose *structure* differs
(the branches the generated code takes: weight decay on some pieces only, an ``excluded=True`` group,
Nesterov, no momentum, trust clip/bounds, no bias correction, GC, RangerLARS's unrectified phase with and
without ``degenerated_to_sgd``, several param groups), and later tests reuse functions compiled by earlier
ones.  Measured on the 2-core VM (shared with two other jobs): 30 tests in ~35 s with inductor's disk cache
warm, ~140 s cold (empty ``TORCHINDUCTOR_CACHE_DIR``, load average ~2).

Tolerances: fused vs eager on fp32 parameters ``RTOL = 1e-6`` of each tensor's scale after 10 steps
(measured ~1e-7: inductor orders a few operations differently, e.g. sums of squares instead of norms); the
trust ratios to ``RTOL`` of ``max(|ratio|, 1)`` (LARS adapts the 0-d ``scale``, whose weight crosses 0 in
these 10 steps: its ratio ``~|w|`` keeps the weights' absolute, not relative, rounding).
bf16/fp16 parameters: the same in the fp32 optimizer state, and the parameters to one unit in the last place
of their dtype (fp32 results that differ by rounding may round to neighbouring bf16 values).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch

from hf_lars.layout import Segment, StepLayout, TensorLayout
from hf_lars.optim import fused
from hf_lars.optim.fused_runs import run_pieces, runs_of, spread, with_decay
from hf_lars.optim.adam_lars import AdamLarsHyper, adam_lars
from hf_lars.optim.lars import LarsHyper, lars
from hf_lars.optim.ranger_lars import RangerLarsHyper, centralize_gradient, ranger_lars
from hf_lars.optim.trust import StepPlan
from optim_cases import INFO, OPTIMIZERS, OptimizerInput, assert_close_scaled, build, make_grads, state_snapshot

RTOL = 1e-6
STEPS = 10

# (optimizer, reference input description, whether steps 2 and 4 take zero / None gradients).  Param groups
# are stepped one call each, the same code for every rule: LARS's groups case covers them.
# LARS's inputs with weight decay adapt the 1-D layers without decaying them (its default): the ratio takes
# the per-piece weight-decay vector.  The "groups excluded" inputs hold an ``excluded=True`` group (and
# adapted-but-excluded ones).  RangerLARS's 10 steps cross the unrectified phase (rho_t > 5 from step 6).
CASES = [
    ("LARS", "nesterov", True),
    ("LARS", "trust_clip", False),
    ("LARS", "no momentum, eps 0.5", False),
    ("LARS", "groups excluded, adapt_excluded False/True", False),
    ("AdamLARS", "trust_bounds", True),
    ("AdamLARS", "no bias correction, eps 0.1", False),
    ("AdamLARS", "groups excluded, adapt_excluded False/True", False),
    ("RangerLARS", "default hyper-parameters", True),
    ("RangerLARS", "degenerated_to_sgd", False),
    ("RangerLARS", "no GC, eps 0.1", False),
]


def _input(name: str, desc: str) -> OptimizerInput:
    return next(inp for inp in INFO[name].inputs if inp.desc == desc)


def _pair(name: str, desc: str, dtype: torch.dtype):
    """(eager per-tensor run, fused run) of one reference input."""
    info, inp = INFO[name], _input(name, desc)
    eager = build(info, inp, dtype=dtype, foreach=False)
    fused_inp = OptimizerInput(inp.desc, {**inp.kwargs, "fused": True}, inp.groups)
    return eager, build(info, fused_inp, dtype=dtype)


def _step_both(runs, step: int, dtype: torch.dtype, special: bool) -> None:
    grads = [None if g is None else g.to(dtype) for g in make_grads(step, special=special)]
    for run in runs:
        run.set_grads(grads)
        run.opt.step()


def _assert_runs_close(eager, fast, what: str, param_rtol: float = RTOL) -> None:
    for name, a, b in zip(eager.names, eager.params, fast.params):
        assert_close_scaled(b, a, param_rtol, f"{what}: {name}", floor=float(a.detach().abs().max()))
    sa, sb = state_snapshot(eager.opt), state_snapshot(fast.opt)
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for key in sa[i]:
            assert sb[i][key].dtype == sa[i][key].dtype == torch.float32, key
            assert_close_scaled(sb[i][key], sa[i][key], RTOL, f"{what}: state {key} of param {i}")
    ra, rb = eager.opt.trust_ratios(), fast.opt.trust_ratios()
    assert ra.keys() == rb.keys() and ra
    for key in ra:  # floor 1: the 0-d ``scale`` (adapted by LARS) crosses 0, where |w| loses digits
        assert abs(float(rb[key]) - float(ra[key])) <= RTOL * max(abs(float(ra[key])), 1.0), key


@pytest.mark.parametrize(("name", "desc", "special"), CASES, ids=[f"{n}-{d}" for n, d, _ in CASES])
def test_fused_matches_eager(name: str, desc: str, special: bool) -> None:
    """fp32, 10 steps (and a zero gradient at step 2 and grad=None at step 4 where ``special``): parameters,
    every state tensor and the trust ratios equal the eager per-tensor path."""
    runs = _pair(name, desc, torch.float32)
    for step in range(1, STEPS + 1):
        _step_both(runs, step, torch.float32, special)
        _assert_runs_close(*runs, f"step {step}")


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("RangerLARS", torch.bfloat16), ("LARS", torch.float16)],  # RangerLARS runs AdamLARS's passes too
    ids=["RangerLARS-bf16", "LARS-fp16"],
)
def test_fused_low_precision_parameters(name: str, dtype: torch.dtype) -> None:
    """bf16/fp16 parameters stay in their dtype, state is fp32, and both match the eager path (fp32 math)."""
    desc = INFO[name].inputs[1].desc
    runs = _pair(name, desc, dtype)
    ulp = torch.finfo(dtype).eps
    for step in range(1, STEPS + 1):
        _step_both(runs, step, dtype, special=False)
    assert all(p.dtype == dtype for p in runs[1].params)
    _assert_runs_close(*runs, f"{dtype}", param_rtol=ulp)


def test_schedules_do_not_recompile() -> None:
    """lr changes every step and step counts grow: no new compiled function and no dynamo recompilation."""
    from torch._dynamo.utils import counters

    runs = _pair("AdamLARS", "trust_bounds", torch.float32)  # compiled by test_fused_matches_eager
    _step_both(runs, 1, torch.float32, special=False)
    before = (fused.compile_stats()["functions"], counters["stats"]["unique_graphs"])
    with torch.compiler.set_stance("fail_on_recompile"):
        for step in range(2, STEPS + 2):
            for run in runs:
                run.opt.param_groups[0]["lr"] = 0.05 / step
            _step_both(runs, step, torch.float32, special=False)
    assert (fused.compile_stats()["functions"], counters["stats"]["unique_graphs"]) == before
    _assert_runs_close(*runs, "after an lr schedule")


@contextlib.contextmanager
def _host_reads_raise() -> Iterator[None]:
    """Make every Python-level read of a tensor's value raise (``.item()``, ``bool()``, ``float()``, ...)."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("host synchronization inside step()")

    names = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    for n in names:
        setattr(torch.Tensor, n, refuse)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("name", [info.name for info in OPTIMIZERS])
def test_fused_step_has_no_host_sync(name: str) -> None:
    """Once compiled, a fused step reads no device value on the host (the glue between the passes included)."""
    desc = {"LARS": "nesterov", "AdamLARS": "trust_bounds", "RangerLARS": "default hyper-parameters"}[name]
    _, run = _pair(name, desc, torch.float32)  # the functions test_fused_matches_eager compiled
    for step in range(1, 3):
        run.set_grads([g.float() for g in make_grads(step, special=False)])
        if step == 1:
            run.opt.step()
            continue
        with _host_reads_raise():
            run.opt.step()
    with _host_reads_raise(), pytest.raises(AssertionError, match="host synchronization"):
        bool(torch.ones(()))  # the harness itself works


def test_fused_and_foreach_together_is_an_error() -> None:
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match=r"Invalid fused value: True together with foreach=True"):
        INFO["LARS"].cls(p, lr=0.1, foreach=True, fused=True)
    with pytest.raises(ValueError, match=r"Invalid fused value: 'yes'"):
        INFO["AdamLARS"].cls(p, fused="yes")
    with pytest.raises(ValueError, match=r"Invalid fused value: 1 "):
        INFO["RangerLARS"].cls([{"params": p, "fused": 1}])


# ------------------------------------------------------------------------- pieces of flat partitions
# Two flat "partitions" as ZeRO hands them over: A = fc1[10:30] + conv[0:80] + 6 padding elements,
# B = conv[80:108] + fc2 (whole) + fc1.bias (whole); conv's norm adds pieces of two tensors, and conv's row 2
# (elements 54-80) is cut between them: RangerLARS's GC completes it with the layout's row_centring().
_LAYERS = [("fc1.weight", (6, 5)), ("conv.weight", (4, 3, 3, 3)), ("fc2.weight", (3, 6)), ("fc1.bias", (6,))]
_SEGMENTS = [
    (Segment(0, 0, 20, layer_offset=10), Segment(1, 20, 80)),
    (Segment(1, 0, 28, layer_offset=80), Segment(2, 28, 18), Segment(3, 46, 6)),
]
_SIZES = (106, 52)
# The hyper-parameters of the functional-entry tests below.
_HP = {
    "LARS": LarsHyper(lr=1.0, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02, eps=1e-8, nesterov=False,
                      trust_clip=False),
    "AdamLARS": AdamLarsHyper(lr=0.05, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                              trust_clip=False, trust_bounds=None),
    "RangerLARS": RangerLarsHyper(lr=0.05, betas=(0.95, 0.999), eps=1e-6, weight_decay=0.01, use_gc=True, k=3,
                                  alpha=0.5, rectify_threshold=5.0, degenerated_to_sgd=False),
}


def _flat_layout() -> StepLayout:
    layouts = [TensorLayout(segs, whole_rows=False) for segs in _SEGMENTS]
    return StepLayout(layouts, num_layers=len(_LAYERS), layer_shapes=[shape for _, shape in _LAYERS])


def _flat_run(
    name: str, use_fused: bool, steps: int, centred: bool = False
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], object]:
    """Step two flat partitions with the functional entry; returns partitions, state and the last ratios.

    ``centred`` (RangerLARS): the gradients are declared centred already (ZeRO's ``_prepare_group``)."""
    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(n, generator=gen) for n in _SIZES]
    layout = _flat_layout()
    adapt = [len(_LAYERS[layer][1]) > 1 for layer in layout.piece_layer]
    decay = list(adapt)
    state = [[torch.zeros(n) for n in _SIZES] for _ in range(3)]
    steps_t = [torch.zeros(()) for _ in _SIZES]
    state[2] = [p.clone() for p in parts]  # RangerLARS's slow buffer starts as the weights
    result = None
    for step in range(1, steps + 1):
        grads = [torch.randn(n, generator=gen) + 0.5 for n in _SIZES]
        plan = StepPlan.of(layout, adapt, decay)
        if name == "LARS":
            result = lars(parts, grads, state[0], plan, _HP["LARS"], foreach=False, fused=use_fused)
        elif name == "AdamLARS":
            result = adam_lars(parts, grads, state[0], state[1], steps_t, plan, _HP["AdamLARS"], foreach=False,
                               fused=use_fused)
        else:
            result = ranger_lars(parts, grads, state[0], state[1], state[2], steps_t, plan, _HP["RangerLARS"],
                                 foreach=False, fused=use_fused, centred=centred)
    return parts, state, result


@pytest.mark.parametrize("name", [info.name for info in OPTIMIZERS])
def test_fused_on_flat_partition_pieces(name: str) -> None:
    """Pieces of flat partitions (layers cut across tensors, padding): fused equals eager on every segment,
    the ratios are the same per layer, and the padding is never written."""
    layout = _flat_layout()
    (pe, se, re), (pf, sf, rf) = (_flat_run(name, use_fused, STEPS) for use_fused in (False, True))
    for a, b in zip(layout.pieces(pe), layout.pieces(pf)):
        assert_close_scaled(b, a, RTOL, name, floor=float(a.abs().max()))
    n_state = {"LARS": 1, "AdamLARS": 2, "RangerLARS": 3}[name]
    for k in range(n_state):
        for a, b in zip(layout.pieces(se[k]), layout.pieces(sf[k])):
            assert_close_scaled(b, a, RTOL, f"{name} state {k}")
    assert re[0] == rf[0] == [0, 1, 1, 2]  # layer of each adapted piece: conv's two pieces share a ratio
    torch.testing.assert_close(rf[1], re[1], rtol=RTOL, atol=0)
    assert torch.equal(rf[1][1], rf[1][2])
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(pf[0][100:], torch.randn(_SIZES[0], generator=gen)[100:])  # padding untouched


def test_pieces_end_to_end_form_one_run() -> None:
    """The update passes write runs: pieces lying end to end in one flat tensor merge (one write of the
    partition instead of one pass over it per piece), a gap or another tensor starts a new run, and a whole
    tensor is its own run."""
    spec = (
        (0, 0, 5, True),
        (1, 0, 20, False), (1, 20, 80, False), (1, 106, 4, False),  # a gap at 100-106
        (2, 0, 28, False), (2, 28, 18, False),
        (3, 0, 6, True), (4, 0, 7, True),
    )
    runs = runs_of(spec)
    assert runs == ((0, 0, 5, True), (1, 0, 100, False), (1, 106, 4, False), (2, 0, 46, False), (3, 0, 6, True),
                    (4, 0, 7, True))
    assert run_pieces(spec, runs) == [[0], [1, 2], [3], [4, 5], [6], [7]]


def test_empty_pieces_keep_their_runs() -> None:
    """An empty piece (a rank's empty FSDP2 shard, a zero-length fragment) belongs to a run like any other:
    counting elements once left it out, which handed a run no piece (``torch.cat`` of nothing in the
    compiled update pass) and shifted every later piece onto the wrong run."""
    spec = ((0, 0, 0, True), (1, 0, 4, False), (1, 4, 0, False), (1, 4, 3, False), (2, 0, 0, True), (3, 0, 2, True))
    runs = runs_of(spec)
    assert runs == ((0, 0, 0, True), (1, 0, 7, False), (2, 0, 0, True), (3, 0, 2, True))
    assert run_pieces(spec, runs) == [[0], [1, 2, 3], [4], [5]]


def test_spread_and_decay_over_a_run() -> None:
    """Per-piece values become per-element ones, copied exactly; a value shared by every piece stays a
    number (nothing materialised); decay applies to the decaying pieces only."""
    like = torch.zeros(6)
    assert spread([0.5, 0.5], [2, 4], like) == 0.5
    out = spread([torch.tensor(2.0), 1.0, torch.tensor(3.0)], [2, 1, 3], like)
    assert torch.equal(out, torch.tensor([2.0, 2.0, 1.0, 3.0, 3.0, 3.0]))
    x, w = torch.ones(6), torch.full((6,), 10.0)
    assert with_decay(x, w, 0.1, [False, False], [2, 4]) is x
    assert torch.equal(with_decay(x, w, 0.1, [True, True], [2, 4]), x + 0.1 * w)
    assert torch.equal(with_decay(x, w, 0.1, [True, False], [2, 4]), torch.tensor([2.0, 2.0, 1, 1, 1, 1]))


def test_fused_does_not_centre_centred_gradients() -> None:
    """``centred=True`` (gradients centred by ``_prepare_group``): the fused step does not centre again, as
    the eager step does not (raw gradients passed as centred stay uncentred, unlike a run that centres)."""
    (pe, _, _), (pf, _, _) = (_flat_run("RangerLARS", use_fused, STEPS, centred=True) for use_fused in (False, True))
    pc, _, _ = _flat_run("RangerLARS", False, STEPS)
    layout = _flat_layout()
    for a, b, c in zip(layout.pieces(pe), layout.pieces(pf), layout.pieces(pc)):
        assert_close_scaled(b, a, RTOL, "centred", floor=float(a.abs().max()))
    assert not all(torch.allclose(a, c) for a, c in zip(layout.pieces(pe), layout.pieces(pc)))


# ------------------------------------------------------------------------------------- GradScaler inputs
def _scaler_entry(name: str, params, grads, state, steps_t, layout, adapt, inv_scale, found_inf):
    kw = dict(inv_scale=inv_scale, found_inf=found_inf)
    plan = StepPlan.of(layout, adapt, adapt)
    if name == "LARS":
        return fused.fused_lars(params, grads, state[0], plan, _HP["LARS"], **kw)
    if name == "AdamLARS":
        return fused.fused_adam_lars(params, grads, state[0], state[1], steps_t, plan, _HP["AdamLARS"], **kw)
    hp = dataclasses.replace(_HP["RangerLARS"], k=2)
    return fused.fused_ranger_lars(params, grads, state[0], state[1], state[2], steps_t, plan, hp,
                                   centre_rows=centralize_gradient, **kw)


@pytest.mark.parametrize("name", [info.name for info in OPTIMIZERS])
def test_inv_scale_and_found_inf(name: str) -> None:
    """Gradients scaled by 8 with ``inv_scale = 1/8`` equal an unscaled run; a step with ``found_inf = 1``
    (and an inf gradient) leaves weights and every state tensor untouched and does not count the step."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(4, 3), (4,), (2, 5)]
    layout = StepLayout([TensorLayout.of_layer(i, torch.empty(s)) for i, s in enumerate(shapes)], len(shapes))
    adapt = [len(s) > 1 for s in shapes]
    weights = [torch.randn(s, generator=gen) for s in shapes]
    runs = []
    for scaled in (False, True):
        params = [w.clone() for w in weights]
        state = [[torch.zeros(s) for s in shapes] for _ in range(2)] + [[w.clone() for w in weights]]
        runs.append((params, state, [torch.zeros(()) for _ in shapes]))
    inv, ok, bad = torch.tensor(1 / 8), torch.tensor(0.0), torch.tensor(1.0)
    for step in range(1, 5):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        if step == 3:  # an overflowed step: the scaled run skips it, the unscaled run never sees it
            params, state, steps_t = runs[1]
            before = [t.clone() for t in params + [x for st in state for x in st] + steps_t]
            bad_grads = [g * 8 for g in grads]
            bad_grads[0][0, 0] = float("inf")
            _scaler_entry(name, params, bad_grads, state, steps_t, layout, adapt, inv, bad)
            after = params + [x for st in state for x in st] + steps_t
            assert all(torch.equal(a, b) for a, b in zip(before, after))
            continue
        plain = runs[0]
        _scaler_entry(name, plain[0], grads, plain[1], plain[2], layout, adapt, None, None)
        scaled = runs[1]
        _scaler_entry(name, scaled[0], [g * 8 for g in grads], scaled[1], scaled[2], layout, adapt, inv, ok)
    for a, b in zip(runs[0][0], runs[1][0]):
        assert_close_scaled(b, a, RTOL, name)
    for a, b in zip(runs[0][2], runs[1][2]):
        assert torch.equal(a, b)  # the skipped step is not counted


def test_fused_reaches_every_front_door() -> None:
    """``--optim_args "fused=True"`` and the registry (DeepSpeed JSON ``params``, ``create_optimizer``) pass it."""
    from hf_lars import create_optimizer
    from hf_lars.integrations.transformers import parse_optim_args

    assert parse_optim_args("fused=True", "lamb") == {"fused": True}
    assert parse_optim_args("fused=none", "lars") == {"fused": None}
    for name in ("lars", "lamb", "ranger_lars"):
        opt = create_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], name, lr=0.1, fused=True)
        assert opt.defaults["fused"] is True and opt.param_groups[0]["fused"] is True


@pytest.mark.parametrize("name", ["LARS", "RangerLARS"])  # RangerLARS runs AdamLARS's passes too
def test_grad_scaler_fused_equals_eager(name: str) -> None:
    """torch.amp.GradScaler("cpu") over a fused and an eager optimizer: the fused passes take the base
    class's inverse scale (``active_inv_scale``), a step with an inf gradient is skipped by the base class
    (weights and state untouched, step not counted), and after finite steps on both sides of it fused
    equals eager."""
    torch.manual_seed(0)
    batches = [(torch.randn(8, 5), torch.randn(8, 2)) for _ in range(4)]
    models = [torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    kwargs = {**INFO[name].required, "weight_decay": 0.01}
    opts = [INFO[name].cls(models[0].parameters(), foreach=False, **kwargs),
            INFO[name].cls(models[1].parameters(), fused=True, **kwargs)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**12) for _ in opts]
    for i, (x, y) in enumerate(batches):
        for model, opt, scaler in zip(models, opts, scalers):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if i == 2:
                model[0].weight.grad[0, 0] = float("inf")
                before = [t.clone() for t in model.parameters()], state_snapshot(opt)
            scaler.step(opt)
            scaler.update()
            if i == 2:
                assert scaler.get_scale() == 2.0**11
                assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))
                after = state_snapshot(opt)
                assert all(torch.equal(before[1][p][k], after[p][k]) for p in after for k in after[p])
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert_close_scaled(b.detach(), a.detach(), RTOL, name, floor=float(a.detach().abs().max()))
    sa, sb = state_snapshot(opts[0]), state_snapshot(opts[1])
    for p in sa:
        for key in sa[p]:
            assert_close_scaled(sb[p][key], sa[p][key], RTOL, f"{name} state {key}")
    if name == "RangerLARS":
        assert all(float(s["step"]) == 3 for s in opts[1].state.values())  # the skipped step is not counted


@pytest.mark.parametrize(("name", "desc"), [("LARS", "nesterov"), ("AdamLARS", "trust_bounds")])
def test_nan_gradient_gives_a_nan_ratio_as_eager(name: str, desc: str) -> None:
    """A NaN in one layer's gradient: that layer's fused ratio is NaN (never a healthy 1), as the eager one
    is, and the other layers' ratios are unchanged (the eager NaN-aware ratio functions, traced)."""
    runs = _pair(name, desc, torch.float32)  # the functions test_fused_matches_eager compiled
    grads = [g.float() for g in make_grads(1, special=False)]
    grads[0][0, 0] = float("nan")  # fc1.weight
    for run in runs:
        run.set_grads(grads)
        run.opt.step()
    ra, rb = runs[0].opt.trust_ratios(), runs[1].opt.trust_ratios()
    assert ra.keys() == rb.keys()
    assert torch.isnan(ra["fc1.weight"]) and torch.isnan(rb["fc1.weight"])
    for key in ra:
        if key != "fc1.weight":
            assert abs(float(rb[key]) - float(ra[key])) <= RTOL * max(abs(float(ra[key])), 1.0), key


def test_fused_ranger_lars_without_the_gc_function_is_an_error() -> None:
    """The functional entry needs the package's GC function when it centres (no second copy of GC's math)."""
    w = [torch.zeros(2, 3)]
    layout = StepLayout([TensorLayout.of_layer(0, w[0])], 1)
    z = [torch.zeros(2, 3)]
    with pytest.raises(ValueError, match=r"use_gc=True needs centre_rows; pass centre_rows=centralize_gradient"):
        fused.fused_ranger_lars(w, z, z, z, z, [torch.zeros(())], StepPlan.of(layout, [True], [True]),
                                dataclasses.replace(_HP["RangerLARS"], lr=0.1, betas=(0.9, 0.999), weight_decay=0.0,
                                                    k=2))
