"""Trust-ratio logging of stacked MoE experts: one row per expert, and the spread among experts summarised."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_lars import AdamLARS
from hf_lars.integrations.trust_ratios import TrustRatioLogger, expert_spread, split_expert_name, summarize_trust_ratios
from hf_lars.plotting import expert_blocks, load_trust_ratios, plot_trust_ratios


def _stepped_optimizer() -> AdamLARS:
    torch.manual_seed(0)
    w = torch.randn(4, 3, 5)
    w[2] *= 100.0  # one expert's weights 100x the others'
    experts = nn.Parameter(w)
    router = nn.Parameter(torch.randn(4, 5))
    opt = AdamLARS([{"params": [("experts.w", experts)], "stacked_dim": 0}, {"params": [("router.weight", router)]}])
    experts.grad, router.grad = torch.randn_like(experts), torch.randn_like(router)
    opt.step()
    return opt


def test_logger_writes_one_row_per_expert_and_the_spread(tmp_path: Path) -> None:
    opt = _stepped_optimizer()
    stats = TrustRatioLogger(output_dir=tmp_path).log(opt, step=1)
    row = json.loads((tmp_path / "trust_ratios.jsonl").read_text())
    assert sorted(row["trust_ratios"]) == ["experts.w[0]", "experts.w[1]", "experts.w[2]", "experts.w[3]", "router.weight"]
    experts = [row["trust_ratios"][f"experts.w[{e}]"] for e in range(4)]
    assert stats["trust_ratio_expert_spread"] == pytest.approx(max(experts) / min(experts))
    assert stats["trust_ratio_expert_spread"] > 10  # the 100x expert's ratio stands out


def test_spread_is_absent_without_experts_and_nan_when_unknown() -> None:
    assert "trust_ratio_expert_spread" not in summarize_trust_ratios({"a": 1.0, "b": 2.0})
    assert expert_spread({"w[0]": 1.0, "w[1]": 4.0, "v[0]": 1.0, "v[1]": 2.0}) == 4.0
    assert math.isnan(expert_spread({"w[0]": 1.0, "w[1]": math.nan}))
    assert split_expert_name("a.b[12]") == ("a.b", 12) and split_expert_name("a.b") == ("a.b", None)


def test_heatmap_rows_keep_experts_together(tmp_path: Path) -> None:
    path = tmp_path / "trust_ratios.jsonl"
    # Merged from two ranks (ZeRO): expert 2 first appears after another layer.
    rows = [
        {"step": 1, "trust_ratios": {"up[0]": 1.0, "up[1]": 2.0, "head.weight": 0.5, "up[2]": 3.0}},
        {"step": 2, "trust_ratios": {"up[2]": 3.5, "up[0]": 1.1, "up[1]": 2.1, "head.weight": 0.6}},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    history = load_trust_ratios(path)
    assert history.layers == ["up[0]", "up[1]", "up[2]", "head.weight"]
    assert expert_blocks(history.layers) == [(0, 3)]
    assert history.values[2].tolist() == [3.0, 3.5]
    out = plot_trust_ratios(path)
    assert out.is_file() and out.stat().st_size > 0
