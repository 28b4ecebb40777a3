"""An ordinary Trainer script (it never imports hf_lars's registration): ``--optim`` comes from the command line.

Run as ``hf-lars run tests/dist/hf_trainer_script.py --result OUT.json [TrainingArguments flags]``, in-process or
under ``torchrun ... -m hf_lars run``.  Rank 0 writes the logged losses, the optimizer class and the final
weights' checksum to ``--result``.  Like most training scripts it leaves the process group open: ``hf-lars run``
closes it when the script returns.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_common import TokenBlocks, tiny_model  # noqa: E402


@dataclass
class ScriptArguments:
    result: str = field(metadata={"help": "JSON file for the results (rank 0)"})


def main() -> None:
    script_args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    torch.set_num_threads(1)
    trainer = Trainer(model=tiny_model(seed=0), args=training_args, train_dataset=TokenBlocks(64, seed=0))
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if trainer.is_world_process_zero():
        weights = {n: p.detach().double().sum().item() for n, p in trainer.model.named_parameters()}
        Path(script_args.result).write_text(
            json.dumps(
                {
                    "optimizer": type(inner).__name__,
                    "world_size": training_args.world_size,
                    "losses": [row["loss"] for row in trainer.state.log_history if "loss" in row],
                    "trust_ratio_max": [row.get("trust_ratio_max") for row in trainer.state.log_history if "loss" in row],
                    "weights": weights,
                    "pid": os.getpid(),
                }
            )
        )


if __name__ == "__main__":
    main()
