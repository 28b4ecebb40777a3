"""Shared pytest fixtures (keep small and generic)."""

from __future__ import annotations

from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """The tests use tiny tensors on a few shared cores: intra-op threads only oversubscribe them (a small
    forward/backward measured 50-80 ms with 2 threads under load, 0.3 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state (tests that need randomness should still seed their
    own ``torch.Generator``)."""
    torch.manual_seed(0)


@pytest.fixture
def registered() -> Any:
    """``hf_lars.register()`` for one test, undone afterwards unless it was registered before (a test module
    with other needs defines its own ``registered``)."""
    import hf_lars
    from hf_lars.integrations import transformers as hft

    was = hft.is_registered()
    hf_lars.register()
    yield
    if not was:
        hft.unregister()
