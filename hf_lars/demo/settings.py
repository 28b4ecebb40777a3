"""The demo's tuned table: which optimizers it compares, their learning rates at the reference batch, sizes.

Kept apart from the training code so the numbers (and how they were found) are in one short place.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REFERENCE_BATCH", "DEFAULT_STEPS", "DemoSetting", "DEMO_OPTIMIZERS", "DemoSize", "FULL_SIZE", "QUICK_SIZE"]

#: Batch size at which the learning rates below were tuned.
REFERENCE_BATCH = 128
#: Optimizer steps per run by default (0.8 of a pass over the embedded corpus at the reference batch).
DEFAULT_STEPS = 120


@dataclass(frozen=True)
class DemoSetting:
    """One optimizer of the demo: its ``--optim``, the LR tuned at :data:`REFERENCE_BATCH`, how it scales."""

    optim: str  # a TrainingArguments --optim value (a transformers name or an hf_lars registry name)
    lr: float  # tuned at REFERENCE_BATCH
    rule: str  # how lr scales with batch size (a rule of hf_lars.scaling.scaled_lr)
    optim_args: str | None = None


#: The optimizers the demo compares (label -> setting).  Learning rates from a quick sweep at batch 128 and
#: 150 steps (the default is 120, for time), eval loss after the run: AdamW 4e-3/8e-3/1.6e-2 -> 5.09/4.85/5.07; AdamLARS
#: 0.035/0.06/0.1/0.15 -> 5.12/4.52/4.84/5.68; RangerLARS 0.6/1/1.4/2 -> 4.72/4.11/4.10/5.20 (RAdam's
#: rectification keeps early steps small and Lookahead halves them, hence the large value); LARS
#: (trust_coefficient 1e-3) 20/30/45 -> 5.03/4.80/4.81.
DEMO_OPTIMIZERS: dict[str, DemoSetting] = {
    "adamw": DemoSetting("adamw_torch", 8e-3, "sqrt"),
    "adam_lars": DemoSetting("adam_lars", 0.06, "sqrt"),
    "ranger_lars": DemoSetting("ranger_lars", 1.0, "sqrt"),
    "lars": DemoSetting("lars", 30.0, "linear", "trust_coefficient=0.001,momentum=0.9"),
}


@dataclass(frozen=True)
class DemoSize:
    """The corpus slice, tokenizer and model size of a demo run (full, or quick for tests)."""

    paragraphs: int | None  # corpus paragraphs used (None: all)
    vocab_size: int
    block_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    eval_blocks: int


FULL_SIZE = DemoSize(
    paragraphs=None, vocab_size=1024, block_size=32, hidden_size=48, num_layers=2, num_heads=4, eval_blocks=256
)
QUICK_SIZE = DemoSize(paragraphs=300, vocab_size=300, block_size=16, hidden_size=16, num_layers=1, num_heads=2, eval_blocks=16)
