"""Shared helpers for the evidence recipes (``vision_batch_scaling.py``, ``ranger_ablation.py``).

Everything runs offline on CPU: the data are scikit-learn's bundled 8x8 digits (1,797 images, shipped in
the wheel), made harder by random affine augmentation and pixel noise; the model is a three-layer convnet
with BatchNorm (a miniature ResNet stem).  The helpers here are deliberately small:

- :func:`load_digits_splits` fixed train / val / test split (same for every run);
- :func:`make_convnet`, :func:`augment`;
- :class:`RunConfig` + :func:`train_run`: one training run (fixed epoch budget, sample stream with exactly
  ``batch_size`` images per step, warmup + poly decay from :mod:`hf_lars.schedule`), returning a CSV row;
- :func:`build_optimizer`: SGD (torch) or a registered hf_lars optimizer, plus the ablation variants;
- :func:`summarize`, :func:`markdown_table`, :func:`write_csv`, :func:`read_csv`: results handling;
- :func:`experiment_parser`, :func:`run_and_report`: the command line and the ``main`` both recipes share.

The LR sweep protocol used by both recipes: train on *train*, pick the LR with the best mean *val*
accuracy over seeds, report *test* accuracy.  Test accuracy is never used to choose anything.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MODELS",
    "OPTIMIZERS",
    "RunCache",
    "RunConfig",
    "augment",
    "best_lr",
    "build_optimizer",
    "default_out_dir",
    "load_digits_splits",
    "make_convnet",
    "make_model",
    "make_plain_deep_net",
    "markdown_table",
    "mean_std",
    "pct",
    "progress_bar",
    "read_csv",
    "seed_everything",
    "single_thread",
    "summarize",
    "train_run",
    "write_csv",
]

NUM_CLASSES = 10


# ------------------------------------------------------------------------------------------------- setup
def single_thread() -> None:
    """One intra-op thread per process: the machines these run on are small and shared."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for data order and augmentation."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(10_007 * seed + 1)
    return gen


# -------------------------------------------------------------------------------------------------- data
def load_digits_splits(
    val_fraction: float = 0.15, test_fraction: float = 0.25, split_seed: int = 0, eval_copies: int = 4
) -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn's digits as ``{"train"|"val"|"test": (images [N,1,8,8], labels [N])}``.

    The split of the 1,797 originals is random but fixed (``split_seed``), the same for every run and every
    recipe: 1,078 train, 270 val, 449 test.  Training images are distorted afresh at every step
    (:func:`augment`); val and test hold ``eval_copies`` fixed distorted copies of each of their originals
    (drawn once from ``split_seed``), so they measure the same task and their accuracies are less coarse
    (``eval_copies=0``: the clean originals).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "These recipes need scikit-learn for its bundled digits data: pip install scikit-learn "
            "(or pip install -e '.[dev]')"
        ) from exc
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    n_test = round(test_fraction * len(y))
    n_val = round(val_fraction * len(y))
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    out = {"train": (x[train], y[train])}
    gen = torch.Generator().manual_seed(split_seed + 1)
    for name, idx in (("val", val), ("test", test)):
        xs, ys = x[idx], y[idx]
        if eval_copies > 0:  # a fixed draw of distorted copies: the task is distorted, noisy digits
            xs = torch.cat([augment(xs, gen) for _ in range(eval_copies)])
            ys = ys.repeat(eval_copies)
        out[name] = (xs, ys)
    return out


def augment(
    x: Tensor,
    gen: torch.Generator,
    max_rotation_deg: float = 15.0,
    scale_range: tuple[float, float] = (0.85, 1.15),
    max_shift: float = 0.375,
    noise_std: float = 0.15,
) -> Tensor:
    """Random rotation, scale and shift (one affine map per image, bilinear) plus Gaussian pixel noise.

    ``max_shift`` is in normalized coordinates (1.0 = half the image, so 0.25 = one pixel of 8).
    """
    n = x.shape[0]
    u = torch.rand(n, 4, generator=gen)
    angle = (2 * u[:, 0] - 1) * math.radians(max_rotation_deg)
    scale = scale_range[0] + (scale_range[1] - scale_range[0]) * u[:, 1]
    shift = (2 * u[:, 2:] - 1) * max_shift
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + noise_std * torch.randn(out.shape, generator=gen)


# ------------------------------------------------------------------------------------------------- model
#: Model names understood by :func:`make_model`.
MODELS = ("bn_convnet", "convnet", "plain_deep")


def make_convnet(width: int = 16, norm: bool = True) -> nn.Module:
    """conv3x3(w) -> conv3x3/2(2w) -> conv3x3/2(4w), each with BatchNorm (``norm``) + ReLU; global average pool;
    linear.

    About 24k parameters at ``width=16``; 8x8 -> 8x8 -> 4x4 -> 2x2.  Without ``norm`` the convolutions take
    biases instead of BatchNorm's shift, and He init (:func:`_he_init`).
    """

    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        if not norm:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.ReLU(inplace=True)]
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    net = nn.Sequential(
        *block(1, width, 1),
        *block(width, 2 * width, 2),
        *block(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, NUM_CLASSES),
    )
    return net if norm else _he_init(net)


def _he_init(net: nn.Module) -> nn.Module:
    """He (Kaiming-normal, fan-in, ReLU gain) weights and zero biases: the standard init of a ReLU network
    without normalization (torch's default init shrinks the signal layer by layer)."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


def make_plain_deep_net(width: int = 16) -> nn.Module:
    """Eight weight layers and no normalization: six conv3x3 (w, w, 2w/2, 2w, 4w/2, 4w), global average pool,
    linear(4w, 4w), linear(4w, 10), ReLU between them, biases everywhere.

    He (Kaiming-normal, fan-in, ReLU gain) init of the weights and zero biases, the standard init of a ReLU
    network without normalization.  About 79k parameters at ``width=16``.
    """
    w = width
    shape = [(1, w, 1), (w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1)]
    layers: list[nn.Module] = []
    for c_in, c_out, stride in shape:
        layers += [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.ReLU(inplace=True)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 4 * w), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(4 * w, NUM_CLASSES))
    return _he_init(nn.Sequential(*layers))


def make_model(name: str, width: int = 16) -> nn.Module:
    """The model ``name`` (see :data:`MODELS`): ``bn_convnet`` (:func:`make_convnet`), ``convnet`` (the same
    without BatchNorm) or ``plain_deep`` (:func:`make_plain_deep_net`)."""
    if name == "bn_convnet":
        return make_convnet(width)
    if name == "convnet":
        return make_convnet(width, norm=False)
    if name == "plain_deep":
        return make_plain_deep_net(width)
    raise ValueError(f"Unknown model {name!r}; valid: {', '.join(MODELS)}")


# ------------------------------------------------------------------------------------------- optimizers
#: Optimizer names understood by :func:`build_optimizer`.  ``ranger_lars_no_*`` are the ablation variants;
#: ``*_all`` adapt every layer (see :func:`build_optimizer`).
OPTIMIZERS = (
    "sgd",
    "lars",
    "lars_plain_excluded",
    "lars_all",
    "adam_lars",
    "adam_lars_all",
    "ranger_lars",
    "ranger_lars_all",
    "ranger_lars_no_gc",
    "ranger_lars_no_lookahead",
    "ranger_lars_no_trust",
)


def _split_decay(model: nn.Module) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim > 1 else no_decay).append((name, p))
    return decay, no_decay


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` (see :data:`OPTIMIZERS`) over ``model``'s parameters.

    Every optimizer decays only weights with more than one dimension (conv and linear weights), never
    biases or BatchNorm scales/shifts.

    - ``sgd``: ``torch.optim.SGD`` with momentum 0.9.
    - ``lars`` / ``adam_lars`` / ``ranger_lars``: the package default, :func:`hf_lars.create_optimizer`
      with the class defaults (LARS: momentum 0.9, trust coefficient 1e-3; RangerLARS: betas
      (0.95, 0.999), GC on, k=6, alpha=0.5).  Biases and BatchNorm parameters are excluded (no weight decay);
      LARS adapts them (``adapt_excluded=True``, its default), AdamLARS and RangerLARS do not (they take a
      plain Adam/RAdam step at the global LR).  docs/results.md's "package default" LARS rows were measured
      before LARS adapted excluded layers: they are ``lars_plain_excluded`` now.
    - ``lars_plain_excluded``: LARS with ``adapt_excluded=False`` (biases and BatchNorm parameters take plain
      momentum SGD at LARS's global LR).
    - ``*_all`` (``lars_all``, ``adam_lars_all``, ``ranger_lars_all``): ``adapt_excluded=True``: every layer
      adapted, as in You et al.'s Algorithm 1; biases and BatchNorm parameters still get no weight decay.
    - ``ranger_lars_no_gc``: ``use_gc=False``.
    - ``ranger_lars_no_lookahead``: ``k=1, alpha=1.0``: every step syncs and the slow weights jump to the
      fast ones (``slow += 1 * (w - slow)``; ``w = slow``), so Lookahead is the identity.
    - ``ranger_lars_no_trust``: one param group with ``excluded=True`` (and ``adapt_excluded=False``): no
      layer takes the trust ratio, and excluded layers take no weight decay, so pass ``weight_decay=0`` to
      every variant of an ablation to compare like with like.
    """
    import hf_lars

    if name == "sgd":
        decay, no_decay = _split_decay(model)
        groups = [
            {"params": [p for _, p in decay], "weight_decay": weight_decay},
            {"params": [p for _, p in no_decay], "weight_decay": 0.0},
        ]
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name in ("lars", "adam_lars", "ranger_lars"):
        return hf_lars.create_optimizer(model, name, lr=lr, weight_decay=weight_decay)
    if name in ("lars_all", "adam_lars_all", "ranger_lars_all"):
        base = name[: -len("_all")]
        return hf_lars.create_optimizer(model, base, lr=lr, weight_decay=weight_decay, adapt_excluded=True)
    if name == "lars_plain_excluded":
        return hf_lars.create_optimizer(model, "lars", lr=lr, weight_decay=weight_decay, adapt_excluded=False)
    if name == "ranger_lars_no_gc":
        return hf_lars.create_optimizer(model, "ranger_lars", lr=lr, weight_decay=weight_decay, use_gc=False)
    if name == "ranger_lars_no_lookahead":
        return hf_lars.create_optimizer(model, "ranger_lars", lr=lr, weight_decay=weight_decay, k=1, alpha=1.0)
    if name == "ranger_lars_no_trust":
        if weight_decay != 0:
            raise ValueError(
                "ranger_lars_no_trust excludes every layer, and excluded layers take no weight decay: "
                "pass weight_decay=0"
            )
        group = {"params": list(model.named_parameters()), "excluded": True, "adapt_excluded": False}
        return hf_lars.RangerLARS([group], lr=lr, weight_decay=0.0)
    raise ValueError(f"Unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


# -------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class RunConfig:
    """One training run.  ``warmup`` is ``"linear"`` (gradual), ``"constant"`` or ``"none"``."""

    optimizer: str
    lr: float
    batch_size: int
    seed: int
    epochs: float = 20.0
    warmup: str = "linear"
    warmup_epochs: float = 2.0
    warmup_start: float = 0.0  # fraction of the peak LR (Goyal: base-batch LR / peak LR)
    power: float = 2.0
    weight_decay: float = 5e-4
    width: int = 16
    augment: bool = True
    model: str = "bn_convnet"  # a name of make_model

    def key(self) -> tuple:
        return tuple(asdict(self).values())


def _steps(cfg: RunConfig, n_train: int) -> tuple[int, int]:
    total = max(2, math.ceil(cfg.epochs * n_train / cfg.batch_size))
    warm = 0 if cfg.warmup == "none" else max(1, round(cfg.warmup_epochs * n_train / cfg.batch_size))
    return total, min(warm, total - 1)


def _sample_stream(n: int, batch: int, steps: int, gen: torch.Generator) -> Iterable[Tensor]:
    """``steps`` batches of exactly ``batch`` indices from back-to-back random permutations of ``range(n)``."""
    buf = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while buf.numel() < batch:
            buf = torch.cat([buf, torch.randperm(n, generator=gen)])
        yield buf[:batch]
        buf = buf[batch:]


@torch.no_grad()
def _recompute_bn_stats(model: nn.Module, x: Tensor, gen: torch.Generator, use_augment: bool, batch: int = 512) -> None:
    """Precise BatchNorm statistics: one (augmented) pass over the training images, cumulative average.

    With only tens of steps at the largest batches, the running averages would lag behind the weights;
    recomputing them removes that confound equally for every optimizer.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for start in range(0, x.shape[0], batch):
        xb = x[start : start + batch]
        model(augment(xb, gen) if use_augment else xb)
    for m, mom in zip(bns, saved):
        m.momentum = mom


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def train_run(cfg: RunConfig, data: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Any]:
    """Train once and return a flat result row (the config plus metrics).

    Metrics: ``val_acc``, ``test_acc`` (clean images, BatchNorm statistics recomputed), ``train_loss``
    (mean over the last epoch's steps, augmented images), ``diverged`` (non-finite loss or weights: the run stops
    and is scored at chance, 0.1, for both accuracies), ``steps``,
    ``warmup_steps``, ``seconds``.
    """
    from hf_lars.schedule import get_warmup_poly_schedule

    t0 = time.perf_counter()
    gen = seed_everything(cfg.seed)
    x_train, y_train = data["train"]
    n = x_train.shape[0]
    model = make_model(cfg.model, cfg.width)
    opt = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    total, warm = _steps(cfg, n)
    sched = get_warmup_poly_schedule(
        opt,
        num_warmup_steps=warm,
        num_training_steps=total,
        power=cfg.power,
        warmup="constant" if cfg.warmup == "constant" else "linear",
        warmup_start=cfg.warmup_start if warm > 0 else 0.0,
    )
    last_epoch_steps = max(1, math.ceil(n / cfg.batch_size))
    tail_losses: list[Tensor] = []
    diverged = False
    model.train()
    for step, idx in enumerate(_sample_stream(n, cfg.batch_size, total, gen)):
        xb, yb = x_train[idx], y_train[idx]
        if cfg.augment:
            xb = augment(xb, gen)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= total - last_epoch_steps:
            tail_losses.append(loss.detach())
        if step % 16 == 0 and not torch.isfinite(loss):
            diverged = True
            break
    train_loss = float(torch.stack(tail_losses).mean()) if tail_losses and not diverged else float("nan")
    if not diverged and not all(torch.isfinite(p).all() for p in model.parameters()):
        diverged = True
    if diverged:
        val_acc = test_acc = 1.0 / NUM_CLASSES  # a non-finite network has no meaningful predictions
    else:
        _recompute_bn_stats(model, x_train, gen, cfg.augment)
        val_acc = _accuracy(model, *data["val"])
        test_acc = _accuracy(model, *data["test"])
    return {
        **asdict(cfg),
        "steps": total,
        "warmup_steps": warm,
        "val_acc": round(val_acc, 5),
        "test_acc": round(test_acc, 5),
        "train_loss": round(train_loss, 5) if math.isfinite(train_loss) else float("nan"),
        "diverged": int(diverged),
        "seconds": round(time.perf_counter() - t0, 2),
    }


class RunCache:
    """Runs keyed by their config, so a config needed twice (sweep and final) trains once."""

    def __init__(self, data: dict[str, tuple[Tensor, Tensor]], progress: Any = None) -> None:
        self.data = data
        self.progress = progress
        self.rows: dict[tuple, dict[str, Any]] = {}

    def run(self, cfg: RunConfig) -> dict[str, Any]:
        row = self.rows.get(cfg.key())
        if row is None:
            row = self.rows[cfg.key()] = train_run(cfg, self.data)
            if self.progress is not None:
                self.progress.update(1)
                self.progress.set_postfix_str(
                    f"{cfg.optimizer} B={cfg.batch_size} lr={cfg.lr:.4g} seed={cfg.seed} test={row['test_acc']:.3f}"
                )
        return row


# --------------------------------------------------------------------------------------------- results
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(
    rows: Iterable[dict[str, Any]], by: Sequence[str], metrics: Sequence[str] = ("test_acc",)
) -> list[dict[str, Any]]:
    """Group rows by the ``by`` columns (first-seen order) and add ``<metric>_mean``/``_std``, ``n``, ``diverged``."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    out = []
    for key, members in groups.items():
        rec: dict[str, Any] = dict(zip(by, key))
        rec["n"] = len(members)
        rec["diverged"] = sum(int(m["diverged"]) for m in members)
        for metric in metrics:
            rec[f"{metric}_mean"], rec[f"{metric}_std"] = mean_std([m[metric] for m in members])
        out.append(rec)
    return out


def best_lr(rows: Iterable[dict[str, Any]], metric: str = "val_acc") -> tuple[float, list[dict[str, Any]]]:
    """The LR with the best mean ``metric`` over seeds (ties: the smaller LR), and the per-LR summary."""
    summary = summarize(rows, ["lr"], [metric, "test_acc"])
    summary.sort(key=lambda r: r["lr"])
    best = max(summary, key=lambda r: (round(r[f"{metric}_mean"], 6), -r["lr"]))
    return best["lr"], summary


def write_csv(path: str, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    columns = list(columns or rows[0].keys())
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def pct(mean: float, std: float) -> str:
    """``"97.12 ± 0.31"`` (percent)."""
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def default_out_dir() -> str:
    """``docs/results`` of this checkout (independent of the working directory)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "results")


def progress_bar(total: int, desc: str, quiet: bool = False) -> Any:
    """A tqdm bar over training runs (on stderr)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", disable=quiet, dynamic_ncols=True)


def experiment_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The parser both recipes start from: ``--seeds``, ``--out-dir``, ``--quick`` (described by ``quick_help``)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1) per configuration (default 3)")
    p.add_argument("--out-dir", default=default_out_dir(), help="where CSVs and PNGs go (default docs/results)")
    p.add_argument("--quick", action="store_true", help=quick_help)
    return p


def run_and_report(
    args: argparse.Namespace,
    *,
    stem: str,
    run_columns: Sequence[str],
    run_experiment: Callable[[argparse.Namespace], dict[str, Any]],
    summary_rows: Callable[[dict[str, Any]], list[dict[str, Any]]],
    tables: Callable[[dict[str, Any], list[dict[str, Any]], argparse.Namespace], str],
    plot: Callable[[dict[str, Any], list[dict[str, Any]], argparse.Namespace], Any],
) -> int:
    """A recipe's ``main``: run, write ``<stem>_runs.csv`` (every run) and ``<stem>.csv`` (the summary), plot,
    print the tables and the wall time."""
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    res = run_experiment(args)
    summary = summary_rows(res)
    write_csv(os.path.join(args.out_dir, f"{stem}_runs.csv"), res["rows"], run_columns)
    write_csv(os.path.join(args.out_dir, f"{stem}.csv"), summary)
    plot(res, summary, args)
    minutes = (time.perf_counter() - t0) / 60
    print(tables(res, summary, args))
    print(f"\nwall time: {minutes:.1f} min; results in {args.out_dir}")
    return 0
