"""The step benchmark (benchmarks/bench_step.py, `hf-lars bench`) at a tiny size: every row is there, ratios are
positive and state sizes are right.  No timing assertion: timings on a shared CPU say nothing here."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from hf_lars.commands.bench import bench_script

_spec = importlib.util.spec_from_file_location("bench_step", bench_script())  # benchmarks/ is not a package
bench_step = importlib.util.module_from_spec(_spec)
sys.modules["bench_step"] = bench_step
_spec.loader.exec_module(bench_step)
TARGETS = bench_step.TARGETS
Contender = bench_step.Contender
builtin_contenders = bench_step.builtin_contenders
gpt2_like_shape = bench_step.gpt2_like_shape
run_benchmark = bench_step.run_benchmark
select_contenders = bench_step.select_contenders

TINY = dict(params_millions=0.05, steps=2, warmup=1, progress=False)


def test_shape_lands_near_25m() -> None:
    shape = gpt2_like_shape(25)
    assert (shape.d_model, shape.n_layer, shape.vocab, shape.n_positions) == (512, 6, 8192, 1024)
    assert abs(shape.num_params - 25e6) < 2e6
    assert len(shape.shapes()) == shape.num_tensors == 2 + 12 * 6 + 2
    assert sum(len(s) == 1 for _, s in shape.shapes()) == 8 * 6 + 2
    with pytest.raises(ValueError, match="params_millions"):
        gpt2_like_shape(0)


@pytest.fixture(scope="module")
def report():
    # Our fused rows compile two 76-tensor passes per optimizer (~100 s on 2 busy cores); their results are
    # covered by tests/test_optim_fused.py, so the tiny benchmark times the other rows.
    ours = {"LARS", "AdamLARS", "RangerLARS"}
    contenders = [c for c in builtin_contenders() if not (c.fused and c.name in ours)]
    return run_benchmark(**TINY, contenders=contenders)


def test_table_has_every_row_and_positive_ratios(report) -> None:
    labels = {(m.contender.name, m.contender.impl) for m in report.measurements}
    expected = {(n, fe) for n in ("SGD", "AdamW", "LARS", "AdamLARS", "RangerLARS") for fe in ("per-tensor", "foreach")}
    expected |= {(n, "fused") for n in ("SGD", "AdamW")}  # torch 2.13's fused CPU kernels
    assert labels >= expected
    for m in report.measurements:
        assert m.error is None, m.error
        assert len(m.times) == TINY["steps"]
        assert m.median_ms > 0
        assert report.ratio(m) > 0 and math.isfinite(report.ratio(m))
    text = report.render()
    md = report.render(markdown=True)
    for name in ("SGD", "AdamW", "LARS", "AdamLARS", "RangerLARS"):
        assert name in text
        assert sum(line.startswith(f"| {name} |") for line in md.splitlines()) >= 2  # main table + foreach table
    assert set(report.verdicts()) == set(TARGETS)
    assert "foreach=True vs foreach=False" in text
    assert report.machine["torch"] == torch.__version__


def test_state_bytes_per_param_byte(report) -> None:
    ratios = {m.contender.name: m.state_ratio for m in report.measurements}
    # 0-d step counters add a few bytes per tensor on top of the buffers
    assert ratios["SGD"] == pytest.approx(1.0, abs=1e-2)
    assert ratios["LARS"] == pytest.approx(1.0, abs=1e-2)
    assert ratios["AdamW"] == pytest.approx(2.0, abs=1e-2)
    assert ratios["AdamLARS"] == pytest.approx(2.0, abs=1e-2)
    assert ratios["RangerLARS"] == pytest.approx(3.0, abs=1e-2)


def test_grad_writers_get_private_grads_and_failures_are_reported() -> None:
    class GradScribbler(torch.optim.SGD):  # a peer that writes into p.grad, as some do
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad.mul_(2)
            return super().step(closure)

    def broken(_params):
        raise RuntimeError("no such optimizer")

    contenders = [c for c in builtin_contenders((False,)) if c.name in ("SGD", "LARS")]
    scribbler = Contender("scribbler", "peer", "lars", False, lambda ps: GradScribbler([p for _, p in ps], lr=1e-3))
    contenders.append(scribbler)
    contenders.append(Contender("broken", "peer", "lars", False, broken))
    report = run_benchmark(contenders=contenders, **TINY)
    by_name = {m.contender.name: m for m in report.measurements}
    assert by_name["scribbler"].private_grads and not by_name["LARS"].private_grads
    assert by_name["LARS"].error is None
    assert "no such optimizer" in by_name["broken"].error
    assert "error" in report.render()


def test_select_contenders_keeps_baselines_and_peers() -> None:
    peer = Contender("peer Lamb", "peer", "lamb", False, lambda ps: torch.optim.AdamW([p for _, p in ps]))
    chosen = select_contenders(builtin_contenders() + [peer], ["lamb"])  # a registry alias of AdamLARS
    assert {c.name for c in chosen} == {"AdamLARS", "AdamW", "peer Lamb"}
    with pytest.raises(ValueError, match="Unknown optimizer"):
        select_contenders(builtin_contenders(), ["sgdx"])


def test_bench_command_writes_markdown(tmp_path, capsys) -> None:
    """`hf-lars bench ARGS` runs benchmarks/bench_step.py from the checkout with ARGS."""
    from hf_lars import cli

    out = tmp_path / "bench.md"
    argv = ["bench", "--params-millions", "0.05", "--steps", "2", "--warmup", "1", "--no-peers", "--no-progress",
            "--optimizers", "LARS", "--markdown", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "LARS" in printed and "AdamW" not in printed
    md = out.read_text()
    assert "| LARS |" in md and "| SGD |" in md


def test_bench_command_without_a_checkout_says_what_to_do(monkeypatch, tmp_path, capsys) -> None:
    from hf_lars import cli
    from hf_lars.commands import bench

    monkeypatch.setattr(bench, "bench_script", lambda: tmp_path / "benchmarks" / "bench_step.py")
    assert cli.main(["bench", "--no-peers"]) == 2
    assert "clone hf_lars" in capsys.readouterr().err
