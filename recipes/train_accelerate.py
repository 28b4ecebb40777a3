#!/usr/bin/env python
"""Pre-train the same causal LM as ``pretrain_clm.py`` with a custom ``Accelerator`` loop.

The optimizer comes from the hf_lars registry (``--optimizer``, any name of ``hf-lars list``; ``adamw`` is
``torch.optim.AdamW`` for comparison), the schedule is warmup + poly decay
(:func:`hf_lars.schedule.get_warmup_poly_schedule`).  Data, tokenizer and model options are those of
``pretrain_clm.py`` (imported from it: keep the two files together).  Launch it like any Accelerate script::

    python recipes/train_accelerate.py --output_dir runs/acc --optimizer lars --learning_rate 5 \\
        --optim_args "trust_coefficient=0.001"
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/train_accelerate.py --output_dir runs/ddp
    accelerate launch --config_file recipes/accelerate/zero2.yaml recipes/train_accelerate.py --output_dir runs/z2

It logs loss, learning rate and trust-ratio min/median/max every ``--logging_steps`` (to ``--report_to``
trackers and the console), writes ``trust_ratios.jsonl`` and ``log_history.json``, and ends with the eval loss
and perplexity = ``exp(eval_loss)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import default_data_collator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pretrain_clm import DataArguments, ModelArguments, build_clm_model, perplexity, prepare_clm_data  # noqa: E402

from hf_lars.integrations.accelerate import (  # noqa: E402
    TrustRatioLogger,
    init_cpu_distributed_state,
    create_optimizer_and_scheduler,
)
from hf_lars.integrations.transformers import parse_optim_args  # noqa: E402
from hf_lars.registry import list_optimizers  # noqa: E402

logger = logging.getLogger("train_accelerate")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--optimizer", default="adam_lars", choices=[*list_optimizers(), "adamw"])
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--optim_args", default=None, help='other constructor arguments: "k=v,k=v"')
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=32)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--max_steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--warmup_steps", type=float, default=0.1, help="steps, or a fraction of max_steps if < 1")
    parser.add_argument("--power", type=float, default=2.0, help="poly decay exponent")
    parser.add_argument("--lr_end", type=float, default=0.0)
    parser.add_argument("--max_grad_norm", type=float, default=0.0,
                        help='clip gradients (0: off); under DeepSpeed it fills "gradient_clipping": "auto"')
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--eval_steps", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    parser.add_argument("--report_to", default="none", help="Accelerate tracker(s), e.g. tensorboard, wandb")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no_trust_ratio_jsonl", action="store_true", help="do not write trust_ratios.jsonl")
    parser.add_argument("--disable_tqdm", action="store_true")
    for dc in (ModelArguments, DataArguments):
        _add_dataclass_args(parser, dc)
    args = parser.parse_args(argv)
    if args.max_steps <= 0:
        parser.error("--max_steps must be > 0")
    return args


def _add_dataclass_args(parser: argparse.ArgumentParser, dc: type) -> None:
    """The options of pretrain_clm's ModelArguments / DataArguments, typed from their hints."""
    hints = typing.get_type_hints(dc)
    for f in dataclasses.fields(dc):
        options = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        kind = options[0] if options[0] in (int, float, str) else str
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata.get("help"))


def _dataclass(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataloader: DataLoader, accelerator: Any) -> float:
    """Mean token cross-entropy over the eval set (blocks are equal length, so the mean of batch means)."""
    model.eval()
    losses = []
    for batch in dataloader:
        loss = model(**batch).loss
        losses.append(accelerator.gather_for_metrics(loss.detach().reshape(1).repeat(batch["input_ids"].shape[0])))
    model.train()
    return torch.cat(losses).float().mean().item()


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the recipe; returns ``train_loss`` (last logged), ``eval_loss`` and ``perplexity``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"  # set by accelerate launch
    if use_deepspeed:
        init_cpu_distributed_state()  # gloo on multi-process CPU runs; no-op on GPUs and single processes
    # Plain data parallel on several CPU processes needs Accelerate's MULTI_CPU state (DDP over gloo): without
    # cpu=True each process would train alone (a gloo state made by init_cpu_distributed_state is not a DDP one).
    multi_cpu = not use_deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    trackers = None if args.report_to in ("none", "") else args.report_to.split(",")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers,
        project_dir=args.output_dir,
        cpu=multi_cpu,
    )
    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is not None and ds_plugin.is_auto("gradient_clipping"):
        # Under DeepSpeed clip_grad_norm_ below does nothing and Accelerate fills "auto" with 1.0: use --max_grad_norm.
        ds_plugin.deepspeed_config["gradient_clipping"] = args.max_grad_norm
    set_seed(args.seed)
    model_args, data_args = _dataclass(ModelArguments, args), _dataclass(DataArguments, args)
    lm, tokenizer = prepare_clm_data(model_args, data_args, args.seed, accelerator.main_process_first)
    model = build_clm_model(model_args, tokenizer, data_args.block_size, args.seed)

    generator = torch.Generator().manual_seed(args.seed)
    train_dl = DataLoader(
        lm["train"], batch_size=args.per_device_train_batch_size, shuffle=True, drop_last=True,
        collate_fn=default_data_collator, generator=generator,
    )
    eval_dl = DataLoader(lm["validation"], batch_size=args.per_device_eval_batch_size, collate_fn=default_data_collator)

    warmup = int(args.warmup_steps) if args.warmup_steps >= 1 else math.ceil(args.warmup_steps * args.max_steps)
    if args.optimizer == "adamw":
        from hf_lars.registry import build_param_groups
        from hf_lars.schedule import get_warmup_poly_schedule

        groups = build_param_groups(model, args.weight_decay)
        for g in groups:
            g.pop("excluded", None)  # an hf_lars group key; AdamW would keep it as a dead entry
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
        scheduler = get_warmup_poly_schedule(optimizer, warmup, args.max_steps, power=args.power, lr_end=args.lr_end)
    else:
        optimizer, scheduler = create_optimizer_and_scheduler(
            model, args.optimizer, lr=args.learning_rate, weight_decay=args.weight_decay,
            num_training_steps=args.max_steps, num_warmup_steps=warmup, power=args.power, lr_end=args.lr_end,
            **parse_optim_args(args.optim_args, args.optimizer),
        )
    # The scheduler is stepped here once per optimizer step and not handed to prepare(): Accelerate would step
    # it num_processes times per step.  It writes the lr into the param groups that ZeRO's optimizer shares.
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    if trackers:
        accelerator.init_trackers("train_accelerate", config={k: v for k, v in vars(args).items() if v is not None})
    trust_log = TrustRatioLogger(accelerator, None if args.no_trust_ratio_jsonl else args.output_dir)

    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    if accelerator.is_main_process:
        logger.info("%s, lr %g, global batch %d, %d steps (%d warmup), %d processes", args.optimizer,
                    args.learning_rate, global_batch, args.max_steps, warmup, accelerator.num_processes)
    history: list[dict[str, float]] = []
    progress = tqdm(total=args.max_steps, disable=args.disable_tqdm or not accelerator.is_local_main_process,
                    desc=f"train {args.optimizer}")
    step, running, count, last_loss, lr_used = 0, 0.0, 0, float("nan"), args.learning_rate
    model.train()
    while step < args.max_steps:
        for batch in train_dl:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:  # one schedule step per optimizer step, whatever the world size
                    lr_used = scheduler.get_last_lr()[0]
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            running += loss.detach().float()
            count += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % args.logging_steps == 0 or step == args.max_steps:
                last_loss = accelerator.reduce(running / count, reduction="mean").item()
                running, count = 0.0, 0
                row = {"loss": last_loss, "learning_rate": lr_used, **trust_log.log(optimizer, step)}
                accelerator.log(row, step=step)
                history.append({**row, "step": step})
                progress.set_postfix(loss=f"{last_loss:.3f}")
            if args.eval_steps and step % args.eval_steps == 0 and step < args.max_steps:
                eval_loss = evaluate(model, eval_dl, accelerator)
                accelerator.log({"eval_loss": eval_loss}, step=step)
                history.append({"eval_loss": eval_loss, "step": step})
            if step >= args.max_steps:
                break
    progress.close()

    eval_loss = evaluate(model, eval_dl, accelerator)
    metrics = {"train_loss": last_loss, "eval_loss": eval_loss, "perplexity": perplexity(eval_loss)}
    history.append({"eval_loss": eval_loss, "step": step})
    accelerator.log({"eval_loss": eval_loss, "perplexity": metrics["perplexity"]}, step=step)
    if accelerator.is_main_process:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # trainer_state.json's shape, so `hf-lars plot-loss` reads it too
        (out / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": step}, indent=1))
        (out / "eval_results.json").write_text(json.dumps(metrics, indent=1))
        logger.info("eval_loss %.4f, perplexity %.2f", eval_loss, metrics["perplexity"])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
