"""An analytic model for the noise-scale tests: per-example gradients are exactly Gaussian with a known law.

``loss_i(w) = x_i . w`` with ``x_i ~ N(mu, diag(s^2))``: the per-example gradient is ``x_i`` whatever ``w`` is,
so ``G = mu``, ``Sigma = diag(s^2)`` and the true simple noise scale is ``B_simple = sum(s^2) / |mu|^2`` at every
step, whatever the optimizer does.  Shared by ``tests/test_noise_scale_callback.py`` and ``tests/dist/ns_ddp.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

DIM = 16
TRACE = 64.0  # tr(Sigma)
MU_SQ = 1.0  # |G|^2
TRUE_B_SIMPLE = TRACE / MU_SQ


def mean_and_std() -> tuple[torch.Tensor, torch.Tensor]:
    mu = torch.zeros(DIM)
    mu[0] = math.sqrt(MU_SQ)
    std = torch.full((DIM,), math.sqrt(TRACE / DIM))
    return mu, std


class GaussianGradModel(nn.Module):
    """``loss = mean_i x_i . w`` (Trainer divides by the accumulation steps itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(DIM))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (x @ self.w).mean()}


class TokenNormalisedModel(GaussianGradModel):
    """Accepts ``**kwargs``, so Trainer passes ``num_items_in_batch`` and does not divide the loss itself:
    ``loss = sum_i x_i . w / num_items_in_batch`` (how causal LMs normalise by tokens)."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        n = kwargs.get("num_items_in_batch")
        per_example = x @ self.w
        return {"loss": per_example.sum() / n if n is not None else per_example.mean()}


class GaussianData(Dataset):
    """``n`` draws of ``x ~ N(mu, diag(s^2))`` (and a dummy label, counted by ``num_items_in_batch``)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        mu, std = mean_and_std()
        g = torch.Generator().manual_seed(seed)
        self.x = mu + torch.randn(n, DIM, generator=g) * std

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": torch.zeros((), dtype=torch.long)}


def expected_norms(x: torch.Tensor, micro: int, accum: int, world: int) -> tuple[float, float]:
    """Exact ``(|G_b|^2 averaged over micro-batches and ranks, |G_B|^2)`` for one step's examples ``x``.

    ``x`` holds the step's ``world * accum * micro`` examples, rank-major then micro-batch-major.
    """
    g_micro = x.double().reshape(world * accum, micro, DIM).mean(1)
    small = g_micro.square().sum(1).mean().item()
    big = x.double().mean(0).square().sum().item()
    return small, big


def training_args(output_dir: str, **overrides: Any) -> dict[str, Any]:
    """Quiet CPU TrainingArguments keywords for the Gaussian model."""
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
        log_level="error",
        train_sampling_strategy="sequential",
        max_grad_norm=1e-3,  # clipping on: the measured big-batch norm must be the pre-clip one
    )
    kwargs.update(overrides)
    return kwargs
