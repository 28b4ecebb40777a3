"""The demo's model: a small ``LlamaForCausalLM`` built from a config (no hub weights), deterministic for a seed."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from hf_lars.demo.corpus import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import transformers

__all__ = ["tiny_llama_config", "build_model"]

logger = logging.getLogger(__name__)


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    *,
    tie_word_embeddings: bool = True,
    **overrides: Any,
) -> transformers.LlamaConfig:
    """A small Llama-style config (RMSNorm, SwiGLU MLP, RoPE) for CPU-sized experiments.

    ``intermediate_size`` defaults to Llama's ``8/3 * hidden_size`` rounded up to a multiple of 32 (352 for
    128). Token ids match :func:`train_tokenizer`: pad 0, bos 1, eos 2. Input and output embeddings are
    tied by default (most of a tiny model's parameters are embeddings). ``overrides`` go to ``LlamaConfig``.
    """
    from transformers import LlamaConfig

    for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                        ("num_heads", num_heads), ("max_position_embeddings", max_position_embeddings)):
        if value <= 0:
            raise ValueError(f"Invalid {name}: {value} (must be > 0)")
    if hidden_size % num_heads:
        raise ValueError(f"Invalid num_heads: hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if intermediate_size is None:
        intermediate_size = -(-8 * hidden_size // 96) * 32  # ceil(8h/3 / 32) * 32
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
        tie_word_embeddings=tie_word_embeddings,
        use_cache=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_model(config: transformers.PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A ``*ForCausalLM`` built from ``config`` (random init, no hub weights), identical for the same seed.

    The global RNG state is left untouched (the init runs under :func:`torch.random.fork_rng`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("built %s with %.2fM parameters (seed %d)", type(model).__name__, n_params / 1e6, seed)
    return model
