"""Run a script of ``tests/dist`` under ``torchrun`` (2 processes, gloo or NCCL) and return its JSON result.

Every distributed test names the *backend* it runs on (:data:`BACKENDS`): ``gloo`` (2 CPU processes, what CI
runs), ``nccl`` (2 processes, one GPU each) and ``nccl1`` (one process on one GPU: a machine with a single
GPU still runs the engines' layouts and NCCL's collective, ZeRO-Offload's CPU partitions included).
:func:`backend_params` makes them pytest parameters; the NCCL ones are marked ``gpu`` and skipped, at no
cost, where the GPUs are missing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# name -> (process-group backend, processes); under NCCL each process drives GPU LOCAL_RANK.
BACKENDS: dict[str, tuple[str, int]] = {"gloo": ("gloo", 2), "nccl": ("nccl", 2), "nccl1": ("nccl", 1)}


def backend_params(*names: str) -> list[Any]:
    """``pytest.param`` for each backend name (default: all), the NCCL ones marked ``gpu`` and skipped
    without enough GPUs (the check is a device count: nothing is launched to skip)."""
    import pytest
    import torch

    out = []
    for name in names or tuple(BACKENDS):
        pg_backend, nproc = BACKENDS[name]
        marks = []
        if pg_backend == "nccl":
            gpus = torch.cuda.device_count()
            reason = f"{name}: needs {nproc} GPU(s), found {gpus}"
            marks = [pytest.mark.gpu, pytest.mark.skipif(gpus < nproc, reason=reason)]
        out.append(pytest.param(name, marks=marks, id=name))
    return out


# The first DeepSpeed run on a machine JIT-builds its shared-memory comm op (g++ + ninja, ~30 s; cached in
# ~/.cache/torch_extensions afterwards), and 2 CPU cores may be shared with other jobs: be generous.
DEFAULT_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The checkout is appended: an explicit PYTHONPATH (e.g. another checkout under test) wins.
    env["PYTHONPATH"] = os.pathsep.join([*filter(None, [env.get("PYTHONPATH")]), str(REPO)])
    env.setdefault("OMP_NUM_THREADS", "1")
    # One inductor cache for every rank and every launch (the fused cases compile): reruns start warm.
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "hf_lars_inductor_cache"))
    if extra:
        env.update(extra)
    return env


def torchrun(
    script: str,
    *args: str,
    nproc: int | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    env: dict[str, str] | None = None,
    partial: bool = False,
    backend: str = "gloo",
) -> dict[str, Any]:
    """``torchrun --nproc_per_node nproc tests/dist/<script> --out <json> *args``; the parsed JSON.

    ``backend``: a name of :data:`BACKENDS` (``"gloo"``: CPU processes; ``"nccl"``, ``"nccl1"``: one GPU per
    process), which also gives ``nproc`` unless it is passed.  The process-group backend reaches the script
    as ``HF_LARS_TEST_BACKEND`` (scripts read it through ``_common.backend()``).

    With ``partial=True`` a run that fails after writing some results returns them, with the failure's
    log under the key ``"_failure"`` (scripts that write after every case let each test report its own).

    Raises:
        AssertionError: the run failed or timed out (with the tail of its output) and left no results.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown test backend {backend!r}; use one of {sorted(BACKENDS)}")
    pg_backend, default_nproc = BACKENDS[backend]
    nproc = default_nproc if nproc is None else nproc
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(HERE / script),
            "--out",
            str(out),
            *args,
        ]
        return _run(cmd, out, timeout, {**(env or {}), "HF_LARS_TEST_BACKEND": pg_backend}, partial)


def _communicate(cmd: list[str], timeout: float, env: dict[str, str] | None) -> tuple[int | None, str]:
    """Run ``cmd`` in its own session; on timeout kill the whole session (torchrun and its workers)."""
    proc = subprocess.Popen(
        cmd,
        env=child_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=timeout)
        return proc.returncode, log
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        return None, log


def _run(cmd: list[str], out: Path, timeout: float, env: dict[str, str] | None, partial: bool) -> dict[str, Any]:
    rc, log = _communicate(cmd, timeout, env)
    failure = None
    if rc is None:
        failure = f"timed out after {timeout}s\n{_filter(log)[-6000:]}"
    elif rc != 0:
        failure = f"rc={rc}\n{_filter(log)[-6000:]}"
    if failure is None and out.exists():
        return json.loads(out.read_text())
    if partial and out.exists():
        result = json.loads(out.read_text())
        result["_failure"] = failure or "no result file"
        return result
    raise AssertionError(f"{' '.join(cmd)} failed: {failure or 'no result file'}")


def _filter(log: str) -> str:
    noise = ("FutureWarning", "return func(", "warnings.warn")
    return "\n".join(line for line in log.splitlines() if not any(n in line for n in noise))


def run_procs(
    cmds: list[list[str]], out: Path, timeout: float = DEFAULT_TIMEOUT_S, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Start several commands at once (e.g. one ``torchrun`` per "node"), wait for all; rank 0's JSON."""
    procs = [
        subprocess.Popen(
            c,
            env=child_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            start_new_session=True,
        )
        for c in cmds
    ]
    logs, failed = [], False
    for p in procs:
        try:
            log, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            log, _ = p.communicate()
            failed = True
        logs.append(log)
        failed = failed or p.returncode != 0
    if failed or not out.exists():
        raise AssertionError("multi-process run failed:\n" + "\n----\n".join(_filter(log)[-4000:] for log in logs))
    return json.loads(out.read_text())
