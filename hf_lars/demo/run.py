"""Running the demo: prepare the corpus, tokenizer and model once, train each optimizer with ``Trainer``.

:func:`run_demo` is what ``hf-lars demo`` calls (:mod:`hf_lars.commands.demo` parses the flags); it prints
progress for the person at the terminal, writes ``loss.png``, ``results.txt`` and each run's logs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_lars.demo.corpus import corpus_datasets, tokenize_and_group, train_tokenizer
from hf_lars.demo.model import build_model, tiny_llama_config
from hf_lars.demo.settings import DEFAULT_STEPS, DEMO_OPTIMIZERS, FULL_SIZE, QUICK_SIZE, REFERENCE_BATCH, DemoSize

logger = logging.getLogger(__name__)

__all__ = ["DemoResult", "run_demo", "choose_threads", "format_results"]


@dataclass
class DemoResult:
    """One optimizer's run."""

    name: str
    lr: float
    train_loss: float
    eval_loss: float
    perplexity: float
    wall_time_s: float
    output_dir: Path


def _loss_progress_class() -> type:
    from transformers import ProgressCallback

    class LossProgress(ProgressCallback):
        """Trainer's tqdm bar, labelled with the optimizer and showing the loss instead of printing log dicts."""

        def __init__(self, label: str) -> None:
            super().__init__()
            self.label = label

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description(self.label)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            if self.training_bar is not None and logs:
                shown = {k: f"{logs[k]:.3f}" for k in ("loss", "eval_loss") if k in logs}
                if shown:
                    self.training_bar.set_postfix(shown)

    return LossProgress


def format_results(results: list[DemoResult], batch_size: int, steps: int) -> str:
    """The results table printed at the end."""
    header = f"{'optimizer':<12} {'lr':>9} {'train loss':>11} {'eval loss':>10} {'perplexity':>11} {'time (s)':>9}"
    lines = [f"global batch {batch_size}, {steps} steps, warmup + poly decay (power 2)", header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.name:<12} {r.lr:>9.3g} {r.train_loss:>11.4f} {r.eval_loss:>10.4f} {r.perplexity:>11.2f} "
            f"{r.wall_time_s:>9.1f}"
        )
    return "\n".join(lines)


def choose_threads(requested: int | None = None) -> int:
    """Intra-op threads for the demo: ``requested``, else 1 when the CPU is already busy, else torch's default.

    Measured on 2 shared cores: with the load average above the core count, 2 threads made a training step
    6-8x slower than 1 (the threads wait on each other at every op), while on an idle machine 2 threads are
    about 1.5x faster.
    """
    import os

    import torch

    if requested is not None:
        if requested < 1:
            raise ValueError(f"Invalid --threads: {requested} (must be >= 1)")
        return requested
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cores - 0.5
    except OSError:  # not available on this platform
        busy = False
    return 1 if busy else torch.get_num_threads()


def _prepare(size: DemoSize, output_dir: Path) -> tuple[Any, Any, Any]:

    raw = corpus_datasets()
    if size.paragraphs is not None:
        raw["train"] = raw["train"].select(range(min(size.paragraphs, len(raw["train"]))))
        raw["validation"] = raw["validation"].select(range(min(max(size.paragraphs // 10, 20), len(raw["validation"]))))
    tokenizer = train_tokenizer(
        raw["train"]["text"], vocab_size=size.vocab_size, cache_dir=output_dir / "tokenizer"
    )
    lm = tokenize_and_group(raw, tokenizer, block_size=size.block_size)
    lm.set_format("torch")  # tensors straight from Arrow: much less collation work per large batch
    eval_set = lm["validation"].select(range(min(size.eval_blocks, len(lm["validation"]))))
    config = tiny_llama_config(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        max_position_embeddings=max(64, size.block_size),
    )
    return lm["train"], eval_set, config


def run_demo(
    output_dir: str | Path = "hf_lars_demo",
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    optimizers: list[str] | None = None,
    quick: bool = False,
    seed: int = 0,
    threads: int | None = None,
    echo: Callable[[str], None] = logger.info,
) -> list[DemoResult]:
    """Train once per optimizer and return the results (see the module docstring); writes ``loss.png``.

    ``echo`` reports progress lines (``hf-lars demo`` prints them; the default logs them).
    """
    import datasets
    import torch
    import transformers

    import hf_lars

    hf_lars.register()
    names = list(optimizers or DEMO_OPTIMIZERS)
    unknown = [n for n in names if n not in DEMO_OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown demo optimizer(s) {unknown}; choose from {', '.join(DEMO_OPTIMIZERS)}")
    size = QUICK_SIZE if quick else FULL_SIZE
    steps = steps if steps is not None else (4 if quick else DEFAULT_STEPS)
    batch_size = batch_size if batch_size is not None else (8 if quick else REFERENCE_BATCH)
    if steps < 2 or batch_size < 1:
        raise ValueError(f"need --steps >= 2 and --batch-size >= 1 (got {steps}, {batch_size})")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    n_threads = choose_threads(threads)
    saved = (torch.get_num_threads(), transformers.logging.get_verbosity(), datasets.is_progress_bar_enabled())
    torch.set_num_threads(n_threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        return _train_all(out, names, size, steps, batch_size, seed, n_threads, quick, echo)
    finally:  # leave the process as it was (the demo also runs in-process, e.g. in tests)
        torch.set_num_threads(saved[0])
        transformers.logging.set_verbosity(saved[1])
        if saved[2]:
            datasets.enable_progress_bars()


def _train_all(
    out: Path,
    names: list[str],
    size: DemoSize,
    steps: int,
    batch_size: int,
    seed: int,
    n_threads: int,
    quick: bool,
    echo: Callable[[str], None],
) -> list[DemoResult]:
    from transformers import ProgressCallback, Trainer, TrainingArguments, default_data_collator

    from hf_lars.plotting import LossHistory, plot_losses
    from hf_lars.scaling import scaled_lr

    echo(f"preparing the embedded corpus, tokenizer and model ({'quick' if quick else 'full'} size) ...")
    train_set, eval_set, config = _prepare(size, out)
    n_params = sum(p.numel() for p in build_model(config, seed=seed).parameters())
    echo(
        f"{len(train_set)} train / {len(eval_set)} eval blocks of {size.block_size} tokens; "
        f"Llama {size.num_layers}x{size.hidden_size}, {n_params / 1e6:.2f}M parameters; "
        f"global batch {batch_size} ({batch_size * size.block_size} tokens), {steps} steps, {n_threads} thread(s)"
    )
    warmup = max(1, round(0.15 * steps))
    log_every = max(1, steps // 20)
    eval_every = max(1, math.ceil(steps / 4))  # 3 evaluations during the run, then one at the end
    results: list[DemoResult] = []
    histories: dict[str, LossHistory] = {}
    for name in names:
        setting = DEMO_OPTIMIZERS[name]
        lr = float(scaled_lr(setting.rule, REFERENCE_BATCH, setting.lr, batch_size))
        run_dir = out / name
        args = TrainingArguments(
            output_dir=str(run_dir),
            optim=setting.optim,
            optim_args=setting.optim_args,
            learning_rate=lr,
            weight_decay=0.01,
            lr_scheduler_type="warmup_poly",
            lr_scheduler_kwargs={"power": 2.0},
            warmup_steps=warmup,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=64,
            logging_steps=log_every,
            eval_strategy="steps",
            eval_steps=eval_every,
            save_strategy="no",
            report_to="none",
            seed=seed,
            use_cpu=True,
            dataloader_pin_memory=False,
            disable_tqdm=False,
            log_level="error",
        )
        model = build_model(config, seed=seed)
        trainer = Trainer(
            model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=default_data_collator
        )
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_loss_progress_class()(name))
        echo(f"\n[{name}] lr {lr:.3g} ({setting.rule} scaling from {setting.lr:g} at batch {REFERENCE_BATCH})")
        start = time.perf_counter()
        trainer.train()
        metrics = trainer.evaluate()
        wall = time.perf_counter() - start
        trainer.save_state()
        history = LossHistory.from_log_history(trainer.state.log_history)
        histories[name] = history
        eval_loss = float(metrics["eval_loss"])
        results.append(
            DemoResult(
                name=name,
                lr=lr,
                train_loss=history.train_loss[-1] if history.train_loss else math.nan,
                eval_loss=eval_loss,
                perplexity=math.exp(eval_loss) if eval_loss < 700 else math.inf,
                wall_time_s=wall,
                output_dir=run_dir,
            )
        )
    plot_losses(
        histories,
        out / "loss.png",
        title=f"hf-lars demo: global batch {batch_size}, {steps} steps, warmup + poly decay",
    )
    table = format_results(results, batch_size, steps)
    (out / "results.txt").write_text(table + "\n")
    return results
