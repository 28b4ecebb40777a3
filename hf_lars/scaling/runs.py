"""Read the CSV of runs that ``hf-lars scale fit`` takes: a (batch, LR, loss) sweep or (batch, best LR) pairs.

Two layouts, told apart by the header (extra columns are ignored, names are case-insensitive):

- ``batch_size,lr,loss``: one row per run of a sweep; a loss of ``nan``/``inf`` marks a diverged run;
- ``batch_size,best_lr``: one row per batch size (repeats, e.g. seeds, allowed).

Blank lines and lines starting with ``#`` are skipped.  Every problem raises :class:`RunsFileError`, whose
message names the file, the line and the problem.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["RunsFileError", "RunsTable", "read_runs_csv", "MIN_BATCH_SIZES"]

#: Distinct batch sizes a fit needs.
MIN_BATCH_SIZES = 3


class RunsFileError(ValueError):
    """A bad runs CSV; ``str()`` is ``"PATH:LINE: problem"`` (``"PATH: problem"`` for whole-file problems)."""

    def __init__(self, path: str | os.PathLike[str], problem: str, line: int | None = None) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class RunsTable:
    """The rows of a runs CSV.  ``kind`` is ``"grid"`` (``losses`` set) or ``"best"`` (``lrs`` are best LRs)."""

    path: str
    kind: str
    batch_sizes: np.ndarray
    lrs: np.ndarray
    losses: np.ndarray | None
    lines: np.ndarray  # the file line of each row

    def grid_rows(self) -> list[tuple[float, float, float]]:
        """``(batch_size, lr, loss)`` triples for :func:`~hf_lars.scaling.grid.best_lr_from_grid`."""
        if self.losses is None:
            raise ValueError(f"{self.path} holds best LRs, not a (batch_size, lr, loss) grid")
        return list(zip(self.batch_sizes.tolist(), self.lrs.tolist(), self.losses.tolist()))


_GRID_COLUMNS = ("batch_size", "lr", "loss")
_BEST_COLUMNS = ("batch_size", "best_lr")
_EXPECTED = "expected columns batch_size,best_lr or batch_size,lr,loss"


def _parse_positive(text: str, column: str, path: str, line: int) -> float:
    value = _parse_number(text, column, path, line)
    if not math.isfinite(value) or value <= 0:
        raise RunsFileError(path, f"{column} must be a positive number, got {text.strip()!r}", line)
    return value


def _parse_number(text: str, column: str, path: str, line: int) -> float:
    stripped = text.strip()
    if not stripped:
        raise RunsFileError(path, f"empty {column} value", line)
    try:
        return float(stripped)
    except ValueError:
        raise RunsFileError(path, f"non-numeric {column} value {stripped!r}", line) from None


def _header_columns(header: list[str], path: str, line: int) -> tuple[str, dict[str, int]]:
    names = [h.strip().lower() for h in header]
    index = {name: i for i, name in enumerate(names) if name}
    if "batch_size" in index and "best_lr" in index:
        return "best", {c: index[c] for c in _BEST_COLUMNS}
    missing = [c for c in _GRID_COLUMNS if c not in index]
    if not missing:
        return "grid", {c: index[c] for c in _GRID_COLUMNS}
    if "batch_size" in index and "lr" not in index and "loss" not in index:
        missing = ["best_lr (or lr and loss)"]
    found = ", ".join(n for n in names if n) or "none"
    raise RunsFileError(path, f"missing column(s) {', '.join(missing)}; {_EXPECTED} (found: {found})", line)


def read_runs_csv(path: str | os.PathLike[str], *, min_batch_sizes: int = MIN_BATCH_SIZES) -> RunsTable:
    """Read and check a runs CSV (see the module docstring).

    Raises:
        RunsFileError: unreadable file, no header, a missing column, a row with too few values, an empty,
            non-numeric or non-positive batch size or LR, a non-numeric loss, no rows, or fewer than
            ``min_batch_sizes`` distinct batch sizes.
    """
    name = os.fspath(path)
    try:
        with open(name, newline="", encoding="utf-8-sig") as fh:
            return _read(csv.reader(fh), name, min_batch_sizes)
    except OSError as err:
        raise RunsFileError(name, f"cannot read the file: {err.strerror or err}") from None
    except csv.Error as err:
        raise RunsFileError(name, f"malformed CSV: {err}") from None


def _read(reader: Any, path: str, min_batch_sizes: int) -> RunsTable:
    kind: str | None = None
    cols: dict[str, int] = {}
    rows: list[tuple[float, float, float]] = []
    lines: list[int] = []
    for cells in reader:
        line = reader.line_num
        if not cells or all(not c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        if kind is None:
            kind, cols = _header_columns(cells, path, line)
            continue
        needed = max(cols.values()) + 1
        if len(cells) < needed:
            raise RunsFileError(path, f"expected at least {needed} values, got {len(cells)}", line)
        batch = _parse_positive(cells[cols["batch_size"]], "batch_size", path, line)
        if kind == "best":
            rows.append((batch, _parse_positive(cells[cols["best_lr"]], "best_lr", path, line), math.nan))
        else:
            lr = _parse_positive(cells[cols["lr"]], "lr", path, line)
            rows.append((batch, lr, _parse_number(cells[cols["loss"]], "loss", path, line)))
        lines.append(line)
    if kind is None:
        raise RunsFileError(path, f"empty file: no header row; {_EXPECTED}", 1)
    if not rows:
        raise RunsFileError(path, "no data rows after the header")
    data = np.asarray(rows, dtype=np.float64)
    distinct = np.unique(data[:, 0])
    if distinct.size < min_batch_sizes:
        listed = ", ".join(f"{b:g}" for b in distinct)
        raise RunsFileError(
            path, f"only {distinct.size} distinct batch size(s) ({listed}); need at least {min_batch_sizes} to fit"
        )
    return RunsTable(
        path=path,
        kind=kind,
        batch_sizes=data[:, 0],
        lrs=data[:, 1],
        losses=data[:, 2] if kind == "grid" else None,
        lines=np.asarray(lines, dtype=np.int64),
    )
