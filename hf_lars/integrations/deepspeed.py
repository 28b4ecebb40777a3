"""DeepSpeed: optimizer names in DeepSpeed JSON, config checks, and CPU launches.

* :func:`register` makes ``"optimizer": {"type": "LARS" | "AdamLARS" | "RangerLARS" | ..., "params": {...}}``
  work wherever DeepSpeed builds the optimizer from its config: raw ``deepspeed.initialize``, Trainer's
  ``--deepspeed`` and Accelerate's ``DummyOptim``.
* :func:`check_config` finds settings that would lose or break an hf_lars optimizer (ZeRO-Offload silently
  swapping it for ``DeepSpeedCPUAdam``, a missing ``zero_allow_untested_optimizer``, an unknown or
  misspelt ``"type"``, parameters the optimizer does not take) and says how to fix each.
* :func:`shipped_config` / :func:`resolve_config`: the configs shipped in the package
  (``hf_lars/ds_configs/*.json``) by name, so ``--deepspeed zero3`` (Trainer, after ``register()``) and
  ``deepspeed_config_file: zero2`` (the accelerate YAMLs) work from any directory.
* After :func:`register`, ``deepspeed.initialize`` with an ``"optimizer": {"type": ...}`` DeepSpeed cannot
  resolve gets :func:`check_config`'s message (a ``ValueError`` naming the valid names) instead of
  DeepSpeed's bare ``AssertionError``; see :mod:`hf_lars.integrations.deepspeed_patches`.
* CPU runs under DeepSpeed need Accelerate's state over gloo first: ``register()`` creates it when
  ``TrainingArguments(deepspeed=...)`` are built on a multi-process CPU launch
  (:func:`hf_lars.integrations.distributed.init_cpu_distributed_state`).

How DeepSpeed 0.19 resolves ``"type"`` (``deepspeed/runtime/engine.py``): names of its own optimizers
(``adam``, ``adamw``, ``lamb``, ``lion``, ...; matched case-insensitively in ``runtime/config.py``) build
DeepSpeed's kernels; any other name is looked up as ``getattr(torch.optim, type)`` (validated by
``_is_supported_optimizer``, built in ``_configure_basic_optimizer``'s last branch).  :func:`register`
therefore adds one factory per spelling of each hf_lars name to the ``torch.optim`` namespace: no
DeepSpeed code is patched, existing ``torch.optim`` names are never replaced, and calling it again changes
nothing.  ``"lamb"`` stays DeepSpeed's ``FusedLamb`` (DeepSpeed claims the name first); write
``"AdamLARS"`` for hf_lars's LAMB.

This module imports DeepSpeed only inside :func:`check_config`'s optional checks, never at import time.
"""

from __future__ import annotations

import difflib
import importlib.resources
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "set_engine_batch_size",
    "register",
    "unregister",
    "registered_names",
    "check_config",
    "check_optimizer_type",
    "shipped_configs",
    "shipped_config",
    "resolve_config",
    "resolve_accelerate_config_env",
    "DEEPSPEED_OWN_OPTIMIZERS",
]

logger = logging.getLogger(__name__)

# DeepSpeed's own optimizer names (deepspeed/runtime/config.py: DEEPSPEED_OPTIMIZERS, 0.19); a config
# "type" matching one of them case-insensitively never reaches torch.optim.
DEEPSPEED_OWN_OPTIMIZERS: tuple[str, ...] = (
    "adagrad",
    "adam",
    "adamw",
    "lamb",
    "muadam",
    "muadamw",
    "musgd",
    "lion",
    "muon",
)

_MARK = "_hf_lars_deepspeed_factory"


class _Factory:
    """``torch.optim.<spelling>(params, **kwargs)`` -> ``hf_lars.create_optimizer(params, name, **kwargs)``."""

    def __init__(self, name: str, spelling: str) -> None:
        self.name = name
        self.__name__ = self.__qualname__ = spelling
        self.__doc__ = f"hf_lars optimizer {name!r}, registered for DeepSpeed JSON by hf_lars.integrations.deepspeed."
        setattr(self, _MARK, True)

    def __call__(self, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        from hf_lars.integrations import deepspeed_patches
        from hf_lars.registry import create_optimizer

        deepspeed_patches.install()  # called inside deepspeed.initialize, before the stage-0 wrapper is built
        return create_optimizer(params, self.name, **kwargs)

    def __repr__(self) -> str:
        return f"<hf_lars optimizer factory {self.__name__!r} -> {self.name!r}>"


def _spellings(name: str, ds_type: str | None) -> list[str]:
    """The spellings registered for a registry name: snake, joined, upper, Title and DeepSpeed style."""
    words = name.split("_")
    out = [name, "".join(words), name.upper(), "".join(words).upper(), "".join(w.title() for w in words)]
    if ds_type:
        out += [ds_type, ds_type.lower(), ds_type.upper()]
    seen: dict[str, None] = {}
    for s in out:
        if s.lower() not in DEEPSPEED_OWN_OPTIMIZERS:  # DeepSpeed would never look these up
            seen.setdefault(s, None)
    return list(seen)


def _registry() -> list[Any]:
    from hf_lars.registry import get_optimizer_info, list_optimizers

    return [get_optimizer_info(n) for n in list_optimizers()]


def registered_names() -> dict[str, str]:
    """``{DeepSpeed "type" spelling: hf_lars registry name}`` for every spelling :func:`register` adds."""
    out: dict[str, str] = {}
    for info in _registry():
        for spelling in _spellings(info.name, getattr(info, "ds_type", None)):
            out.setdefault(spelling, info.name)
    return out


def register() -> tuple[str, ...]:
    """Make every hf_lars optimizer name usable as DeepSpeed's ``"optimizer": {"type": ...}``.

    Adds a factory per spelling to the ``torch.optim`` namespace (see the module docstring).  Idempotent;
    never replaces an attribute ``torch.optim`` already has (a clash is logged and skipped).  If DeepSpeed is
    installed, also installs :mod:`hf_lars.integrations.deepspeed_patches`: the stage-0 zero-gradient step at
    ``initialize`` becomes a state initialisation, and ``deepspeed.initialize`` checks an hf_lars-looking
    optimizer ``"type"`` first.

    Returns:
        The spellings now registered.
    """
    if importlib.util.find_spec("deepspeed") is not None:
        from hf_lars.integrations import deepspeed_patches

        deepspeed_patches.install()
        deepspeed_patches.wrap_initialize(check_optimizer_type)
    done = []
    for spelling, name in registered_names().items():
        current = getattr(torch.optim, spelling, None)
        if current is not None and not getattr(current, _MARK, False):
            logger.warning("hf_lars: torch.optim.%s already exists; not registering %r under that name", spelling, name)
            continue
        if current is None or getattr(current, "name", None) != name:
            setattr(torch.optim, spelling, _Factory(name, spelling))
        done.append(spelling)
    return tuple(done)


def unregister() -> None:
    """Remove what :func:`register` added to ``torch.optim`` and the ``deepspeed.initialize`` check."""
    from hf_lars.integrations import deepspeed_patches

    deepspeed_patches.unwrap_initialize()
    for spelling in list(vars(torch.optim)):
        if getattr(getattr(torch.optim, spelling), _MARK, False):
            delattr(torch.optim, spelling)


# ---------------------------------------------------------------------------------- shipped configs
_ACCELERATE_CONFIG_ENV = "ACCELERATE_DEEPSPEED_CONFIG_FILE"


def shipped_configs() -> dict[str, Path]:
    """``{name: path}`` of the DeepSpeed configs shipped in the package (``zero1``, ``zero2``, ``zero3``, ...)."""
    folder = importlib.resources.files("hf_lars") / "ds_configs"
    return {Path(str(p)).stem: Path(str(p)) for p in sorted(folder.iterdir(), key=str) if str(p).endswith(".json")}


def shipped_config(name: str) -> Path:
    """The path of the shipped config ``name`` (``"zero2"``, ``"zero2.json"`` or ``"ds_configs/zero2.json"``).

    Raises:
        ValueError: no shipped config has that name (the valid names are listed).
    """
    configs = shipped_configs()
    stem = Path(name).name
    stem = stem[: -len(".json")] if stem.endswith(".json") else stem
    if stem not in configs or Path(name).parent.name not in ("", "ds_configs"):
        raise ValueError(
            f"{name!r} is neither an existing DeepSpeed config file nor a config shipped with hf_lars; shipped: "
            f"{', '.join(configs)} (e.g. --deepspeed zero2), or give the path of your own JSON file"
        )
    return configs[stem]


def resolve_config(value: Any) -> Any:
    """``value`` itself unless it is a string naming no existing file; then the shipped config of that name.

    A dict, an existing path and ``None`` are returned unchanged, so a user's own file always wins.

    Raises:
        ValueError: a string that is neither an existing file nor a shipped config's name.
    """
    if not isinstance(value, (str, os.PathLike)) or not str(value) or Path(value).is_file():
        return value
    if str(value).lstrip().startswith("{"):  # inline JSON (TrainingArguments accepts a JSON string)
        return value
    return str(shipped_config(str(value)))


def resolve_accelerate_config_env() -> str | None:
    """Point ``ACCELERATE_DEEPSPEED_CONFIG_FILE`` (set by ``accelerate launch`` from a YAML's
    ``deepspeed_config_file``) at the shipped config when it names one and no such file exists here.

    Returns:
        The new value when it changed, else ``None``.
    """
    value = os.environ.get(_ACCELERATE_CONFIG_ENV)
    if not value or value.lower() == "none" or Path(value).is_file():
        return None
    resolved = str(shipped_config(value))
    os.environ[_ACCELERATE_CONFIG_ENV] = resolved
    logger.info("hf_lars: %s=%s is the shipped config %s", _ACCELERATE_CONFIG_ENV, value, resolved)
    return resolved


# ------------------------------------------------------------------------------------------- checks


def _load(config: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"hf_lars: {path} is not valid JSON: {err}") from err


def _valid_type_names() -> list[str]:
    """One DeepSpeed spelling per registry name (names DeepSpeed keeps for itself, i.e. "lamb", excluded)."""
    names = [getattr(info, "ds_type", None) or info.name for info in _registry()]
    return [n for n in names if n.lower() not in DEEPSPEED_OWN_OPTIMIZERS]


def _is_ours(opt_type: str) -> bool:
    from hf_lars.registry import get_optimizer_info

    if opt_type.lower() in DEEPSPEED_OWN_OPTIMIZERS:
        return False
    try:
        get_optimizer_info(opt_type)
    except ValueError:
        return False
    return True


def _check_type(opt_type: str, params: Mapping[str, Any]) -> list[str]:
    """Problems with ``"optimizer": {"type": opt_type, "params": params}`` (empty: fine)."""
    from hf_lars.registry import get_optimizer_info

    problems: list[str] = []
    if opt_type.lower() in DEEPSPEED_OWN_OPTIMIZERS:
        if opt_type.lower() == "lamb":
            logger.warning(
                'hf_lars: "type": "%s" is DeepSpeed\'s own FusedLamb (CUDA only; under ZeRO its trust ratio is '
                'computed per flat partition, not per layer).  For hf_lars\'s exact LAMB write "type": "AdamLARS".',
                opt_type,
            )
        return problems
    try:
        info = get_optimizer_info(opt_type)
    except ValueError:
        info = None
    if info is None:
        if getattr(torch.optim, opt_type, None) is not None:
            return problems  # a torch.optim optimizer
        valid = _valid_type_names()
        close = difflib.get_close_matches(opt_type, valid + [n for n in dir(torch.optim) if n[:1].isupper()], n=1)
        hint = f' Did you mean "{close[0]}"?' if close else ""
        problems.append(
            f'"optimizer.type" is {opt_type!r}, which is neither an hf_lars optimizer, a torch.optim optimizer nor '
            f"one of DeepSpeed's ({', '.join(DEEPSPEED_OWN_OPTIMIZERS)}).{hint}  hf_lars names: {', '.join(valid)}."
        )
        return problems
    factory = getattr(torch.optim, opt_type, None)
    if factory is None or not getattr(factory, _MARK, False):
        if opt_type in registered_names():
            problems.append(
                f'"optimizer.type" is {opt_type!r} (hf_lars {info.name!r}) but DeepSpeed cannot find it: call '
                "hf_lars.integrations.deepspeed.register() (or hf_lars.integrations.register()) in every process "
                "before deepspeed.initialize / Trainer / Accelerator.prepare."
            )
        else:
            spelling = info.ds_type or info.name
            spellings = ", ".join(s for s, n in registered_names().items() if n == info.name)
            problems.append(
                f'"optimizer.type" is {opt_type!r}: DeepSpeed matches names exactly; write "{spelling}" for hf_lars '
                f"{info.name!r} (registered spellings: {spellings})."
            )
    problems += _check_params(info, params)
    return problems


def _check_params(info: Any, params: Mapping[str, Any]) -> list[str]:
    import inspect

    accepted = {
        name
        for name, p in inspect.signature(info.cls.__init__).parameters.items()
        if name not in ("self", "params") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    unknown = sorted(set(params) - accepted)
    if not unknown:
        return []
    return [
        f'"optimizer.params" has {unknown} which {info.cls.__name__} does not take (Trainer fills "auto" only '
        f"for keys that are present: remove them).  {info.cls.__name__} takes: {', '.join(sorted(accepted))}."
    ]


def check_optimizer_type(config: Mapping[str, Any] | str | Path) -> None:
    """Raise :func:`check_config`'s ``ValueError`` when DeepSpeed cannot resolve the config's optimizer ``"type"``.

    Called by the checked ``deepspeed.initialize`` (after :func:`register`) before DeepSpeed reads the config:
    only a ``"type"`` that DeepSpeed would reject itself (neither one of its own names nor a ``torch.optim``
    attribute) raises, so nothing DeepSpeed would accept is refused.  A config that is not a dict or a readable
    JSON file is left to DeepSpeed.
    """
    try:
        cfg = _load(config)
    except (OSError, ValueError, TypeError):
        return
    section = cfg.get("optimizer") or {}
    opt_type = section.get("type") if isinstance(section, Mapping) else None
    if not isinstance(opt_type, str) or not opt_type:
        return
    if opt_type.lower() in DEEPSPEED_OWN_OPTIMIZERS or getattr(torch.optim, opt_type, None) is not None:
        return
    check_config(cfg)


def check_config(config: Mapping[str, Any] | str | Path, *, client_optimizer: bool | None = None) -> None:
    """Check a DeepSpeed config for settings that would lose or break an hf_lars optimizer.

    Args:
        config: the config dict or the path of its JSON file ("auto" values are fine).
        client_optimizer: whether the optimizer is built outside DeepSpeed (Trainer ``--optim``,
            ``accelerator.prepare(model, optimizer)``, ``deepspeed.initialize(optimizer=...)``).  Default:
            ``True`` when the config has no ``"optimizer"`` section.

    Raises:
        ValueError: listing every problem found and its fix.  In particular ZeRO-Offload without
            ``"zero_force_ds_cpu_optimizer": false``: DeepSpeed then refuses a client optimizer
            (``ZeRORuntimeException``), and Accelerate (hence Trainer) *silently replaces* it with
            ``DeepSpeedCPUAdam`` before DeepSpeed sees it (``accelerate/accelerator.py``,
            ``map_pytorch_optim_to_deepspeed``), so training would run Adam, not hf_lars.
    """
    cfg = _load(config)
    problems: list[str] = []
    section = cfg.get("optimizer")
    if client_optimizer is None:
        client_optimizer = not section
    zero = cfg.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    offload = "none" if offload in (None, "auto") else str(offload)

    if client_optimizer and offload != "none" and cfg.get("zero_force_ds_cpu_optimizer", True) is not False:
        problems.append(
            f'ZeRO-Offload ("offload_optimizer.device": "{offload}") with an optimizer built outside DeepSpeed: '
            "Accelerate and Trainer silently swap it for DeepSpeedCPUAdam, raw DeepSpeed refuses it.  Fix: add "
            '"zero_force_ds_cpu_optimizer": false at the top level of the config.'
        )
    if section:
        opt_type = section.get("type")
        if not isinstance(opt_type, str) or not opt_type:
            problems.append('"optimizer" needs a "type" (e.g. "LARS", "AdamLARS", "RangerLARS").')
        else:
            problems += _check_type(opt_type, section.get("params") or {})
            if _is_ours(opt_type) and stage not in (0, None) and cfg.get("zero_allow_untested_optimizer") is not True:
                problems.append(
                    f'ZeRO stage {stage} with "optimizer.type" {opt_type!r}: DeepSpeed asserts unless the config '
                    'has "zero_allow_untested_optimizer": true (Trainer and Accelerate add it only for optimizers '
                    "they build themselves).  Fix: add it at the top level."
                )
    if problems:
        raise ValueError("hf_lars: this DeepSpeed config needs changes:\n  - " + "\n  - ".join(problems))


def set_engine_batch_size(engine: Any, batch: int) -> bool:
    """Tell a DeepSpeed engine the global batch is now ``batch``; whether ``engine`` is one.

    DeepSpeed fixes ``train_batch_size`` and ``gradient_accumulation_steps`` at ``initialize``; its supported
    way to change them is ``engine.set_train_batch_size`` (more micro-batches per step, the micro-batch kept),
    which the batch-size ramp calls at each change.  Where the step ends is still told per micro-batch (the
    accumulation boundary Accelerate sets from ``sync_gradients``); the engine's count keeps its samples,
    throughput and any schedule DeepSpeed runs itself consistent with the ramp.
    """
    deepspeed = sys.modules.get("deepspeed")  # an engine exists only if DeepSpeed was imported
    if deepspeed is None or not isinstance(engine, deepspeed.DeepSpeedEngine):
        return False
    engine.set_train_batch_size(int(batch))
    return True
