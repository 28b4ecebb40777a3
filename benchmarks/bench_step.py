"""Time optimizer.step() of LARS, AdamLARS and RangerLARS against torch's SGD/AdamW and peer optimizers.

    python benchmarks/bench_step.py [--params-millions 25] [--steps 30] [--warmup 5] [--optimizers LARS,lamb]
                                    [--no-peers] [--threads N] [--markdown PATH]

The same as ``hf-lars bench``; the benchmark lives in :mod:`hf_lars.bench`, the peers in ``_peers.py``.
"""

from __future__ import annotations

import argparse
import sys

from hf_lars.commands.bench import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_step.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
