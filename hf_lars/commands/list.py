"""``hf-lars list``: the optimizer registry as a table (the names ``--optim`` and DeepSpeed JSON accept)."""

from __future__ import annotations

import argparse

__all__ = ["register", "run_list", "format_table"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``list`` to the ``hf-lars`` parser."""
    parser = subparsers.add_parser(
        "list",
        help="list the registered optimizers (names for --optim, DeepSpeed 'type', create_optimizer)",
        description="Print the optimizer registry: name, class, DeepSpeed JSON type, defaults the name implies.",
    )
    parser.set_defaults(func=run_list)


def format_table() -> str:
    """The registry as an aligned text table, one optimizer per row."""
    from hf_lars.registry import get_optimizer_info, list_optimizers

    header = ("name", "class", "deepspeed type", "defaults", "description")
    rows = [header]
    for name in list_optimizers():
        info = get_optimizer_info(name)
        defaults = ", ".join(f"{k}={v!r}" for k, v in info.defaults.items()) or "-"
        rows.append((info.name, info.cls.__name__, info.ds_type or "-", defaults, info.description))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    lines.append("")
    lines.append("Trainer: --optim NAME after hf_lars.register() (or hf-lars run SCRIPT.py ...), "
                 "--lr_scheduler_type warmup_poly; Python: hf_lars.create_optimizer(model, NAME, lr=...)")
    return "\n".join(lines)


def run_list(args: argparse.Namespace) -> int:
    print(format_table())
    return 0
