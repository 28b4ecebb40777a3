"""Tiny model, data and Trainer settings shared by the Trainer-integration tests and ``hf_trainer_script.py``.

Everything is small enough for a Trainer run of a few steps to take about a second on one CPU core.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

VOCAB = 64
SEQ_LEN = 16


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """A 1-layer Llama (hidden 16): embeddings, attention, MLP, RMSNorms (the no-decay group)."""
    from hf_lars import demo as data

    config = data.tiny_llama_config(
        vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=32
    )
    return data.build_model(config, seed=seed)


class TokenBlocks(Dataset):
    """``n`` random token blocks (``input_ids`` = ``labels``), the same for the same seed."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_args(output_dir: str, **overrides: Any) -> dict[str, Any]:
    """TrainingArguments keywords for a quiet, CPU-only, few-step run (override anything)."""
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
        log_level="error",
    )
    kwargs.update(overrides)
    return kwargs


def tiny_cli_args(output_dir: str, **overrides: Any) -> list[str]:
    """:func:`tiny_args` as command-line flags (for HfArgumentParser)."""
    flags: list[str] = []
    for key, value in tiny_args(output_dir, **overrides).items():
        if value is None:
            continue
        flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags
