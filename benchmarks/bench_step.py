"""Time optimizer.step() of LARS, AdamLARS and RangerLARS against torch's SGD/AdamW and peer optimizers.

    python benchmarks/bench_step.py [--params-millions 25] [--steps 30] [--warmup 5] [--optimizers LARS,lamb]
                                    [--no-peers] [--threads N] [--markdown PATH]

``hf-lars bench [args]`` runs this file from a source checkout.  The peers are loaded by ``_peers.py``
beside it.  Not part of the installed package: a wheel and a checkout measure the same thing.

Times ``optimizer.step()`` in one process on the parameter shapes of a GPT-2-small-like stack (token and
position embeddings; per block ``ln_1``, ``attn.c_attn`` (d x 3d), ``attn.c_proj``, ``ln_2``, ``mlp.c_fc``
(d x 4d), ``mlp.c_proj`` with their biases; a final ``ln_f``), scaled to a target parameter count.
Gradients are random and fixed across steps.  All contenders share the parameters and are stepped
round-robin, in a rotating order, within the same rounds, so machine noise hits them alike; each row is
the median over the timed rounds.

Baselines are torch's own optimizers (``SGD(momentum=0.9)``, ``AdamW``) at every setting the device
supports: the per-tensor loop, ``foreach=True`` and ``fused=True``; every ratio is taken to the FASTEST of
them.  Ours run at every setting they have too (``fused`` where the class takes it) and are judged at their
fastest.  Peers (timm, pytorch-optimizer) are extra :class:`Contender` s (``_peers.py`` loads them).

Targets (those of ``benchmarks/README.md``; reported as met or missed, never asserted): LARS <= 1.3x
the fastest SGD, AdamLARS <= 1.5x the fastest AdamW, RangerLARS <= 1.7x the fastest AdamW, each faster than
every peer of its family at the peer's fastest setting.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "ModelShape",
    "gpt2_like_shape",
    "Contender",
    "Target",
    "TARGETS",
    "Measurement",
    "BenchReport",
    "builtin_contenders",
    "select_contenders",
    "make_params",
    "run_benchmark",
    "machine_info",
    "load_peer_contenders",
    "add_arguments",
    "main",
]

# Hyper-parameters shared by every contender of a family, so all of them do comparable work.  LARS-style
# optimizers get no weight decay (like the SGD baseline, which is the strictest comparison: with decay the
# baseline would do one more pass); Adam-style ones the usual 0.01.
_HERE = Path(__file__).resolve().parent

SGD_KW: dict[str, Any] = {"lr": 1e-3, "momentum": 0.9}
ADAM_KW: dict[str, Any] = {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.01}
RANGER_KW: dict[str, Any] = {"lr": 1e-3, "betas": (0.95, 0.999), "weight_decay": 0.01}


# ------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class ModelShape:
    """A GPT-2-like stack: width ``d_model``, ``n_layer`` blocks, ``vocab`` tokens, ``n_positions``."""

    d_model: int
    n_layer: int
    vocab: int
    n_positions: int

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(name, shape)`` of every parameter, named as in transformers' ``GPT2Model``."""
        d = self.d_model
        out: list[tuple[str, tuple[int, ...]]] = [
            ("wte.weight", (self.vocab, d)),
            ("wpe.weight", (self.n_positions, d)),
        ]
        for i in range(self.n_layer):
            h = f"h.{i}."
            out += [
                (h + "ln_1.weight", (d,)),
                (h + "ln_1.bias", (d,)),
                (h + "attn.c_attn.weight", (d, 3 * d)),
                (h + "attn.c_attn.bias", (3 * d,)),
                (h + "attn.c_proj.weight", (d, d)),
                (h + "attn.c_proj.bias", (d,)),
                (h + "ln_2.weight", (d,)),
                (h + "ln_2.bias", (d,)),
                (h + "mlp.c_fc.weight", (d, 4 * d)),
                (h + "mlp.c_fc.bias", (4 * d,)),
                (h + "mlp.c_proj.weight", (4 * d, d)),
                (h + "mlp.c_proj.bias", (d,)),
            ]
        out += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
        return out

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes())

    @property
    def num_tensors(self) -> int:
        return 2 + 12 * self.n_layer + 2

    def describe(self) -> str:
        return (
            f"GPT-2-like: d_model={self.d_model}, n_layer={self.n_layer}, vocab={self.vocab}, "
            f"n_positions={self.n_positions}: {self.num_params / 1e6:.2f}M parameters in {self.num_tensors} tensors "
            f"({8 * self.n_layer + 2} of them 1-D)"
        )


def gpt2_like_shape(params_millions: float = 25.0) -> ModelShape:
    """The GPT-2-small-like stack nearest ``params_millions``.

    The width is a multiple of 64 near ``sqrt(N / 90)`` (the stack has ~90 d^2 parameters at 6 layers),
    vocabulary ``16 d`` and ``2 d`` positions (8192 and 1024 at d=512), and the layer count that lands
    nearest the target.  25M gives d=512, 6 layers, 23.6M parameters.
    """
    if not params_millions > 0:
        raise ValueError(f"Invalid params_millions value: {params_millions!r} (allowed: > 0)")
    target = params_millions * 1e6
    d = max(64, 64 * round(math.sqrt(target / 90) / 64))
    best = None
    for n_layer in range(1, 97):
        shape = ModelShape(d, n_layer, vocab=16 * d, n_positions=2 * d)
        err = abs(shape.num_params - target)
        if best is None or err < best[0]:
            best = (err, shape)
    assert best is not None
    return best[1]


def make_params(shape: ModelShape, seed: int = 0) -> tuple[list[tuple[str, Tensor]], list[Tensor]]:
    """fp32 parameters initialised as GPT-2 does (N(0, 0.02), norm scales 1, biases 0) and fixed random
    gradients (N(0, 1e-3)), returned as ``(named params, grads)``.  ``p.grad`` is not set."""
    gen = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for name, s in shape.shapes():
        if name.endswith("bias"):
            p = torch.zeros(s)
        elif ".ln_" in name or name.startswith("ln_"):
            p = torch.ones(s)
        else:
            p = torch.randn(s, generator=gen) * 0.02
        params.append((name, torch.nn.Parameter(p)))
        grads.append(torch.randn(s, generator=gen) * 1e-3)
    return params, grads


# ------------------------------------------------------------------------------------- contenders
@dataclass(frozen=True)
class Contender:
    """One optimizer at one setting.

    Attributes:
        name: display name ("LARS", "SGD", "timm Lars", ...).
        role: ``"baseline"`` (torch), ``"ours"`` or ``"peer"``.
        family: the comparison it belongs to: ``"lars"``, ``"lamb"``, ``"ranger"`` (peers and ours), or the
            baseline's name for baselines (``"SGD"``, ``"AdamW"``).
        foreach: the ``foreach`` setting it runs with.
        make: builds the optimizer from ``(name, tensor)`` pairs.
        note: shown under the table (settings that differ from the peer's defaults, ...).
    """

    name: str
    role: str
    family: str
    foreach: bool | None
    make: Callable[[list[tuple[str, Tensor]]], Optimizer]
    note: str = ""
    fused: bool = False  # runs with fused=True (then ``foreach`` is False)

    @property
    def impl(self) -> str:
        """``"fused"``, ``"foreach"``, ``"per-tensor"`` or ``"default"``."""
        return "fused" if self.fused else {True: "foreach", False: "per-tensor", None: "default"}[self.foreach]

    @property
    def label(self) -> str:
        return f"{self.name} [{self.impl}]"


@dataclass(frozen=True)
class Target:
    """Ours must run within ``max_ratio`` of ``baseline`` and beat every peer of ``family``."""

    optimizer: str
    baseline: str
    max_ratio: float
    family: str

    def describe(self) -> str:
        return f"<= {self.max_ratio:g}x fastest {self.baseline}, < peers"


#: The targets of ``benchmarks/README.md``.
TARGETS: dict[str, Target] = {
    "LARS": Target("LARS", "SGD", 1.3, "lars"),
    "AdamLARS": Target("AdamLARS", "AdamW", 1.5, "lamb"),
    "RangerLARS": Target("RangerLARS", "AdamW", 1.7, "ranger"),
}
_FAMILY_OF_OURS = {t.optimizer: t.family for t in TARGETS.values()}


def _plain(named: list[tuple[str, Tensor]]) -> list[Tensor]:
    return [p for _, p in named]


def _takes_fused(cls: type) -> bool:
    return "fused" in inspect.signature(cls).parameters


def _fused_works(cls: type, kwargs: dict[str, Any]) -> bool:
    """Whether ``cls(..., fused=True)`` steps on this device (torch's CPU fused kernels need torch >= 2.4)."""
    if not _takes_fused(cls):
        return False
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    try:
        cls([p], fused=True, **kwargs).step()
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return False
    return True


def _settings(cls: type, kwargs: dict[str, Any], foreach_values: Sequence[bool], fused: bool | None) -> list[bool]:
    """``fused`` flags to run ``cls`` with: always ``False`` (the foreach settings), and ``True`` if it works."""
    use_fused = _fused_works(cls, kwargs) if fused is None else fused and _takes_fused(cls)
    return [False, True] if use_fused else [False]


def builtin_contenders(foreach_values: Sequence[bool] = (False, True), fused: bool | None = None) -> list[Contender]:
    """torch's SGD and AdamW (baselines) and our three optimizers, at each ``foreach`` setting and ``fused``.

    ``fused=None`` adds a ``fused=True`` row for every class that takes it and steps with it on this device;
    ``False`` never does.
    """
    from hf_lars.optim import LARS, AdamLARS, RangerLARS

    table: list[tuple[str, str, str, type, dict[str, Any], bool]] = [
        ("SGD", "baseline", "SGD", torch.optim.SGD, SGD_KW, False),
        ("AdamW", "baseline", "AdamW", torch.optim.AdamW, ADAM_KW, False),
        ("LARS", "ours", "lars", LARS, SGD_KW, True),
        ("AdamLARS", "ours", "lamb", AdamLARS, ADAM_KW, True),
        ("RangerLARS", "ours", "ranger", RangerLARS, RANGER_KW, True),
    ]
    out: list[Contender] = []
    for name, role, family, cls, kw, named in table:
        for fe in foreach_values:
            out.append(Contender(name, role, family, fe, _maker(cls, kw, named, foreach=fe)))
        if True in _settings(cls, kw, foreach_values, fused):
            out.append(Contender(name, role, family, False, _maker(cls, kw, named, fused=True), fused=True))
    return out


def _maker(cls: type, kwargs: dict[str, Any], named: bool, **setting: Any) -> Callable[[list[tuple[str, Tensor]]], Optimizer]:
    """Builds ``cls`` on the ``(name, tensor)`` pairs (ours) or the bare tensors (torch's)."""
    return lambda ps: cls(ps if named else _plain(ps), **setting, **kwargs)


def select_contenders(contenders: Sequence[Contender], optimizers: Iterable[str] | None) -> list[Contender]:
    """Keep ours named in ``optimizers`` (registry names and aliases work: ``lamb`` is AdamLARS), their
    peers, and the baselines they are measured against.  ``None`` keeps everything."""
    if optimizers is None:
        return list(contenders)
    from hf_lars.registry import get_optimizer_info

    wanted: set[str] = set()
    for raw in optimizers:
        if not raw.strip():
            continue
        try:  # the registry's name matching (case, "_" and "-" ignored): LARS, AdamLARS, lamb, ranger_lars, ...
            wanted.add(get_optimizer_info(raw.strip()).cls.__name__)
        except ValueError:
            raise ValueError(f"Unknown optimizer {raw!r} for the benchmark. Valid names: {', '.join(TARGETS)}") from None
    families = {TARGETS[n].family for n in wanted}
    baselines = {TARGETS[n].baseline for n in wanted}
    keep = []
    for c in contenders:
        if (c.role == "ours" and c.name in wanted) or (c.role == "peer" and c.family in families):
            keep.append(c)
        elif c.role == "baseline" and c.name in baselines:
            keep.append(c)
    return keep


def load_peer_contenders(log: Callable[[str], None] = print) -> tuple[list[Contender], list[str]]:
    """Peers from ``_peers.py`` beside this file: ``(contenders, notes)``; a note and none if loading fails."""
    sys.modules.setdefault("bench_step", sys.modules[__name__])  # _peers imports Contender from here
    if str(_HERE) not in sys.path:
        sys.path.insert(0, str(_HERE))
    try:
        import _peers
    except Exception as err:  # noqa: BLE001 - the benchmark must run without peers
        return [], [f"peers skipped: could not import {_HERE / '_peers.py'}: {err!r}"]
    return _peers.peer_contenders(log=log)


# ------------------------------------------------------------------------------------- measuring
@dataclass
class Measurement:
    contender: Contender
    times: list[float] = field(default_factory=list)  # seconds, timed rounds only
    state_bytes: int = 0
    param_bytes: int = 0
    private_grads: bool = False  # it modified p.grad, so it got its own copy, restored before each step
    error: str | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3 if self.times else float("nan")

    def quantile_ms(self, q: float) -> float:
        if len(self.times) < 2:
            return self.median_ms
        return statistics.quantiles(self.times, n=100, method="inclusive")[round(q * 100) - 1] * 1e3

    @property
    def state_ratio(self) -> float:
        return self.state_bytes / self.param_bytes if self.param_bytes else float("nan")


def _state_bytes(opt: Optimizer) -> int:
    """Bytes of the tensors in ``opt.state`` (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, Tensor):
                storage = v.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def machine_info(threads: int | None = None) -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    info = {
        "cpu": cpu,
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "torch": torch.__version__,
        "threads": str(threads if threads is not None else torch.get_num_threads()),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }
    if hasattr(os, "getloadavg"):
        info["load average at start (1/5 min)"] = "{:.2f} / {:.2f}".format(*os.getloadavg()[:2])
    return info


@dataclass
class BenchReport:
    shape: ModelShape
    steps: int
    warmup: int
    machine: dict[str, str]
    measurements: list[Measurement]
    notes: list[str] = field(default_factory=list)
    default_foreach: bool = False  # what foreach=None resolves to for ours on these parameters

    # ----------------------------------------------------------------------------------- lookups
    def _ok(self) -> list[Measurement]:
        return [m for m in self.measurements if m.error is None and m.times]

    def fastest(self, name: str, role: str | None = None) -> Measurement | None:
        ms = [m for m in self._ok() if m.contender.name == name and (role is None or m.contender.role == role)]
        return min(ms, key=lambda m: m.median_ms) if ms else None

    def get(self, name: str, foreach: bool | None, fused: bool = False) -> Measurement | None:
        for m in self._ok():
            c = m.contender
            if c.name == name and c.fused == fused and (fused or c.foreach == foreach):
                return m
        return None

    def baseline_for(self, m: Measurement) -> Measurement | None:
        c = m.contender
        if c.role == "baseline":
            return self.fastest(c.name, "baseline")
        target = TARGETS.get(c.name) if c.role == "ours" else None
        if target is None:
            target = next((t for t in TARGETS.values() if t.family == c.family), None)
        return None if target is None else self.fastest(target.baseline, "baseline")

    def ratio(self, m: Measurement) -> float:
        base = self.baseline_for(m)
        return m.median_ms / base.median_ms if base is not None else float("nan")

    def verdicts(self) -> dict[str, tuple[bool, str]]:
        """For each of ours that ran: ``(met, why)``, judged at its fastest setting against the fastest baseline."""
        out: dict[str, tuple[bool, str]] = {}
        for name, target in TARGETS.items():
            m = self.fastest(name, "ours")
            if m is None:
                continue
            base = self.fastest(target.baseline, "baseline")
            reasons, ok = [], True
            if base is None:
                ok = False
                reasons.append(f"no {target.baseline} baseline")
            else:
                r = m.median_ms / base.median_ms
                if r > target.max_ratio:
                    ok = False
                    reasons.append(f"{r:.2f}x {target.baseline} > {target.max_ratio:g}x")
            contenders = [p.contender for p in self._ok()]
            rivals = {c.name for c in contenders if c.role == "peer" and c.family == target.family}
            for peer_name in sorted(rivals):
                peer = self.fastest(peer_name, "peer")
                assert peer is not None
                if m.median_ms >= peer.median_ms:
                    ok = False
                    reasons.append(f"not faster than {peer_name} ({peer.median_ms:.1f} ms)")
            out[name] = (ok, "; ".join(reasons))
        return out

    # ------------------------------------------------------------------------------------- tables
    def _main_rows(self) -> list[list[str]]:
        verdicts = self.verdicts()
        order = {"baseline": 0, "ours": 1, "peer": 2}
        fam_order = {"SGD": 0, "lars": 1, "AdamW": 2, "lamb": 3, "ranger": 4}
        ms = sorted(
            self.measurements,
            key=lambda m: (
                fam_order.get(m.contender.family, 9),
                order[m.contender.role],
                m.contender.name,
                (m.contender.fused, m.contender.foreach is not False),  # per-tensor, foreach, fused
            ),
        )
        rows = []
        for m in ms:
            c = m.contender
            impl = c.impl
            if m.error is not None:
                rows.append([c.name, impl, "error", "", "", m.error])
                continue
            base = self.baseline_for(m)
            ratio = f"{self.ratio(m):.2f}x {base.contender.name}" if base is not None else "n/a"
            target, result = "", ""
            if c.role == "ours":
                if c.foreach == self.default_foreach and not c.fused:
                    impl += " (default)"
                if self.fastest(c.name, "ours") is m:
                    target = TARGETS[c.name].describe()
                    ok, why = verdicts.get(c.name, (False, "not judged"))
                    result = "met (fastest setting)" if ok else f"missed: {why}"
            elif c.role == "baseline" and base is m:
                result = "baseline (fastest)"
            spread = f"{m.quantile_ms(0.25):.2f}-{m.quantile_ms(0.75):.2f}"
            rows.append([c.name, impl, f"{m.median_ms:.2f}", spread, ratio, target, result])
        return rows

    def _foreach_rows(self) -> list[list[str]]:
        rows = []
        names = []
        for m in self.measurements:
            if m.contender.name not in names:
                names.append(m.contender.name)
        for name in names:
            per, fe, fu = self.get(name, False), self.get(name, True), self.get(name, False, fused=True)
            if per is None or fe is None:
                continue
            settings = [("per-tensor", per), ("foreach", fe)] + ([("fused", fu)] if fu is not None else [])
            fastest = min(settings, key=lambda kv: kv[1].median_ms)[0]
            ratio = fe.median_ms / per.median_ms
            fused_ms = f"{fu.median_ms:.2f}" if fu is not None else "n/a"
            rows.append([name, f"{per.median_ms:.2f}", f"{fe.median_ms:.2f}", fused_ms, f"{ratio:.2f}", fastest])
        return rows

    def _state_rows(self) -> list[list[str]]:
        rows, seen = [], set()
        for m in self._ok():
            if m.contender.name in seen:
                continue
            seen.add(m.contender.name)
            rows.append([m.contender.name, f"{m.state_bytes / 2**20:.1f}", f"{m.state_ratio:.3f}"])
        return rows

    def render(self, markdown: bool = False) -> str:
        """The report as plain text (``markdown=False``) or GitHub Markdown."""
        lines: list[str] = []
        head = "### " if markdown else ""
        lines.append(f"{head}optimizer.step() on {self.shape.describe()}")
        lines.append("")
        lines.append(
            f"Median of {self.steps} steps after {self.warmup} warm-up steps; contenders interleaved round-robin "
            "in one process (rotating order), sharing parameters and fixed random gradients."
        )
        lines.append("")
        for k, v in self.machine.items():
            lines.append(f"{'- ' if markdown else '  '}{k}: {v}")
        lines.append("")
        lines += _table(
            ["optimizer", "impl", "median ms", "p25-p75 ms", "ratio", "target", "result"], self._main_rows(), markdown
        )
        lines.append("")
        lines.append(
            "Every ratio is to the fastest setting of the baseline (per-tensor, foreach, fused); ours are judged at "
            f"their fastest setting, peers at theirs.  foreach=None picks "
            f"{'foreach' if self.default_foreach else 'per-tensor'} for ours on this device (marked default)."
        )
        fe_rows = self._foreach_rows()
        if fe_rows:
            lines.append("")
            lines.append(f"{head}foreach=True vs foreach=False")
            lines.append("")
            header = ["optimizer", "per-tensor ms", "foreach ms", "fused ms", "foreach / per-tensor", "fastest"]
            lines += _table(header, fe_rows, markdown)
        st_rows = self._state_rows()
        if st_rows:
            lines.append("")
            lines.append(f"{head}Optimizer state after a step")
            lines.append("")
            lines += _table(["optimizer", "state MiB", "state bytes / param bytes"], st_rows, markdown)
        notes = list(self.notes)
        baselines = [m for m in self._ok() if m.contender.role == "baseline"]
        noisy = [m for m in baselines if m.quantile_ms(0.75) > 1.5 * m.quantile_ms(0.25)]
        if noisy:
            notes.insert(
                0,
                "UNRELIABLE TIMINGS: the p25-p75 range of "
                + ", ".join(m.contender.label for m in noisy)
                + " spans more than 1.5x, so the machine was busy; ratios may be off by as much.  Re-run on an idle "
                "machine, or with --threads 1 (multi-threaded kernels stall whenever one core is taken).",
            )
        scribblers = sorted({m.contender.name for m in self.measurements if m.private_grads})
        for name in scribblers:
            notes.append(
                f"{name} modifies p.grad in place: it got its own gradient copy, restored before each step (outside "
                "the timed region)."
            )
        for c in {m.contender.name: m.contender for m in self.measurements}.values():
            if c.note:
                notes.append(f"{c.name}: {c.note}")
        if notes:
            lines.append("")
            lines.append(f"{head}Notes" if markdown else "Notes:")
            lines.append("")
            lines += [f"- {n}" for n in notes]
        return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    rows = [r + [""] * (len(header) - len(r)) for r in rows]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return out
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r).rstrip() for r in rows]
    return out


def _resolved_default_foreach(params: list[Tensor]) -> bool:
    from hf_lars.optim.base import default_foreach

    return default_foreach(params)


def run_benchmark(
    params_millions: float = 25.0,
    steps: int = 30,
    warmup: int = 5,
    contenders: Sequence[Contender] | None = None,
    threads: int | None = None,
    progress: bool = True,
    notes: Sequence[str] = (),
    seed: int = 0,
) -> BenchReport:
    """Run the benchmark and return its :class:`BenchReport` (``report.render()`` for the table).

    ``contenders`` defaults to :func:`builtin_contenders`.  A contender whose constructor or step raises is
    reported with its error; the others still run.
    """
    if steps < 1 or warmup < 1:
        raise ValueError(f"Invalid steps/warmup values: {steps}, {warmup} (allowed: >= 1 each; warm-up builds state)")
    if threads is not None:
        torch.set_num_threads(threads)
    shape = gpt2_like_shape(params_millions)
    named, grads = make_params(shape, seed)
    params = _plain(named)
    pristine = [g.clone() for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    contenders = list(builtin_contenders() if contenders is None else contenders)
    param_bytes = sum(p.numel() * p.element_size() for p in params)

    measurements: list[Measurement] = []
    optimizers: list[Optimizer | None] = []
    for c in contenders:
        m = Measurement(c, param_bytes=param_bytes)
        opt = None
        try:
            opt = c.make(named)
        except Exception as err:  # noqa: BLE001 - report it, keep the others
            m.error = f"constructor failed: {err!r}"
        measurements.append(m)
        optimizers.append(opt)
    private: dict[int, list[Tensor]] = {}

    def set_grads(gs: list[Tensor]) -> None:
        for p, g in zip(params, gs):
            p.grad = g

    def one_step(i: int) -> float:
        opt = optimizers[i]
        assert opt is not None
        if i in private:
            for g, src in zip(private[i], pristine):
                g.copy_(src)
            set_grads(private[i])
        t0 = time.perf_counter()
        opt.step()
        t = time.perf_counter() - t0
        if i in private:
            set_grads(grads)
        return t

    rounds = warmup + steps
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=rounds * len(contenders), desc="optimizer steps", unit="step", leave=False)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        n = len(contenders)
        for r in range(rounds):
            for j in range(n):
                i = (j + r) % n  # rotate the order each round: no contender always runs first or last
                m = measurements[i]
                if m.error is not None:
                    if bar is not None:
                        bar.update(1)
                    continue
                try:
                    t = one_step(i)
                except Exception as err:  # noqa: BLE001
                    m.error = f"step failed: {err!r}"
                    set_grads(grads)
                    t = None
                if r == 0 and m.error is None and i not in private:
                    # Did it write into p.grad?  Then restore the shared gradients and give it its own.
                    if not all(torch.equal(g, src) for g, src in zip(grads, pristine)):
                        for g, src in zip(grads, pristine):
                            g.copy_(src)
                        private[i] = [src.clone() for src in pristine]
                        m.private_grads = True
                if t is not None and r >= warmup:
                    m.times.append(t)
                if bar is not None:
                    bar.update(1)
    finally:
        if gc_was_enabled:
            gc.enable()
        if bar is not None:
            bar.close()
    for m, opt in zip(measurements, optimizers):
        if opt is not None:
            m.state_bytes = _state_bytes(opt)
    for p in params:
        p.grad = None
    for m in measurements:
        if m.contender.role == "ours" and m.private_grads:
            m.error = "modified p.grad (forbidden for hf_lars optimizers)"
    return BenchReport(
        shape=shape,
        steps=steps,
        warmup=warmup,
        machine=machine_info(threads),
        measurements=measurements,
        notes=list(notes),
        default_foreach=_resolved_default_foreach(params),
    )


# ------------------------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options (also what ``hf-lars bench`` passes through)."""
    parser.add_argument(
        "--params-millions", type=float, default=25.0,
        help="size of the GPT-2-like parameter set, in millions (default: 25, which gives d=512, 6 layers, 23.6M)",
    )
    parser.add_argument(
        "--steps", type=int, default=30, help="timed steps per optimizer; the median is reported (default: 30)"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    parser.add_argument(
        "--optimizers", default=None,
        help="comma-separated subset of ours (LARS,AdamLARS,RangerLARS; registry aliases such as lamb work); their "
        "baselines and peers come along (default: all)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip timm and pytorch-optimizer")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused=True settings")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH", help="also write the report as Markdown")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line; print the report (and write Markdown if asked)."""
    parser = argparse.ArgumentParser(prog="bench_step.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    contenders = builtin_contenders(fused=False if args.no_fused else None)
    notes: list[str] = []
    if not args.no_peers:
        peers, notes = load_peer_contenders(log=log)
        contenders += peers
    wanted = None if args.optimizers is None else [s.strip() for s in args.optimizers.split(",")]
    try:
        contenders = select_contenders(contenders, wanted)
        report = run_benchmark(
            params_millions=args.params_millions,
            steps=args.steps,
            warmup=args.warmup,
            contenders=contenders,
            threads=args.threads,
            progress=not args.no_progress,
            notes=notes,
        )
    except ValueError as err:
        log(f"bench_step.py: error: {err}")
        return 2
    print(report.render())
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report.render(markdown=True))
        log(f"Markdown written to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
