#!/usr/bin/env python
"""Pre-train a small Llama-style causal LM with ``Trainer`` and an hf_lars optimizer (large-batch friendly).

By default everything is offline: the data is the corpus embedded in hf_lars (CPython stdlib docstrings,
:mod:`hf_lars.demo`), split into train/validation with ``datasets``; the tokenizer is a byte-level BPE trained on
the train split with ``tokenizers``; the model is a ``LlamaForCausalLM`` built from a config (random init, no
hub weights).  Real runs pass hub names or files instead::

    --dataset_name wikitext --dataset_config_name wikitext-103-raw-v1     # datasets.load_dataset
    --train_file data/train.txt [--validation_file data/val.txt]          # .txt / .json / .jsonl / .csv
    --tokenizer_name gpt2                                                  # AutoTokenizer.from_pretrained
    --config_name meta-llama/Llama-3.2-1B [--config_overrides "num_hidden_layers=8"]   # AutoConfig, random init

Everything else is ``TrainingArguments`` (``--optim``, ``--optim_args``, ``--lr_scheduler_type warmup_poly``,
``--lr_scheduler_kwargs``, ``--warmup_steps``, ``--deepspeed`` ...), with these recipe defaults (pass a flag
to override): ``--optim adam_lars --learning_rate 2e-3 --weight_decay 0.01 --lr_scheduler_type warmup_poly
--lr_scheduler_kwargs '{"power": 2.0}' --warmup_steps 0.1 --max_steps 200 --per_device_train_batch_size 32
--logging_steps 10 --eval_strategy steps --eval_steps 50 --save_strategy no --report_to none``.

Examples::

    python recipes/pretrain_clm.py --output_dir runs/lamb
    python recipes/pretrain_clm.py --output_dir runs/lars --optim lars --learning_rate 5 \\
        --optim_args "trust_coefficient=0.001,momentum=0.9"
    torchrun --nproc_per_node 2 recipes/pretrain_clm.py --output_dir runs/ddp
    accelerate launch --config_file recipes/accelerate/zero2.yaml recipes/pretrain_clm.py --output_dir runs/z2

At the end it reports the eval loss and the perplexity, computed as ``exp(eval_loss)`` (the mean token
cross-entropy; no download needed), and writes ``trainer_state.json`` for ``hf-lars plot-loss`` and
``trust_ratios.jsonl`` for ``hf-lars plot-trust``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import transformers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import hf_lars
from hf_lars import demo as hf_data
from hf_lars.integrations.accelerate import init_cpu_distributed_state

logger = logging.getLogger("pretrain_clm")

RECIPE_DEFAULTS: dict[str, Any] = {
    "optim": "adam_lars",
    "learning_rate": 2e-3,
    "weight_decay": 0.01,
    "lr_scheduler_type": "warmup_poly",
    "lr_scheduler_kwargs": '{"power": 2.0}',
    "warmup_steps": 0.1,
    "max_steps": 200,
    "per_device_train_batch_size": 32,
    "logging_steps": 10,
    "eval_strategy": "steps",
    "eval_steps": 50,
    "save_strategy": "no",
    "report_to": "none",
}


@dataclass
class ModelArguments:
    """The model and tokenizer: hub names/paths, or a small Llama built from a config and a BPE trained here."""

    config_name: str | None = field(
        default=None, metadata={"help": "AutoConfig name or path (random init). Default: a small Llama config."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Config overrides 'key=value,key=value' (PretrainedConfig.update_from_string)."}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "AutoTokenizer name or path. Default: train a byte-level BPE on the train split."},
    )
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of the BPE trained when no --tokenizer_name."})
    hidden_size: int = field(default=128, metadata={"help": "Default model: hidden size."})
    num_layers: int = field(default=4, metadata={"help": "Default model: decoder layers."})
    num_heads: int = field(default=4, metadata={"help": "Default model: attention heads."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Default model: MLP width (8/3 h)."})


@dataclass
class DataArguments:
    """The text: the embedded corpus (default), a hub dataset, or local files."""

    dataset_name: str | None = field(default=None, metadata={"help": "datasets.load_dataset name (hub or local)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "A .txt (one text per line), .json/.jsonl or .csv."})
    validation_file: str | None = field(default=None, metadata={"help": "Same format as --train_file."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of train held out for validation when there is no validation split."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training texts."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many validation texts."})
    tokenizer_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache for the trained BPE (reused when the texts are the same)."}
    )


def parse_args(
    argv: Sequence[str] | None = None, *, use_configured_state: bool = False
) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the three dataclasses (or one JSON file), with :data:`RECIPE_DEFAULTS` as defaults."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    parser.set_defaults(**RECIPE_DEFAULTS)
    if use_configured_state:
        parser.set_defaults(accelerator_config='{"use_configured_state": true}')
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


# ------------------------------------------------------------------------------------------------- data
def load_raw_datasets(data_args: DataArguments, seed: int = 0) -> datasets.DatasetDict:
    """``train`` and ``validation`` splits of raw text (column ``data_args.text_column``)."""
    if data_args.dataset_name is not None:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    elif data_args.train_file is not None:
        files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            files["validation"] = data_args.validation_file
        extension = Path(data_args.train_file).suffix.lstrip(".").lower()
        builder = {"txt": "text", "text": "text", "jsonl": "json", "json": "json", "csv": "csv"}.get(extension)
        if builder is None:
            raise ValueError(f"--train_file {data_args.train_file!r}: use a .txt, .json, .jsonl or .csv file")
        raw = datasets.load_dataset(builder, data_files=files)
    else:
        return _limit(hf_data.corpus_datasets(data_args.validation_split_percentage / 100, seed=0), data_args)
    if not isinstance(raw, datasets.DatasetDict) or "train" not in raw:
        raise ValueError(f"the dataset has no 'train' split (found: {list(raw)})")
    if "validation" not in raw:
        if not 0 < data_args.validation_split_percentage < 100:
            raise ValueError("no validation split: set --validation_split_percentage in (0, 100) or --validation_file")
        split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=seed)
        raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    column = data_args.text_column
    for name in ("train", "validation"):
        if column not in raw[name].column_names:
            raise ValueError(f"split {name!r} has no column {column!r} (columns: {raw[name].column_names}); "
                             "set --text_column")
    raw = datasets.DatasetDict(
        {name: raw[name].filter(lambda row: bool(str(row[column]).strip())) for name in ("train", "validation")}
    )
    return _limit(raw, data_args)


def _limit(raw: datasets.DatasetDict, data_args: DataArguments) -> datasets.DatasetDict:
    for name, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None:
            raw[name] = raw[name].select(range(min(limit, len(raw[name]))))
    return raw


def load_tokenizer(
    model_args: ModelArguments, data_args: DataArguments, raw: datasets.DatasetDict
) -> transformers.PreTrainedTokenizerBase:
    """``--tokenizer_name`` if given, else a byte-level BPE trained on the train split."""
    if model_args.tokenizer_name is not None:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {model_args.tokenizer_name!r} has no eos_token (needed between documents)")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return hf_data.train_tokenizer(
        raw["train"][data_args.text_column], vocab_size=model_args.vocab_size, cache_dir=data_args.tokenizer_cache_dir
    )


def build_clm_model(
    model_args: ModelArguments, tokenizer: transformers.PreTrainedTokenizerBase, block_size: int, seed: int
) -> transformers.PreTrainedModel:
    """A causal LM from ``--config_name`` (random init) or the default small Llama config."""
    if model_args.config_name is not None:
        config = AutoConfig.from_pretrained(model_args.config_name)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        model = hf_data.build_model(config, seed=seed)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        return model
    config = hf_data.tiny_llama_config(
        vocab_size=len(tokenizer),
        hidden_size=model_args.hidden_size,
        num_layers=model_args.num_layers,
        num_heads=model_args.num_heads,
        intermediate_size=model_args.intermediate_size,
        max_position_embeddings=max(512, block_size),
    )
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    return hf_data.build_model(config, seed=seed)


def prepare_clm_data(
    model_args: ModelArguments, data_args: DataArguments, seed: int, main_process_first: Any = None
) -> tuple[datasets.DatasetDict, transformers.PreTrainedTokenizerBase]:
    """Raw text -> tokenizer -> ``block_size`` blocks (``input_ids``, ``attention_mask``, ``labels``).

    ``main_process_first``: a no-argument factory of the context manager that lets the main process prepare
    the data before the others (``Accelerator.main_process_first``); ``None`` for a single process.
    """
    import contextlib

    guard = main_process_first if main_process_first is not None else contextlib.nullcontext
    with guard():
        raw = load_raw_datasets(data_args, seed)
        tokenizer = load_tokenizer(model_args, data_args, raw)
        lm = hf_data.tokenize_and_group(raw, tokenizer, data_args.block_size, text_column=data_args.text_column)
    for name in ("train", "validation"):
        if len(lm[name]) == 0:
            raise ValueError(f"the {name} split has fewer than block_size={data_args.block_size} tokens: "
                             "lower --block_size or add text")
    return lm, tokenizer


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean token cross-entropy (``inf`` on overflow)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


# ------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the recipe; returns the final metrics (``train_loss``, ``eval_loss``, ``perplexity``)."""
    hf_lars.register()  # --optim lars / --lr_scheduler_type warmup_poly; idempotent
    # multi-process CPU launches (DeepSpeed, DDP): gloo state first, and Trainer must keep it
    argv = list(sys.argv[1:] if argv is None else argv)
    deepspeed = any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv)
    cpu_state = init_cpu_distributed_state(deepspeed=deepspeed)
    model_args, data_args, training_args = parse_args(argv, use_configured_state=cpu_state is not None)

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, handlers=[logging.StreamHandler()]
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info("optimizer %s, scheduler %s, world size %d", training_args.optim, training_args.lr_scheduler_type,
                training_args.world_size)

    set_seed(training_args.seed)
    lm, tokenizer = prepare_clm_data(
        model_args, data_args, training_args.seed, lambda: training_args.main_process_first(desc="prepare the data")
    )
    model = build_clm_model(model_args, tokenizer, data_args.block_size, training_args.seed)
    logger.info("model: %.2fM parameters; %d train / %d eval blocks of %d tokens",
                sum(p.numel() for p in model.parameters()) / 1e6, len(lm["train"]), len(lm["validation"]),
                data_args.block_size)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=lm["train"],
        eval_dataset=lm["validation"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    train_metrics = dict(result.metrics)
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)

    eval_metrics = trainer.evaluate()
    eval_metrics["perplexity"] = perplexity(eval_metrics["eval_loss"])  # exp(mean token cross-entropy)
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()
    return {
        "train_loss": float(train_metrics.get("train_loss", float("nan"))),
        "eval_loss": float(eval_metrics["eval_loss"]),
        "perplexity": float(eval_metrics["perplexity"]),
    }


if __name__ == "__main__":
    main()
