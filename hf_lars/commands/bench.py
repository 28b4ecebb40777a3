"""``hf-lars bench [args]``: run ``benchmarks/bench_step.py`` of the source checkout this package lives in.

The benchmark is not part of the installed package (its peers are vendored into the checkout), so an
installed wheel and a checkout never measure different things.  Installed without a checkout, the command
says where to get one.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "run_bench", "bench_script"]

_SCRIPT = Path("benchmarks") / "bench_step.py"


def bench_script() -> Path:
    """Where ``benchmarks/bench_step.py`` would be in the checkout holding this package."""
    return Path(__file__).resolve().parents[2] / _SCRIPT


def register(subparsers: Any) -> None:
    """Add ``bench`` to the ``hf-lars`` parser (for ``hf-lars --help``; :func:`hf_lars.cli.main` forwards
    everything after ``bench`` to :func:`run_bench` untouched, so the benchmark parses its own options)."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmark optimizer.step() against torch and peer optimizers (runs benchmarks/bench_step.py)",
        description="Run benchmarks/bench_step.py from the source checkout; every argument is passed on.",
        add_help=False,
    )
    parser.set_defaults(func=lambda args: run_bench([]))


def run_bench(argv: list[str]) -> int:
    """Run ``benchmarks/bench_step.py`` with ``argv``; exit status 2 with directions when there is no checkout."""
    script = bench_script()
    if not script.is_file():
        print(
            f"hf-lars bench: {script} not found. The benchmark lives in the source repository, not in the "
            "installed package: clone hf_lars and run `python benchmarks/bench_step.py --help` there "
            "(or `pip install -e .` from the checkout, after which `hf-lars bench` finds it).",
            file=sys.stderr,
        )
        return 2
    spec = importlib.util.spec_from_file_location("bench_step", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = module
    spec.loader.exec_module(module)
    return int(module.main(argv))
