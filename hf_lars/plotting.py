"""PNG plots of training runs: trust-ratio heatmaps and loss curves.

- :func:`plot_trust_ratios`: layers x logging steps heatmap, log colour scale, from the ``trust_ratios.jsonl``
  that :class:`~hf_lars.TrustRatioCallback` writes (``hf-lars plot-trust OUTPUT_DIR``).
- :func:`plot_loss_curves`: train and eval loss vs step from ``trainer_state.json``, several runs overlaid
  (``hf-lars plot-loss DIR [DIR ...]``).

matplotlib is optional (``pip install hf_lars[plot]``); it is imported only when a plot is drawn, with the
non-interactive Agg backend.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "TrustRatioHistory",
    "LossHistory",
    "load_trust_ratios",
    "load_loss_history",
    "find_trainer_state",
    "plot_trust_ratios",
    "expert_blocks",
    "plot_loss_curves",
    "plot_losses",
]

logger = logging.getLogger(__name__)

TRUST_RATIO_FILE = "trust_ratios.jsonl"  # the name TrustRatioCallback writes (kept in sync by a test)
TRAINER_STATE_FILE = "trainer_state.json"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - matplotlib is a dev dependency here
        raise ImportError("plotting needs matplotlib: pip install 'hf_lars[plot]'") from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------ trust ratios
@dataclass
class TrustRatioHistory:
    """Per-layer trust ratios over logging steps: ``values[layer, step]`` (NaN where a layer has no value)."""

    steps: list[int]
    layers: list[str]
    values: np.ndarray


def load_trust_ratios(source: str | Path) -> TrustRatioHistory:
    """Read ``trust_ratios.jsonl`` (or a directory holding it).

    Layers keep the order in which they first appear (model order); a step logged twice (a resumed run)
    keeps its last row; non-positive or non-finite ratios become NaN (nothing to show on a log scale).

    Raises:
        FileNotFoundError: no such file; the message says how to produce one.
        ValueError: the file holds no rows.
    """
    path = Path(source)
    if path.is_dir() or path.suffix != ".jsonl":
        path = path / TRUST_RATIO_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: train with an hf_lars optimizer (TrustRatioCallback writes it at each logging "
            "step), or pass the file itself"
        )
    rows: dict[int, dict[str, float]] = {}
    layers: dict[str, None] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step, ratios = int(row["step"]), dict(row["trust_ratios"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{number}: not a trust-ratio row ({err})") from None
        rows[step] = ratios
        layers.update(dict.fromkeys(ratios))
    if not rows:
        raise ValueError(f"{path} holds no trust-ratio rows")
    steps = sorted(rows)
    names = _experts_together(list(layers))
    values = np.full((len(names), len(steps)), np.nan)
    index = {name: i for i, name in enumerate(names)}
    for j, step in enumerate(steps):
        for name, ratio in rows[step].items():
            if ratio is not None and math.isfinite(ratio) and ratio > 0:
                values[index[name], j] = ratio
    return TrustRatioHistory(steps, names, values)


_EXPERT = re.compile(r"^(?P<base>.+)\[(?P<expert>\d+)\]$")  # a stacked MoE parameter's expert: name[e]


def _experts_together(names: Sequence[str]) -> list[str]:
    """First-appearance order, with the experts of each stacked parameter (``name[e]``) adjacent and in order.

    Under sharding the per-rank dicts are merged, so one parameter's experts may first appear apart.
    """
    order: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        match = _EXPERT.match(name)
        base, expert = (name, -1) if match is None else (match["base"] + "[]", int(match["expert"]))
        order.setdefault(base, []).append((expert, name))
    return [name for members in order.values() for _, name in sorted(members)]


def expert_blocks(names: Sequence[str]) -> list[tuple[int, int]]:
    """``(first row, end row)`` of every run of experts of one stacked parameter in ``names``."""
    blocks: list[tuple[int, int]] = []
    previous = None
    for i, name in enumerate(names):
        match = _EXPERT.match(name)
        base = None if match is None else match["base"]
        if base is not None and base == previous:
            blocks[-1] = (blocks[-1][0], i + 1)
        elif base is not None:
            blocks.append((i, i + 1))
        previous = base
    return blocks


def _short_names(names: Sequence[str]) -> list[str]:
    """Drop the prefix every name shares up to a dot (``model.``) and the ``.weight`` suffix."""
    if len(names) > 1:
        prefix = names[0]
        for name in names[1:]:
            while not name.startswith(prefix):
                prefix = prefix[:-1]
        prefix = prefix[: prefix.rfind(".") + 1] if "." in prefix else ""
    else:
        prefix = ""
    return [re.sub(r"\.weight$", "", n[len(prefix) :]) or n for n in names]


def _tick_positions(n: int, max_ticks: int) -> list[int]:
    if n <= max_ticks:
        return list(range(n))
    stride = math.ceil(n / max_ticks)
    return list(range(0, n, stride))


def plot_trust_ratios(
    source: str | Path,
    out: str | Path | None = None,
    *,
    title: str | None = None,
    max_layer_labels: int = 60,
) -> Path:
    """Heatmap of per-layer trust ratios (rows: layers in model order; columns: logging steps), log colours.

    A stacked MoE parameter has one row per expert (``name[e]``), its experts adjacent and framed by white
    lines, labelled ``name[0]``, ``[1]``, ``[2]``, ...

    Args:
        source: ``trust_ratios.jsonl`` or the run's output directory.
        out: PNG path (default: ``trust_ratios.png`` beside the JSONL file).
        title: figure title (default: the run directory's name).
        max_layer_labels: label at most this many layers (every k-th beyond that).

    Returns:
        The PNG path.
    """
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    history = load_trust_ratios(source)
    src = Path(source)
    run_dir = src.parent if src.suffix == ".jsonl" else src
    out = Path(out) if out is not None else run_dir / "trust_ratios.png"
    values = np.ma.masked_invalid(history.values)
    finite = history.values[np.isfinite(history.values)]
    if finite.size == 0:
        raise ValueError(f"{source}: no positive finite trust ratio to plot")
    vmin, vmax = float(finite.min()), float(finite.max())
    if vmin == vmax:
        vmin, vmax = vmin / 1.5, vmax * 1.5

    n_layers, n_steps = history.values.shape
    height = min(max(3.5, 0.16 * min(n_layers, max_layer_labels) + 2.0), 18.0)
    fig, ax = plt.subplots(figsize=(10, height), constrained_layout=True)
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap, norm=LogNorm(vmin=vmin, vmax=vmax))
    rows = _tick_positions(n_layers, max_layer_labels)
    labels = _short_names(history.layers)
    for start, end in expert_blocks(history.layers):  # one row per expert, each stacked parameter framed
        ax.axhline(start - 0.5, color="white", linewidth=0.8)
        ax.axhline(end - 0.5, color="white", linewidth=0.8)
        for i in range(start + 1, end):
            labels[i] = labels[i][labels[i].rfind("[") :]  # "[e]" under the parameter's full "name[0]"
    ax.set_yticks(rows)
    ax.set_yticklabels([labels[i] for i in rows], fontsize=7 if n_layers > 30 else 8)
    cols = _tick_positions(n_steps, 12)
    ax.set_xticks(cols)
    ax.set_xticklabels([str(history.steps[j]) for j in cols])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer")
    ax.set_title(title or f"Layer-wise trust ratios: {run_dir.resolve().name}")
    fig.colorbar(image, ax=ax, label="trust ratio (log scale)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    logger.info("wrote %s (%d layers x %d steps)", out, n_layers, n_steps)
    return out


# ---------------------------------------------------------------------------------------------- losses
@dataclass
class LossHistory:
    """Train and eval loss of one run, by optimizer step."""

    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)

    @classmethod
    def from_log_history(cls, log_history: Sequence[Mapping[str, Any]]) -> LossHistory:
        """From ``TrainerState.log_history`` (``loss`` rows for training, ``eval_loss`` rows for evaluation)."""
        history = cls()
        for row in log_history:
            step = row.get("step")
            if step is None:
                continue
            if "loss" in row:
                history.train_steps.append(int(step))
                history.train_loss.append(float(row["loss"]))
            if "eval_loss" in row:
                history.eval_steps.append(int(step))
                history.eval_loss.append(float(row["eval_loss"]))
        return history


def find_trainer_state(run_dir: str | Path) -> Path:
    """``run_dir/trainer_state.json``, else the one in the highest ``checkpoint-N`` (or ``run_dir`` if it is a file).

    Raises:
        FileNotFoundError: none found; the message says where it looked.
    """
    path = Path(run_dir)
    if path.is_file():
        return path
    direct = path / TRAINER_STATE_FILE
    if direct.is_file():
        return direct
    checkpoints = [p for p in path.glob("checkpoint-*") if (p / TRAINER_STATE_FILE).is_file()]
    numbered = [(int(m.group(1)), p) for p in checkpoints if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    if numbered:
        return max(numbered)[1] / TRAINER_STATE_FILE
    raise FileNotFoundError(
        f"no {TRAINER_STATE_FILE} in {path} or its checkpoint-* folders: call trainer.save_state() after "
        "training (the recipes do), or save checkpoints"
    )


def load_loss_history(run_dir: str | Path) -> LossHistory:
    """The :class:`LossHistory` of a Trainer run (see :func:`find_trainer_state`)."""
    state = json.loads(find_trainer_state(run_dir).read_text())
    history = LossHistory.from_log_history(state.get("log_history", []))
    if not history.train_loss and not history.eval_loss:
        raise ValueError(f"{run_dir}: trainer_state.json has no loss entries (was logging_steps > max_steps?)")
    return history


def plot_losses(
    histories: Mapping[str, LossHistory],
    out: str | Path,
    *,
    title: str = "Loss",
    log_y: bool = False,
) -> Path:
    """Overlay runs: train loss (solid) and eval loss (dashed, markers) per run, one colour per run."""
    plt = _pyplot()
    if not histories:
        raise ValueError("no runs to plot")
    fig, ax = plt.subplots(figsize=(9, 5.5), constrained_layout=True)
    colors = plt.get_cmap("tab10").colors
    for i, (label, history) in enumerate(histories.items()):
        color = colors[i % len(colors)]
        if history.train_loss:
            ax.plot(history.train_steps, history.train_loss, color=color, lw=1.6, label=f"{label} (train)")
        if history.eval_loss:
            ax.plot(
                history.eval_steps, history.eval_loss, color=color, lw=1.3, ls="--", marker="o", ms=4,
                label=f"{label} (eval)",
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(histories) > 3 else 1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    logger.info("wrote %s (%d runs)", out, len(histories))
    return out


def plot_loss_curves(
    run_dirs: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    log_y: bool = False,
) -> Path:
    """Train/eval loss vs step of one or more Trainer runs (``trainer_state.json``), overlaid.

    Args:
        run_dirs: output directories (or ``trainer_state.json`` files).
        out: PNG path (default: ``loss.png`` in the first run directory).
        labels: one legend label per run (default: the directory names).
        title: figure title.
        log_y: log-scale loss axis.
    """
    if not run_dirs:
        raise ValueError("plot_loss_curves needs at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    dirs = [Path(d) for d in run_dirs]
    names = list(labels) if labels is not None else [(d if d.is_dir() else d.parent).resolve().name for d in dirs]
    histories: dict[str, LossHistory] = {}
    for name, run_dir in zip(names, dirs):
        key, n = name, 2
        while key in histories:
            key, n = f"{name} ({n})", n + 1
        histories[key] = load_loss_history(run_dir)
    first = dirs[0] if dirs[0].is_dir() else dirs[0].parent
    return plot_losses(
        histories, out if out is not None else first / "loss.png", title=title or "Training and eval loss", log_y=log_y
    )
