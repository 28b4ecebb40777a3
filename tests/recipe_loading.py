"""Loading the recipe scripts under recipes/ as modules, for the evidence smoke tests."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load_recipe(name: str) -> ModuleType:
    """Import ``recipes/<name>.py`` (the recipes import their siblings, so the folder goes on sys.path)."""
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    spec = importlib.util.spec_from_file_location(f"_recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    """The recipes set one thread per process: give the rest of the suite its thread count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
