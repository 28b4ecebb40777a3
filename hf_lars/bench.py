"""The optimizer-step benchmark behind ``hf-lars bench`` and ``benchmarks/bench_step.py``.

Times ``optimizer.step()`` in one process on the parameter shapes of a GPT-2-small-like stack (token and
position embeddings; per block ``ln_1``, ``attn.c_attn`` (d x 3d), ``attn.c_proj``, ``ln_2``, ``mlp.c_fc``
(d x 4d), ``mlp.c_proj`` with their biases; a final ``ln_f``), scaled to a target parameter count.
Gradients are random and fixed across steps.  All contenders share the parameters and are stepped
round-robin, in a rotating order, within the same rounds, so machine noise hits them alike; each row is
the median over the timed rounds.

Baselines are torch's own optimizers (``SGD(momentum=0.9)``, ``AdamW``) with ``foreach=True`` and
``False``; ratios are taken to the faster of the two.  Ours run with both settings too; the targets are
judged on the setting ``foreach=None`` picks (what users get).  Peers (timm, pytorch-optimizer) are
passed in as extra :class:`Contender` s (``benchmarks/_peers.py`` loads them).

Targets (CPU): LARS <= 1.2x SGD, AdamLARS <= 1.2x AdamW, RangerLARS <= 1.5x AdamW, each faster than every
peer of its family at the peer's faster setting.
"""

from __future__ import annotations

import gc
import importlib.util
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
]

# Hyper-parameters shared by every contender of a family, so all of them do comparable work.  LARS-style
# optimizers get no weight decay (like the SGD baseline, which is the strictest comparison: with decay the
# baseline would do one more pass); Adam-style ones the usual 0.01.
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
        foreach: the setting it runs with.
        make: builds the optimizer from ``(name, tensor)`` pairs.
        note: shown under the table (settings that differ from the peer's defaults, ...).
    """

    name: str
    role: str
    family: str
    foreach: bool | None
    make: Callable[[list[tuple[str, Tensor]]], Optimizer]
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} [{_impl(self.foreach)}]"


def _impl(foreach: bool | None) -> str:
    return {True: "foreach", False: "per-tensor", None: "default"}[foreach]


@dataclass(frozen=True)
class Target:
    """Ours must run within ``max_ratio`` of ``baseline`` and beat every peer of ``family``."""

    optimizer: str
    baseline: str
    max_ratio: float
    family: str

    def describe(self) -> str:
        return f"<= {self.max_ratio:g}x {self.baseline}, < peers"


TARGETS: dict[str, Target] = {
    "LARS": Target("LARS", "SGD", 1.2, "lars"),
    "AdamLARS": Target("AdamLARS", "AdamW", 1.2, "lamb"),
    "RangerLARS": Target("RangerLARS", "AdamW", 1.5, "ranger"),
}
_FAMILY_OF_OURS = {t.optimizer: t.family for t in TARGETS.values()}


def _plain(named: list[tuple[str, Tensor]]) -> list[Tensor]:
    return [p for _, p in named]


def builtin_contenders(foreach_values: Sequence[bool] = (False, True)) -> list[Contender]:
    """torch's SGD and AdamW (baselines) and our three optimizers, at each ``foreach`` setting."""
    from hf_lars.optim import LARS, AdamLARS, RangerLARS

    sgd, adamw = torch.optim.SGD, torch.optim.AdamW
    out: list[Contender] = []
    for fe in foreach_values:
        out.append(Contender("SGD", "baseline", "SGD", fe, lambda ps, fe=fe: sgd(_plain(ps), foreach=fe, **SGD_KW)))
        out.append(
            Contender("AdamW", "baseline", "AdamW", fe, lambda ps, fe=fe: adamw(_plain(ps), foreach=fe, **ADAM_KW))
        )
    for fe in foreach_values:
        out.append(Contender("LARS", "ours", "lars", fe, lambda ps, fe=fe: LARS(ps, foreach=fe, **SGD_KW)))
        out.append(Contender("AdamLARS", "ours", "lamb", fe, lambda ps, fe=fe: AdamLARS(ps, foreach=fe, **ADAM_KW)))
        out.append(
            Contender("RangerLARS", "ours", "ranger", fe, lambda ps, fe=fe: RangerLARS(ps, foreach=fe, **RANGER_KW))
        )
    return out


def _norm_name(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


def select_contenders(contenders: Sequence[Contender], optimizers: Iterable[str] | None) -> list[Contender]:
    """Keep ours named in ``optimizers`` (registry names and aliases work: ``lamb`` is AdamLARS), their
    peers, and the baselines they are measured against.  ``None`` keeps everything."""
    if optimizers is None:
        return list(contenders)
    from hf_lars.registry import get_optimizer_info

    wanted: set[str] = set()
    for raw in optimizers:
        key = _norm_name(raw)
        if not key:
            continue
        match = [n for n in TARGETS if _norm_name(n) == key]
        if not match:
            try:
                match = [get_optimizer_info(raw).cls.__name__]
            except ValueError:
                valid = ", ".join(TARGETS)
                raise ValueError(f"Unknown optimizer {raw!r} for the benchmark. Valid names: {valid}") from None
        wanted.update(match)
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
    """Peers from ``benchmarks/_peers.py`` of the source checkout this package lives in.

    Returns ``(contenders, notes)``; outside a checkout, or if loading fails, no contenders and a note.
    """
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_peers.py"
    if not path.is_file():
        return [], [f"peers skipped: {path} not found (peers are loaded from a source checkout of hf_lars)"]
    spec = importlib.util.spec_from_file_location("_hf_lars_bench_peers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the benchmark must run without peers
        sys.modules.pop(spec.name, None)
        return [], [f"peers skipped: could not import {path}: {err!r}"]
    return module.peer_contenders(log=log)


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

    def get(self, name: str, foreach: bool | None) -> Measurement | None:
        for m in self._ok():
            if m.contender.name == name and m.contender.foreach == foreach:
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
        """For each of ours that ran: ``(passed, why)``, judged at the setting ``foreach=None`` picks."""
        out: dict[str, tuple[bool, str]] = {}
        for name, target in TARGETS.items():
            m = self.get(name, self.default_foreach)
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
                m.contender.foreach is not False,  # per-tensor first
            ),
        )
        rows = []
        for m in ms:
            c = m.contender
            impl = _impl(c.foreach)
            if m.error is not None:
                rows.append([c.name, impl, "error", "", "", m.error])
                continue
            base = self.baseline_for(m)
            ratio = f"{self.ratio(m):.2f}x {base.contender.name}" if base is not None else "n/a"
            target, result = "", ""
            if c.role == "ours":
                if c.foreach == self.default_foreach:
                    impl += " (default)"
                    t = TARGETS[c.name]
                    target = t.describe()
                    ok, why = verdicts.get(c.name, (False, "not judged"))
                    result = "PASS" if ok else f"FAIL: {why}"
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
            per, fe = self.get(name, False), self.get(name, True)
            if per is None or fe is None:
                continue
            faster = "per-tensor" if per.median_ms <= fe.median_ms else "foreach"
            ratio = fe.median_ms / per.median_ms
            rows.append([name, f"{per.median_ms:.2f}", f"{fe.median_ms:.2f}", f"{ratio:.2f}", faster])
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
            f"Ours are judged at the setting foreach=None picks on this device: "
            f"{'foreach' if self.default_foreach else 'per-tensor'}; baselines and peers at their faster setting."
        )
        fe_rows = self._foreach_rows()
        if fe_rows:
            lines.append("")
            lines.append(f"{head}foreach=True vs foreach=False")
            lines.append("")
            header = ["optimizer", "per-tensor ms", "foreach ms", "foreach / per-tensor", "faster"]
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
