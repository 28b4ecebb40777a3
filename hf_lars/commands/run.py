"""``hf-lars run SCRIPT.py [script args]``: run an unmodified training script with hf_lars registered.

The script runs as ``__main__`` (``runpy``) with ``sys.argv = [SCRIPT.py, *script args]`` after
:func:`hf_lars.register`, so ``--optim lars`` and ``--lr_scheduler_type warmup_poly`` work in the official
transformers example scripts.  ``hf-lars run -m package.module [args]`` runs a module instead.  Launchers work
as usual::

    torchrun --nproc_per_node 8 -m hf_lars run run_clm.py --optim adam_lars ...
    accelerate launch --config_file recipes/accelerate/zero2.yaml -m hf_lars run run_clm.py --optim lars ...
    torchrun --nproc_per_node 2 -m hf_lars run run_clm.py --deepspeed zero3 --optim lars ...

What :func:`hf_lars.register` adds for such scripts (see :mod:`hf_lars.integrations.transformers.launch`):
``--deepspeed zero3`` names a config shipped with hf_lars, a CPU-only multi-process DeepSpeed launch gets
Accelerate's gloo process state (one log line says so), and ``--optim_args`` / ``--lr_scaling`` mistakes fail
at argument parsing.  When the script returns, successfully, a process group that is still open is closed (after a barrier),
as DeepSpeed's CPU runs otherwise sometimes abort at exit.  A script that closes its own group should do it after its
DDP model is gone (see :func:`_close_process_group`).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Sequence

__all__ = ["register", "run_script", "USAGE"]

USAGE = (
    "usage: hf-lars run SCRIPT.py [script args...]\n       hf-lars run -m MODULE [module args...]\n"
    "--lr_scaling surge|sgd|linear|sqrt|none, --lr_scaling_ref_batch N and --b_noise F among the script args are\n"
    "taken by hf-lars: --learning_rate (tuned at batch N) is rescaled to the run's global batch;\n"
    "--lr_scaling_online [--lr_scaling_min_factor F --lr_scaling_max_factor F --lr_scaling_smoothing F]\n"
    "makes it follow the B_noise measured while training; --batch_size_schedule S (or --batch_size_noise_k K\n"
    "--batch_size_min N --batch_size_max N) grows the global batch during training (LarsTrainer)."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``run`` to ``hf-lars --help`` (the CLI hands ``run`` to :func:`run_script` before parsing)."""
    parser = subparsers.add_parser(
        "run",
        help="register hf_lars with transformers, then run a training script (e.g. run_clm.py --optim lars ...)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("script", help="the training script (or -m MODULE)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments passed to the script unchanged")
    parser.set_defaults(func=lambda args: run_script([args.script, *args.script_args]))


def _exit_code(err: SystemExit) -> int:
    code = err.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _bool_flag(value: str) -> bool:
    key = value.strip().lower()
    if key not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(value)
    return key in ("true", "1", "yes")


# The --lr_scaling* flags hf-lars takes out of the script's arguments: LrScalingArguments' fields.
_LR_SCALING_FLAGS = {
    "--lr_scaling": str,
    "--lr_scaling_ref_batch": int,
    "--b_noise": float,
    "--lr_scaling_online": _bool_flag,
    "--lr_scaling_min_factor": float,
    "--lr_scaling_max_factor": float,
    "--lr_scaling_smoothing": float,
    "--b_noise_start_step": int,
    "--batch_size_schedule": str,
    "--batch_size_noise_k": float,
    "--batch_size_min": int,
    "--batch_size_max": int,
}
_VALUELESS = {"--lr_scaling_online"}  # a bare flag means true, as HfArgumentParser reads booleans


def _take_lr_scaling_flags(args: Sequence[str]) -> tuple[list[str], dict[str, object]]:
    """Remove the ``--lr_scaling*`` and ``--b_noise`` flags (``--flag v`` or ``--flag=v``)."""
    rest: list[str] = []
    found: dict[str, object] = {}
    items = list(args)
    i = 0
    while i < len(items):
        flag, eq, value = items[i].partition("=")
        if flag in _LR_SCALING_FLAGS:
            if not eq:
                bare = i + 1 >= len(items) or items[i + 1].startswith("--")
                if bare and flag in _VALUELESS:
                    value = "true"
                elif i + 1 >= len(items):
                    raise SystemExit(f"hf-lars run: {flag} needs a value")
                else:
                    value = items[i + 1]
                    i += 1
            try:
                found[flag[2:]] = _LR_SCALING_FLAGS[flag](value)
            except ValueError:
                raise SystemExit(f"hf-lars run: invalid value for {flag}: {value!r}") from None
        else:
            rest.append(items[i])
        i += 1
    return rest, found


def run_script(argv: Sequence[str]) -> int:
    """Register hf_lars, then run ``argv[0]`` (a path, or ``-m MODULE``) as ``__main__`` with ``argv[1:]``.

    Returns the script's exit status (``sys.exit(n)`` in the script gives ``n``).  ``sys.argv`` and
    ``sys.path`` are restored afterwards, so it can be called in-process.
    """
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    module = None
    if argv[0] == "-m":
        if len(argv) < 2:
            print(USAGE, file=sys.stderr)
            return 2
        module, script_args = argv[1], argv[2:]
        target = module
    else:
        target, script_args = argv[0], argv[1:]
        if not os.path.isfile(target):
            print(f"hf-lars run: no such script: {target!r}\n{USAGE}", file=sys.stderr)
            return 2

    import hf_lars

    hf_lars.register()
    script_args, scaling = _take_lr_scaling_flags(script_args)
    if scaling:
        from hf_lars.integrations.transformers import set_launch_lr_scaling

        try:
            set_launch_lr_scaling(**scaling)
        except ValueError as err:  # before the script runs, as for a malformed value above
            raise SystemExit(f"hf-lars run: {err}") from None

    saved_argv, saved_path = sys.argv[:], sys.path[:]
    try:
        if module is not None:
            sys.argv = [module, *script_args]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            path = os.path.abspath(target)
            sys.argv = [target, *script_args]
            sys.path.insert(0, os.path.dirname(path))  # what `python SCRIPT.py` does
            runpy.run_path(path, run_name="__main__")
    except SystemExit as err:
        code = _exit_code(err)
        if code == 0:
            _close_process_group()
        return code
    finally:
        if scaling:
            from hf_lars.integrations.transformers import set_launch_lr_scaling

            set_launch_lr_scaling("none")
        sys.argv = saved_argv
        sys.path[:] = saved_path
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """``barrier`` + ``destroy_process_group`` if the script left one open (clean exit of every rank).

    The script's objects are collected first, while the process group is still registered.  A DDP model's C++
    ``Reducer`` holds the gloo group without releasing the GIL when it is freed: if it held the last reference
    (freed after ``destroy_process_group``), the group's destructor joins its worker threads while one of them
    waits for the GIL to free a finished collective's tensors, and the process hangs (torch 2.13, gloo; seen
    about once in ten loaded 2-process Trainer runs).  Freed here, the group outlives it.
    """
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # the script's DDP Reducers, while the registry still holds the group
        dist.barrier()
        dist.destroy_process_group()
