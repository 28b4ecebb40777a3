"""A stock-style causal-LM script in the shape of transformers' ``run_clm.py``; it never imports hf_lars.

``HfArgumentParser`` over model / data / training dataclasses, ``AutoTokenizer`` / ``AutoModelForCausalLM``
``from_pretrained`` of a local directory, ``datasets.load_dataset("text", ...)`` of local files, tokenize and
group into blocks, ``Trainer``, ``train()``, ``save_model``, ``save_state``.  The tests run it unmodified under
``hf-lars run`` with every launcher (``tests/test_launchers.py``); ``--optim lars`` and friends come from the
command line.  It prints ``STOCK: model loaded`` once the model is loaded, so a test can tell what happened
before a failure.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from itertools import chain

import datasets
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "a model directory (save_pretrained) or hub name"})


@dataclass
class DataTrainingArguments:
    train_file: str = field(metadata={"help": "a text file, one document per line"})
    block_size: int = field(default=16, metadata={"help": "tokens per training block"})


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    torch.set_num_threads(1)
    set_seed(training_args.seed)

    raw = datasets.load_dataset("text", data_files={"train": data_args.train_file})
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    print("STOCK: model loaded", flush=True)

    def tokenize(batch: dict) -> dict:
        return tokenizer(batch["text"])

    def group(batch: dict) -> dict:
        joined = {k: list(chain(*batch[k])) for k in batch}
        total = len(joined["input_ids"]) // data_args.block_size * data_args.block_size
        out = {k: [v[i : i + data_args.block_size] for i in range(0, total, data_args.block_size)] for k, v in joined.items()}
        out["labels"] = [ids[:] for ids in out["input_ids"]]
        return out

    with training_args.main_process_first(desc="tokenize"):
        tokenized = raw.map(tokenize, batched=True, remove_columns=["text"])
        blocks = tokenized.map(group, batched=True)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=blocks["train"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()


if __name__ == "__main__":
    main()
