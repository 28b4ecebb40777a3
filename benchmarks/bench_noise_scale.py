"""Overhead of measuring the gradient noise scale: a training step with and without it, as a ratio.

    python benchmarks/bench_noise_scale.py [--mode loop|trainer|both] [--hidden 128] [--layers 2] [--vocab 2048]
                                           [--micro-batch 8] [--block 64] [--accum 4] [--steps 20] [--repeats 5]

``loop``: a hand-written step (``accum`` forward/backward passes of a tiny Llama, clipping, AdamW step) with and
without :class:`~hf_lars.integrations.noise_scale.GradientNoiseScaleMonitor` (hooks + ``step()`` + ``compute()``
every 10 steps, as a logging interval).  ``trainer``: ``Trainer.train()`` for ``--steps`` steps (logging every 10)
with and without :class:`~hf_lars.integrations.noise_scale.GradientNoiseScaleCallback`.
Both alternate the two variants step by step on one model (``--steps x --repeats`` steps each; the
callback's hooks are attached on every other Trainer step, timed from one ``on_step_begin`` to the next so that
logging is included), so both see the same load from other processes.  Times are CPU times
(``time.process_time``, one thread), which waiting for a busy core does not inflate; medians are compared.
Prints one line per mode: ``overhead ratio = with / without``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time

import torch

from hf_lars import demo as data
from hf_lars.integrations.noise_scale import GradientNoiseScaleCallback, GradientNoiseScaleMonitor


def _model(args: argparse.Namespace) -> torch.nn.Module:
    config = data.tiny_llama_config(
        args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=max(1, args.hidden // 32),
        max_position_embeddings=max(64, args.block),
    )
    return data.build_model(config, seed=0)


def _batches(args: argparse.Namespace, n: int) -> torch.Tensor:
    return torch.randint(0, args.vocab, (n, args.micro_batch, args.block), generator=torch.Generator().manual_seed(0))


def _loop_step_times(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """CPU seconds of each loop step, alternating without / with the monitor on the same model and data.

    Alternating step by step (rather than run by run) makes both variants see the same load from other
    processes; CPU time (``time.process_time``, one thread) rather than wall time ignores time spent waiting
    for a core."""
    model = _model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = _batches(args, args.accum)
    monitor = GradientNoiseScaleMonitor(model, args.micro_batch)
    without: list[float] = []
    with_: list[float] = []
    n_with = 0
    for step in range(2 * (args.steps * args.repeats + 2)):
        on = step % 2 == 1
        if on:
            monitor.attach()
        else:
            monitor.detach()
        start = time.process_time()
        for k in range(args.accum):
            (model(input_ids=ids[k], labels=ids[k]).loss / args.accum).backward()
        if on:
            monitor.step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on:
            n_with += 1
            if n_with % 10 == 0:
                monitor.compute()  # a logging step every 10 monitored steps
        elapsed = time.process_time() - start
        if step >= 4:  # warm-up
            (with_ if on else without).append(elapsed)
    monitor.detach()
    return without, with_


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids.reshape(-1, ids.shape[-1])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer_step_times(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """CPU seconds of each Trainer step (from one ``on_step_begin`` to the next: logging included), alternating
    without / with the callback's hooks in one ``Trainer.train()``."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    noise = GradientNoiseScaleCallback()

    class Alternate(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, bool]] = []

        def on_step_begin(self, targs: object, state: object, control: object, **kw: object) -> None:
            on = len(self.marks) % 2 == 1
            assert noise.monitor is not None
            if on:
                noise.monitor.attach()
            else:
                noise.monitor.detach()
            self.marks.append((time.process_time(), on))

    total = 2 * (args.steps * args.repeats + 2)
    ids = _batches(args, args.accum * total)
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench_noise_scale_"), max_steps=total,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.accum, learning_rate=1e-4,
        logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        dataloader_pin_memory=False, log_level="error",
    )
    alternate = Alternate()
    trainer = Trainer(model=_model(args), args=targs, train_dataset=_Blocks(ids), callbacks=[alternate, noise])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    without: list[float] = []
    with_: list[float] = []
    for i, ((t0, on), (t1, _)) in enumerate(zip(alternate.marks, alternate.marks[1:])):
        if i >= 4:  # warm-up
            (with_ if on else without).append(t1 - t0)
    return without, with_


def _report(name: str, without: list[float], with_: list[float], unit: str) -> float:
    base, ours = statistics.median(without), statistics.median(with_)
    ratio = ours / base
    print(
        f"{name}: {base * 1e3:.1f} ms without, {ours * 1e3:.1f} ms with the noise scale ({unit}) "
        f"-> overhead ratio = {ratio:.3f} ({(ratio - 1) * 100:+.1f}%)  [medians of {len(without)} / {len(with_)}]"
    )
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_noise_scale.py", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("loop", "trainer", "both"), default="both")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    n_params = sum(p.numel() for p in _model(args).parameters())
    print(
        f"tiny Llama: {n_params / 1e6:.2f}M parameters, micro-batch {args.micro_batch} x {args.block} tokens, "
        f"accumulation {args.accum}, {args.steps} steps x {args.repeats} repeats, {args.threads} thread(s)"
    )
    if args.mode in ("loop", "both"):
        _report("loop   ", *_loop_step_times(args), "CPU time per step, steps alternated")
    if args.mode in ("trainer", "both"):
        _report("trainer", *_trainer_step_times(args), "CPU time per step, steps alternated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
