"""The arrows between the package's parts (docs/design.md, "The house and its arrows"), checked on the source.

``optim/`` imports neither ``sharding/`` nor ``integrations/``; ``sharding/`` imports only the layout contract
(and itself) from the package; ``layout/`` imports only torch and the standard library.  Imports inside
functions count too: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

from hf_lars import layout

PACKAGE = Path(__file__).resolve().parents[1] / "hf_lars"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as absolute dotted names (``from a import b`` gives ``a`` and ``a.b``)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]  # the package a relative import starts from (also for __init__.py)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _modules(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("path", _modules("optim"), ids=lambda p: p.name)
def test_optim_imports_neither_sharding_nor_integrations(path: Path) -> None:
    bad = sorted(n for n in _imports(path) if _under(n, "hf_lars.sharding") or _under(n, "hf_lars.integrations"))
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", _modules("sharding"), ids=lambda p: p.name)
def test_sharding_imports_only_the_contract(path: Path) -> None:
    ours = {n for n in _imports(path) if _under(n, "hf_lars")}
    allowed = {"hf_lars", "hf_lars.layout"}
    bad = sorted(n for n in ours if not (_under(n, "hf_lars.layout") or _under(n, "hf_lars.sharding") or n in allowed))
    assert not bad, f"{path.name} imports {bad}"


def test_layout_imports_only_torch_and_the_standard_library() -> None:
    files = sorted((PACKAGE / "layout").glob("*.py"))
    assert [f.name for f in files] == ["__init__.py", "collective.py", "norms_batch.py", "row_centring.py", "scalars.py", "stacked.py"]
    for path in files:
        names = _imports(path)
        bad = sorted(
            n
            for n in names
            if n.split(".")[0] != "torch"
            and n.split(".")[0] not in sys.stdlib_module_names
            and not _under(n, "hf_lars.layout")
        )
        assert not bad, f"layout/{path.name} imports {bad}"


def test_importing_hf_lars_registers_the_resolver() -> None:
    assert layout._resolver is not None
    assert not hasattr(layout, "install_grad_centralization_hooks")  # GC runs in step(): no hook plug-in


def test_plain_parameters_need_no_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout, "_resolver", None)
    w, b = torch.zeros(3, 2), torch.zeros(3)
    layouts, shapes = layout.resolve_layouts([b], [w, b], [w, b])
    assert layouts == [layout.TensorLayout.of_layer(1, b)]
    assert shapes == [w.shape, b.shape]


def test_without_a_resolver_the_error_says_what_to_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout, "_resolver", None)
    flat = torch.zeros(9)
    with pytest.raises(RuntimeError, match="import hf_lars.sharding"):
        layout.resolve_layouts([flat], [torch.zeros(3, 2)], [flat])


def test_the_readme_use_section_runs_as_written() -> None:
    """The README's "Use" block, run on a small model with one step between its lines' objects."""
    readme = (PACKAGE.parent / "README.md").read_text()
    block = readme.split("## Use\n\n```python\n", 1)[1].split("```", 1)[0]
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    scope: dict = {"model": model}
    exec(compile(block, "README.md#use", "exec"), scope)  # noqa: S102 - the README's own code
    model(torch.randn(3, 4)).sum().backward()
    scope["opt"].step()
    scope["sched"].step()
    assert set(scope["opt"].trust_ratios()) == {"0.weight", "2.weight"}  # biases: not adapted by AdamLARS
    listed = block.split("hf_lars.list_optimizers()  # ", 1)[1].splitlines()[0]
    assert repr(scope["hf_lars"].list_optimizers()) == listed
