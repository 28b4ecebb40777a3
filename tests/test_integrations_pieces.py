"""The framework-free integration pieces import no framework; the one sharding test reads every source."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from hf_lars.integrations.distributed import is_sharded, sharding_engine


@pytest.mark.parametrize("module", ["hf_lars.integrations.trust_ratios", "hf_lars.integrations.noise_monitor"])
def test_framework_free_modules_import_neither_transformers_nor_accelerate(module: str) -> None:
    code = f"import sys, {module}; print('transformers' in sys.modules, 'accelerate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_sharding_engine_reads_trainers_accelerators_and_arguments() -> None:
    assert sharding_engine(SimpleNamespace(is_deepspeed_enabled=True, is_fsdp_enabled=False)) == "deepspeed"
    assert sharding_engine(SimpleNamespace(is_deepspeed_enabled=False, is_fsdp_enabled=True)) == "fsdp"
    assert sharding_engine(SimpleNamespace(is_deepspeed_enabled=False, is_fsdp_enabled=False)) is None
    assert sharding_engine(SimpleNamespace(distributed_type=SimpleNamespace(value="DEEPSPEED"))) == "deepspeed"
    assert sharding_engine(SimpleNamespace(distributed_type=SimpleNamespace(value="FSDP"))) == "fsdp"
    assert not is_sharded(SimpleNamespace(distributed_type=SimpleNamespace(value="MULTI_CPU")))
    assert sharding_engine(SimpleNamespace(deepspeed="ds_configs/zero2.json", fsdp="")) == "deepspeed"
    assert sharding_engine(SimpleNamespace(deepspeed=None, deepspeed_plugin=None, fsdp="full_shard")) == "fsdp"
    assert not is_sharded(None)
