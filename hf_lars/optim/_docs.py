"""The ``Args`` lines that LARS, AdamLARS and RangerLARS document alike, written once.

As torch.optim builds its optimizers' docstrings from shared fragments (``_foreach_doc``, ``_maximize_doc``):
a line of a class docstring that holds only ``{name}`` of a fragment below becomes that fragment, indented
as the marker was (:func:`with_shared_args`), so ``help(LARS)`` shows every argument.  The optimizers' math
blocks are full of LaTeX braces, so markers are whole lines rather than ``str.format`` fields.
"""

from __future__ import annotations

import re
from typing import TypeVar

__all__ = ["with_shared_args"]

_T = TypeVar("_T", bound=type)

_FRAGMENTS: dict[str, tuple[str, ...]] = {
    "params": ("params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``) or param-group dicts.",),
    "exclude_1d": (
        "exclude_1d: 1-D (and 0-D) layers are excluded: no weight decay; trust ratio per ``adapt_excluded``.",
    ),
    "implementation": (
        "foreach: use the foreach implementation; ``None`` picks the faster one for the device.",
        'fused: run the step as two compiled passes (``torch.compile``; docs/design.md, "The fused path").',
        "    ``None`` (default) and ``False``: the eager step.  Pays back on long runs (see the README).",
    ),
}
_MARKER = re.compile(r"^(\s*)\{(\w+)\}$")


def with_shared_args(cls: _T) -> _T:
    """Replace each ``{name}`` line of ``cls.__doc__`` by the fragment ``name``; an unknown name raises
    ``KeyError`` when the class is defined."""
    lines = []
    for line in (cls.__doc__ or "").split("\n"):
        marker = _MARKER.match(line)
        if marker is None:
            lines.append(line)
            continue
        indent, name = marker.groups()
        lines.extend(indent + text for text in _FRAGMENTS[name])
    cls.__doc__ = "\n".join(lines)
    return cls
