"""Peers for the step benchmark: timm's ``Lars``/``Lamb``, pytorch-optimizer's ``LARS``/``Lamb``/``Ranger``.

timm is never installed: ``pip install timm`` pulls torchvision (no CPU build here), and a timm installed
without torchvision breaks ``accelerate``, which imports timm whenever it is importable.  So its wheel is
downloaded (``pip download --no-deps``) into ``.bench_vendor/`` (git-ignored), only ``timm/optim/`` is
unpacked, and ``lars.py``/``lamb.py`` (which import only torch and their siblings ``_helpers``/``_types``)
are loaded by path under a private package name.  ``timm`` itself never becomes importable.

pytorch-optimizer is used where installed (``pip install hf_lars[bench]``); otherwise its wheel is vendored
the same way and put on ``sys.path`` for this process only.

A peer that cannot be loaded is skipped with a note; the benchmark runs without peers.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import types
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench_step import ADAM_KW, RANGER_KW, SGD_KW, Contender

__all__ = ["VENDOR_DIR", "peer_contenders", "load_timm_optim", "load_pytorch_optimizer"]

VENDOR_DIR = Path(__file__).resolve().parents[1] / ".bench_vendor"
_TIMM_PKG = "_hf_lars_vendored_timm_optim"  # private name: `import timm` keeps failing


class PeerUnavailable(RuntimeError):
    """A peer could not be downloaded or imported."""


def _wheel(dist: str, vendor: Path, log: Callable[[str], None]) -> Path:
    """The newest vendored wheel of ``dist``, downloaded with ``pip download --no-deps`` when missing."""
    wheels_dir = vendor / "wheels"
    prefix = dist.replace("-", "_") + "-"
    found = sorted(wheels_dir.glob(prefix + "*.whl")) if wheels_dir.is_dir() else []
    if found:
        return found[-1]
    wheels_dir.mkdir(parents=True, exist_ok=True)
    log(f"peers: downloading {dist} (pip download --no-deps) into {wheels_dir} ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels_dir), dist]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PeerUnavailable(f"could not run pip to download {dist}: {err}") from err
    found = sorted(wheels_dir.glob(prefix + "*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise PeerUnavailable(
            f"pip could not download {dist} (is the package index reachable?): {' | '.join(tail) or 'no wheel'}"
        )
    return found[-1]


def _unpack(wheel: Path, vendor: Path, members_prefix: str = "") -> Path:
    """Unzip ``wheel`` (only names under ``members_prefix``) into ``vendor/<wheel name>/`` once."""
    dest = vendor / wheel.name.removesuffix(".whl")
    marker = dest / ".unpacked"
    if not marker.exists():
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.startswith(members_prefix)]
            zf.extractall(dest, members=names)
        marker.touch()
    return dest


def load_timm_optim(vendor: Path = VENDOR_DIR, log: Callable[[str], None] = print) -> tuple[Any, Any, str]:
    """``(lars module, lamb module, timm version)`` from the vendored timm wheel, loaded by path."""
    wheel = _wheel("timm", vendor, log)
    root = _unpack(wheel, vendor, "timm/optim/")
    optim_dir = root / "timm" / "optim"
    version = wheel.name.split("-")[1]
    pkg = sys.modules.get(_TIMM_PKG)
    if pkg is None:
        pkg = types.ModuleType(_TIMM_PKG)
        pkg.__path__ = [str(optim_dir)]  # a namespace for the relative imports (from ._helpers import ...)
        sys.modules[_TIMM_PKG] = pkg
    mods = []
    for name in ("lars", "lamb"):
        full = f"{_TIMM_PKG}.{name}"
        if full not in sys.modules:
            spec = importlib.util.spec_from_file_location(full, optim_dir / f"{name}.py")
            if spec is None or spec.loader is None:
                raise PeerUnavailable(f"timm/optim/{name}.py not found in {wheel.name}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[full] = module
            try:
                spec.loader.exec_module(module)
            except Exception:
                sys.modules.pop(full, None)
                raise
        mods.append(sys.modules[full])
    return mods[0], mods[1], version


def load_pytorch_optimizer(vendor: Path = VENDOR_DIR, log: Callable[[str], None] = print) -> tuple[Any, str]:
    """The ``pytorch_optimizer`` module (installed, else vendored onto ``sys.path``) and "version (how)"."""
    try:
        module = importlib.import_module("pytorch_optimizer")
        how = "installed"
    except ImportError:
        wheel = _wheel("pytorch-optimizer", vendor, log)
        root = _unpack(wheel, vendor)
        sys.path.insert(0, str(root))
        module = importlib.import_module("pytorch_optimizer")
        how = f"vendored in {vendor.name}/"
    version = getattr(module, "__version__", "") or _dist_version("pytorch-optimizer")
    return module, f"{version} ({how})"


def _dist_version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return "?"


def _plain(named: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    return [p for _, p in named]


def peer_contenders(
    foreach_values: tuple[bool, ...] = (False, True),
    vendor: Path = VENDOR_DIR,
    log: Callable[[str], None] = print,
) -> tuple[list[Contender], list[str]]:
    """The peers at each ``foreach`` setting, and notes (versions, skipped peers, settings used).

    Settings match ours so all do the same work: the LARS family gets momentum 0.9 and no weight decay,
    and timm's ``Lars`` ``always_adapt=True`` (without it, timm skips the trust ratio when weight decay is
    0); the LAMB family weight decay 0.01 and no global gradient clipping (timm ``max_grad_norm=None``;
    pytorch-optimizer's ``Lamb`` clips only with ``pre_norm=True``); Ranger betas (0.95, 0.999), weight decay
    0.01, GC, k=6, alpha=0.5.
    """
    contenders: list[Contender] = []
    notes: list[str] = []
    try:
        lars_mod, lamb_mod, version = load_timm_optim(vendor, log)
    except Exception as err:  # noqa: BLE001 - the benchmark runs without this peer
        notes.append(f"timm peers skipped: {err}")
        log(f"peers: timm skipped: {err}")
    else:
        notes.append(f"timm {version} (vendored in {vendor.name}/, loaded by path; never installed)")
        for fe in foreach_values:
            contenders.append(
                Contender(
                    "timm Lars", "peer", "lars", fe,
                    lambda ps, fe=fe: lars_mod.Lars(_plain(ps), always_adapt=True, foreach=fe, **SGD_KW),
                    note="always_adapt=True (else no trust ratio without weight decay); adapts 1-D tensors too",
                )
            )
            contenders.append(
                Contender(
                    "timm Lamb", "peer", "lamb", fe,
                    lambda ps, fe=fe: lamb_mod.Lamb(_plain(ps), max_grad_norm=None, foreach=fe, **ADAM_KW),
                    note="max_grad_norm=None (no global gradient clipping, like ours); adapts 1-D tensors too",
                )
            )
    try:
        po, version = load_pytorch_optimizer(vendor, log)
    except Exception as err:  # noqa: BLE001
        notes.append(f"pytorch-optimizer peers skipped: {err}")
        log(f"peers: pytorch-optimizer skipped: {err}")
    else:
        notes.append(f"pytorch-optimizer {version}")
        for fe in foreach_values:
            contenders.append(
                Contender(
                    "pytorch-optimizer LARS", "peer", "lars", fe,
                    lambda ps, fe=fe: po.LARS(_plain(ps), trust_coefficient=1e-3, foreach=fe, **SGD_KW),
                )
            )
            contenders.append(
                Contender(
                    "pytorch-optimizer Lamb", "peer", "lamb", fe,
                    lambda ps, fe=fe: po.Lamb(_plain(ps), eps=1e-6, foreach=fe, **ADAM_KW),
                    note="defaults otherwise (pre_norm=False: no global gradient clipping)",
                )
            )
            contenders.append(
                Contender(
                    "pytorch-optimizer Ranger", "peer", "ranger", fe,
                    lambda ps, fe=fe: po.Ranger(_plain(ps), eps=1e-6, k=6, alpha=0.5, foreach=fe, **RANGER_KW),
                    note="GC on all tensors with ndim > 1 (gc_conv_only=False), k=6, alpha=0.5",
                )
            )
    return contenders, notes
