"""Run a script of ``tests/dist`` under the real ``accelerate launch`` with a shipped accelerate config; its JSON.

``launch.torchrun`` starts scripts with ``torchrun`` directly; the end-to-end tests also want what ``accelerate
launch --config_file recipes/accelerate/<name>.yaml`` does on top (the config turned into ``ACCELERATE_*`` / ``FSDP_*``
environment variables, the launcher it picks).  The command runs from the repository root: the yaml files name
their DeepSpeed JSON relative to it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dist.launch import DEFAULT_TIMEOUT_S, HERE, REPO, child_env, free_port


def accelerate_launch(
    config: str,
    script: str,
    *args: str,
    num_processes: int | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``accelerate launch --config_file <config> tests/dist/<script> --out <json> *args``; the parsed JSON.

    A run that fails after writing some results returns them with the failure's log under ``"_failure"``.

    Raises:
        AssertionError: the run failed or timed out and left no results (with the tail of its output).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config),
               "--main_process_port", str(free_port())]
        if num_processes is not None:
            cmd += ["--num_processes", str(num_processes)]
        cmd += [str(HERE / script), "--out", str(out), *args]
        proc = subprocess.Popen(cmd, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout)
            failure = None if proc.returncode == 0 else f"rc={proc.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            failure = f"timed out after {timeout}s"
        tail = "\n".join(line for line in log.splitlines() if "Warning" not in line)[-6000:]
        if not out.exists():
            raise AssertionError(f"{' '.join(cmd)} failed: {failure or 'no result file'}\n{tail}")
        result = json.loads(out.read_text())
        if failure is not None:
            result["_failure"] = f"{failure}\n{tail}"
        return result
