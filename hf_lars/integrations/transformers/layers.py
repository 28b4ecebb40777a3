"""What transformers' modules say about their layers: stacked mixture-of-experts layers, and weights
stored ``(in, out)``.

hf_lars's rule for what a layer is, and the group keys that declare it (``stacked_dim``, ``transposed``),
are in docs/design.md, "Mixture-of-experts: stacked layers"; :func:`hf_lars.registry.build_param_groups`
reads :func:`layer_keys` so that a transformers model needs no user code.  Only public names of
transformers are read.

**Stacked experts.**  In transformers 5 an MoE block keeps all its experts in one parameter per projection,
experts first: Mixtral's ``mlp.experts.gate_up_proj`` is ``[num_experts, 2 * intermediate, hidden]`` and
``down_proj`` ``[num_experts, hidden, intermediate]``.  Each expert is a layer of its own.  Two sources:

* Expert modules decorated with ``transformers.integrations.moe.use_experts_implementation`` (67 classes in
  transformers 5.24: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GraniteMoE, gpt-oss, ...).  The decorator
  sets ``is_transposed`` on every instance: ``False`` stores each expert ``(out, in)`` like ``nn.Linear``
  (``F.linear(x, W[e])``), ``True`` stores it ``(in, out)`` (``x @ W[e]``: gpt-oss, Aria).  Their stacked
  parameters are the module's own parameters of at least two dimensions whose dim 0 is ``num_experts``
  (gpt-oss's per-expert biases ``[num_experts, out]`` included: each expert's bias is 1-D, so excluded).
* :data:`UNDECORATED_EXPERTS`: expert classes transformers 5.24 ships without the decorator, by class name,
  with their orientation read from their ``forward``.

Router / gate weights (``[num_experts, hidden]`` in a separate router module) are ordinary layers.  Not
covered: DBRX, whose experts are fused into 2-D ``[num_experts * ffn, hidden]`` parameters (its experts
are not a leading dimension; they are one layer each per tensor, as before).

**Weights stored (in, out).**  ``transformers.pytorch_utils.Conv1D`` (GPT-2, OpenAI GPT, and the models
that reuse them) keeps ``weight`` as ``[in, out]`` and computes ``x @ weight + bias``: its Gradient
Centralization centres columns (:func:`transposed_parameters`).
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

__all__ = ["UNDECORATED_EXPERTS", "layer_keys", "stacked_parameters", "transposed_parameters"]

#: Expert classes without ``use_experts_implementation`` (transformers 5.24): class name -> stored ``(in, out)``.
UNDECORATED_EXPERTS: dict[str, bool] = {
    "Llama4TextExperts": True,  # torch.bmm(hidden, gate_up_proj): [experts, hidden, 2 * expert_dim]
    "JetMoeParallelExperts": False,  # F.linear(x, weight[e]): [experts, output_size, input_size]
    "Step3p7Experts": False,  # F.linear(x, gate_up_proj[e])
}


def _expert_orientation(module: nn.Module) -> bool | None:
    """``is_transposed`` of an expert module, or ``None`` if ``module`` does not hold stacked experts."""
    known = UNDECORATED_EXPERTS.get(type(module).__name__)
    if known is not None and type(module).__module__.startswith("transformers."):
        return known
    transposed = getattr(module, "is_transposed", None)  # set by use_experts_implementation, with is_concatenated
    if isinstance(transposed, bool) and hasattr(module, "is_concatenated") and hasattr(module, "num_experts"):
        return transposed
    return None


def stacked_parameters(model: nn.Module) -> dict[str, bool]:
    """``{parameter name: stored (in, out)}`` for every parameter of ``model`` that stacks experts along dim 0.

    Shapes are the parameters' full shapes (``hf_lars.sharding.layer_shape``: ZeRO-3's ``ds_shape`` inside
    ``zero.Init``, a DTensor's global shape under FSDP2).
    """
    from hf_lars.sharding import layer_shape

    out: dict[str, bool] = {}
    for prefix, module in model.named_modules():
        transposed = _expert_orientation(module)
        if transposed is None:
            continue
        count = getattr(module, "num_experts", None)
        for name, p in module.named_parameters(recurse=False):
            shape = layer_shape(p)
            if len(shape) >= 2 and (count is None or shape[0] == count):
                out[f"{prefix}.{name}" if prefix else name] = transposed
    return out


def transposed_parameters(model: nn.Module) -> list[str]:
    """The names of the weights of ``model``'s ``transformers.pytorch_utils.Conv1D`` modules (and subclasses),
    which are stored ``(in, out)``: ``Conv1D(nf, nx)`` holds ``weight`` ``[nx, nf]`` and computes
    ``x @ weight + bias``.  Its bias is a vector, which has no orientation."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)  # loaded with any such model
    if conv1d is None:
        return []
    return [
        f"{prefix}.weight" if prefix else "weight"
        for prefix, module in model.named_modules()
        if isinstance(module, conv1d) and isinstance(getattr(module, "weight", None), nn.Parameter)
    ]


def layer_keys(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{parameter name: group keys}`` for every parameter of ``model`` that transformers' modules declare:
    stacked experts (``stacked_dim=0`` and their ``transposed``) and ``Conv1D`` weights (``transposed``)."""
    out: dict[str, dict[str, Any]] = {n: {"transposed": True} for n in transposed_parameters(model)}
    out.update({n: {"stacked_dim": 0, "transposed": t} for n, t in stacked_parameters(model).items()})
    return out
