"""Generic optimizer behaviour driven by the table in ``optim_cases.py``: the API, param forms, closures,
param groups, foreach vs per-tensor, state_dict round trips, errors, no host sync, GradScaler, convergence.

Tolerances: foreach vs per-tensor runs on float64 parameters are compared at ``RTOL = 1e-6`` of each
tensor's scale: both step float64 weights through fp32 working copies with fp32 state, and the two paths
order a few floating-point operations differently (e.g. Nesterov's two adds), so they agree to fp32
rounding (~1e-7 relative), not to float64's.  State-dict resumption and GradScaler unscaling are exact
(``torch.equal``).
"""

from __future__ import annotations

import inspect
import io

import pytest
import torch
from torch import nn

import hf_lars
from optim_cases import (
    CONVERGENCE,
    OPTIMIZERS,
    OptimizerInput,
    assert_close_scaled,
    build,
    error_cases,
    make_grads,
    make_layers,
    reference_cases,
    state_snapshot,
)

RTOL = 1e-6
OPT_IDS = [info.name for info in OPTIMIZERS]


def _first_input(info):
    """The table's first input; for RangerLARS its ``degenerated_to_sgd`` one: by default RangerLARS takes no
    step while RAdam is unrectified (steps 1-5), and these tests check what one step does."""
    if info.name == "RangerLARS":
        return next(i for i in info.inputs if i.kwargs.get("degenerated_to_sgd"))
    return info.inputs[0]


def _params_and_state(opt):
    params = [p for group in opt.param_groups for p in group["params"]]
    return [p.detach().clone() for p in params], state_snapshot(opt)


def _assert_state_equal(a, b, exact=True, what=""):
    assert a.keys() == b.keys(), f"{what}: parameters with state differ"
    for i in a:
        assert a[i].keys() == b[i].keys(), f"{what}: state keys of param {i}"
        for key in a[i]:
            x, y = a[i][key], b[i][key]
            assert x.dtype == y.dtype, f"{what}: dtype of state {key!r} of param {i}"
            if exact:
                assert torch.equal(x, y), f"{what}: state {key!r} of param {i}"
            else:
                assert_close_scaled(x, y, RTOL, f"{what}: state {key!r} of param {i}")


# ---------------------------------------------------------------------------------------------- API
@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPT_IDS)
def test_signature_and_group_defaults(info):
    """The constructor has the documented parameters, order and defaults, and every hyper-parameter (plus
    ``excluded``, False) is a param-group key holding that default."""
    sig = inspect.signature(info.cls.__init__)
    names = [n for n in sig.parameters if n != "self"]
    expected = ["params"] + (["lr"] if "lr" not in info.defaults else []) + list(info.defaults)
    assert names == expected
    for name, value in info.defaults.items():
        assert sig.parameters[name].default == value, name
    if "lr" not in info.defaults:
        assert sig.parameters["lr"].default is inspect.Parameter.empty
    assert issubclass(info.cls, torch.optim.Optimizer)
    opt = info.cls([nn.Parameter(torch.randn(3, 2))], **info.required)
    group = opt.param_groups[0]
    for name, value in {**info.defaults, **info.required, "excluded": False}.items():
        assert group[name] == value, name


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPT_IDS)
def test_docstring_documents_every_argument(info):
    """The rendered docstring (what ``help()`` shows; shared lines come from ``optim/_docs.py``) has one
    ``Args`` entry per constructor argument, in signature order, and no unfilled ``{fragment}`` marker."""
    doc = inspect.getdoc(info.cls)
    args = doc[doc.index("Args:"):].splitlines()[1:]
    documented = [line.split(":")[0].strip() for line in args if line.startswith("    ") and line[4] != " "]
    assert documented == [n for n in inspect.signature(info.cls.__init__).parameters if n != "self"]
    assert not [line for line in doc.splitlines() if line.strip().startswith("{") and line.strip().endswith("}")]


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPT_IDS)
def test_param_forms_are_equivalent(info):
    """Tensors, (name, tensor) pairs, a generator and a group dict give bit-identical steps."""
    kwargs = {**info.required, **_first_input(info).kwargs}

    def run(form):
        layers = make_layers(torch.float32)
        tensors = [p for _, p in layers]
        params = {
            "tensors": tensors,
            "named": layers,
            "generator": (p for p in tensors),
            "group dict": [{"params": layers}],
        }[form]
        opt = info.cls(params, **kwargs)
        for step in range(1, 4):
            for p, g in zip(tensors, make_grads(step, torch.float32)):
                p.grad = g
            opt.step()
        return tensors

    expected = run("tensors")
    for form in ("named", "generator", "group dict"):
        for a, b in zip(run(form), expected):
            assert torch.equal(a, b), form


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPT_IDS)
def test_constructing_leaves_no_hook_on_the_model(info):
    """The optimizers put no hook on the user's model (docs/design.md, "Gradient Centralization"): after
    three constructions (and a step) no module or tensor hook exists, as on a model nothing touched."""
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    for _ in range(3):
        opt = info.cls(model.named_parameters(), **{**info.required, **_first_input(info).kwargs})
    model(torch.randn(2, 5)).sum().backward()
    opt.step()
    for name, module in model.named_modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(module, hooks), f"{name or 'model'}.{hooks}"
    for name, p in model.named_parameters():
        assert not p._backward_hooks, f"{name}: tensor hook"
        assert not getattr(p, "_post_accumulate_grad_hooks", None), f"{name}: post-accumulate-grad hook"


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPT_IDS)
def test_step_with_closure(info):
    """step(closure) evaluates the closure once, with grad enabled, steps on its gradients and returns its
    loss; the same step without a closure (gradients computed beforehand) gives the same result."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    models = [nn.Linear(5, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [info.cls(m.named_parameters(), **{**info.required, **_first_input(info).kwargs}) for m in models]
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opts[0].zero_grad()
        loss = nn.functional.mse_loss(models[0](x), y)
        loss.backward()
        return loss

    before = models[0].weight.detach().clone()
    loss = opts[0].step(closure)
    assert calls == [True]
    assert torch.equal(loss, nn.functional.mse_loss(nn.functional.linear(x, before, models[1].bias), y))
    assert not torch.equal(models[0].weight, before)
    nn.functional.mse_loss(models[1](x), y).backward()
    assert opts[1].step() is None
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPT_IDS)
def test_add_param_group(info):
    """Groups added later with add_param_group step exactly like the same groups given to the constructor,
    keep their own hyper-parameters, and report trust ratios under their names."""
    inp = next(i for i in info.inputs if i.groups)
    full = build(info, inp, dtype=torch.float32)
    fresh = build(info, inp, dtype=torch.float32)  # the same initial values in new tensors; fresh.opt unused
    groups = [list(zip(g["param_names"], g["params"])) for g in fresh.opt.param_groups]
    overrides = list(inp.groups.values())
    opt = info.cls(groups[0], **{**info.required, **inp.kwargs})
    for pairs, extra in zip(groups[1:], overrides):
        opt.add_param_group({"params": pairs, **extra})
    assert len(opt.param_groups) == len(full.opt.param_groups)
    for g, extra in zip(opt.param_groups[1:], overrides):
        for key, value in extra.items():
            assert g[key] == value
    for step in range(1, 6):
        grads = make_grads(step, torch.float32)
        full.set_grads(grads)
        fresh.set_grads(grads)
        full.opt.step()
        opt.step()
    for a, b in zip(full.params, fresh.params):
        assert torch.equal(a, b)
    assert opt.trust_ratios().keys() == full.opt.trust_ratios().keys()
    assert "norm.weight" in opt.trust_ratios()  # the added group with adapt_excluded=True


# ---------------------------------------------------------------------------------- foreach
@pytest.mark.parametrize(("info", "inp"), reference_cases())
def test_foreach_matches_per_tensor(info, inp):
    """float64, 8 steps, a 0-d param, zero gradients (step 2) and grad=None (step 4): every state tensor of
    every parameter and every parameter agree between foreach=True and foreach=False."""
    runs = [build(info, inp, foreach=fe) for fe in (False, True)]
    for step in range(1, 9):
        grads = make_grads(step)
        for run in runs:
            run.set_grads(grads)
            run.opt.step()
        (pa, sa), (pb, sb) = (_params_and_state(r.opt) for r in runs)
        for name, a, b in zip(runs[0].names, pa, pb):
            assert_close_scaled(b, a, RTOL, f"step {step}: {name}", floor=float(a.abs().max()))
        _assert_state_equal(sa, sb, exact=False, what=f"step {step}")
        for key in runs[0].opt.state[runs[0].params[0]]:
            assert key in info.state_keys
        ra, rb = (r.opt.trust_ratios() for r in runs)
        assert ra.keys() == rb.keys()
        for key in ra:
            assert abs(float(ra[key]) - float(rb[key])) <= RTOL * float(ra[key])


# ------------------------------------------------------------------------------ state_dict
def _round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("info", "inp"), reference_cases())
def test_state_dict_resume_is_bit_identical(info, inp, dtype):
    """Save at step 5 (after a grad=None step), load into a fresh optimizer over a fresh model holding the
    saved weights, continue to step 10: params and every state tensor equal (torch.equal) the uninterrupted
    run, and loaded state keeps its dtypes (fp32 state for bf16 params).  For RangerLARS steps 6..10
    include a Lookahead sync for every k in the table (3, 4, 5, 6)."""
    save_at, total = 5, 10
    a = build(info, inp, dtype=dtype)
    for step in range(1, save_at + 1):
        a.set_grads(make_grads(step, dtype))
        a.opt.step()
    saved_sd = _round_trip(a.opt.state_dict())
    saved_weights = [p.detach().clone() for p in a.params]
    for step in range(save_at + 1, total + 1):
        a.set_grads(make_grads(step, dtype))
        a.opt.step()

    b = build(info, inp, dtype=dtype)
    with torch.no_grad():
        for p, w in zip(b.params, saved_weights):
            p.copy_(w)
    b.opt.load_state_dict(saved_sd)
    for p in b.params:
        for key, value in b.opt.state[p].items():
            assert value.dtype == torch.float32, f"loaded state {key!r} has dtype {value.dtype}"
    for step in range(save_at + 1, total + 1):
        b.set_grads(make_grads(step, dtype))
        b.opt.step()
    for name, x, y in zip(a.names, a.params, b.params):
        assert torch.equal(x, y), name
    _assert_state_equal(state_snapshot(a.opt), state_snapshot(b.opt), what="resumed")
    assert a.opt.state_dict()["param_groups"] == b.opt.state_dict()["param_groups"]
    ratios_a, ratios_b = a.opt.trust_ratios(), b.opt.trust_ratios()
    assert ratios_a.keys() == ratios_b.keys()
    assert all(torch.equal(ratios_a[k], ratios_b[k]) for k in ratios_a)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPT_IDS)
def test_state_dict_contents(info):
    """After a step the state holds torch's keys (fp32 tensors, a 0-d fp32 ``step`` tensor for the Adam
    forms) and param_groups hold every hyper-parameter, ``excluded`` and the names."""
    setup = build(info, OptimizerInput("x", {**info.required, "weight_decay": 0.1}), dtype=torch.float32)
    setup.set_grads(make_grads(1, torch.float32, special=False))
    setup.opt.step()
    sd = setup.opt.state_dict()
    assert len(sd["state"]) == len(setup.params)
    for state in sd["state"].values():
        assert set(state) == info.state_keys
        for key, value in state.items():
            assert isinstance(value, torch.Tensor) and value.dtype == torch.float32
            if key == "step":
                assert value.dim() == 0 and float(value) == 1.0
    group = sd["param_groups"][0]
    assert set(info.defaults) | {"lr", "excluded", "params", "param_names"} <= set(group)
    assert group["param_names"] == setup.names
    if info.name == "RangerLARS":  # the slow weights start as the initial weights
        for i, (_, p0) in enumerate(make_layers(torch.float32)):
            assert torch.equal(sd["state"][i]["slow_buffer"], p0.detach())


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize(("info", "inp"), reference_cases())
def test_gradients_are_never_modified(info, inp, foreach):
    """fp32 parameters (whose gradients the optimizer reads without a copy): p.grad is bit-identical after
    each step, including RangerLARS's Gradient Centralization."""
    setup = build(info, inp, dtype=torch.float32, foreach=foreach)
    for step in range(1, 7):
        setup.set_grads(make_grads(step, torch.float32))
        before = [None if p.grad is None else p.grad.clone() for p in setup.params]
        setup.opt.step()
        for name, p, g in zip(setup.names, setup.params, before):
            assert g is None or torch.equal(p.grad, g), f"step {step}: {name}.grad was modified"


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(("info", "err", "via"), error_cases())
def test_invalid_hyper_parameters(info, err, via):
    good = [nn.Parameter(torch.randn(3, 2))]
    with pytest.raises(err.error_type, match=err.error_regex):
        if via == "constructor":
            info.cls(good, **{**info.required, **err.settings})
        elif via == "group":
            info.cls([{"params": good, **err.settings}], **info.required)
        else:
            opt = info.cls(good, **info.required)
            opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], **err.settings})


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPT_IDS)
def test_sparse_gradients_raise(info):
    emb = nn.Embedding(10, 4, sparse=True)
    opt = info.cls(emb.parameters(), **info.required)
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match=rf"{info.name} does not support sparse gradients"):
        opt.step()


# ------------------------------------------------------------------------------- host sync
def _fake_steps(make_optimizer):
    """Build a model and its optimizer under FakeTensorMode, set fake gradients, step twice."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Conv1d(6, 3, 1))
        opt = make_optimizer(model)
        for _ in range(2):
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
        return opt


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPT_IDS)
def test_step_has_no_host_sync(info, foreach):
    """Under FakeTensorMode any read of a tensor's value (.item(), bool(), float(), .tolist()) raises, so a
    step that completes never synchronises with the device."""
    opt = _fake_steps(
        lambda m: info.cls(m.named_parameters(), **{**info.required, "weight_decay": 0.01}, foreach=foreach)
    )
    assert opt.trust_ratios()  # the ratios stay on the device too


class _SyncingOptimizer(torch.optim.Optimizer):
    """Deliberately reads a value on the host inside step()."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-1e-3 / max(p.grad.norm().item(), 1e-12))


def test_fake_tensor_harness_catches_host_sync():
    from torch._subclasses.fake_tensor import DataDependentOutputException

    with pytest.raises(DataDependentOutputException):
        _fake_steps(lambda m: _SyncingOptimizer(m.parameters()))


# ------------------------------------------------------------------------------ GradScaler
@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPT_IDS)
def test_grad_scaler_skips_inf_step(info):
    """torch.amp.GradScaler("cpu"): a step with an inf gradient is skipped (params and optimizer state
    untouched) and the scale drops; the next finite step works and equals an unscaled run that never saw
    the bad batch."""
    torch.manual_seed(0)
    batches = [(torch.randn(8, 5), torch.randn(8, 2)) for _ in range(3)]
    kwargs = {**info.required, **_first_input(info).kwargs, "weight_decay": 0.01}
    models = [nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opt, twin = (info.cls(m.named_parameters(), **kwargs) for m in models)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)

    def scaled_step(x, y, poison=False):
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(models[0](x), y)).backward()
        if poison:
            models[0][0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    def twin_step(x, y):
        twin.zero_grad()
        nn.functional.mse_loss(models[1](x), y).backward()
        twin.step()

    scaled_step(*batches[0])
    twin_step(*batches[0])
    params, state = _params_and_state(opt)
    scale = scaler.get_scale()
    scaled_step(*batches[1], poison=True)
    assert scaler.get_scale() == scale / 2
    params_after, state_after = _params_and_state(opt)
    for a, b in zip(params, params_after):
        assert torch.equal(a, b)
    _assert_state_equal(state, state_after, what="after the skipped step")
    scaled_step(*batches[2])
    twin_step(*batches[2])
    for a, b, c in zip(models[0].parameters(), models[1].parameters(), params):
        assert not torch.equal(a.detach(), c)
        assert torch.equal(a, b)
    _assert_state_equal(state_snapshot(opt), state_snapshot(twin), what="vs the unscaled run")


# ------------------------------------------------------------------------------ convergence
LOSS_THRESHOLD = 0.08  # mean squared error after 200 full-batch steps; the initial loss is 0.78
MIN_IMPROVEMENT = 8.0  # initial loss / final loss


def test_convergence_table_covers_the_registry():
    assert set(CONVERGENCE) == set(hf_lars.list_optimizers())


@pytest.mark.parametrize("name", list(CONVERGENCE))
def test_convergence(name):
    """Every registered name trains a small MLP (with LayerNorm and biases, split into decay / no-decay
    groups by create_optimizer) on a fixed teacher regression task: MSE < 0.08 and 8x below the start."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    a, b = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    y = (torch.sin(x @ a) + 0.5 * torch.tanh(x @ b)).unsqueeze(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 1))
    opt = hf_lars.create_optimizer(model, name, **CONVERGENCE[name])
    with torch.no_grad():
        initial = nn.functional.mse_loss(model(x), y).item()
    for _ in range(200):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), y).item()
    assert final < LOSS_THRESHOLD, (name, initial, final)
    assert initial / final > MIN_IMPROVEMENT, (name, initial, final)
