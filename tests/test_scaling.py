"""Tests of hf_lars.scaling: laws, fits, sweeps, critical batch, gradient noise scale, scalers."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
import torch

from hf_lars.scaling import (
    RULES,
    AdamBatchSizeScaler,
    BatchSizeScaler,
    ExtrapolationWarning,
    GradientNoiseScale,
    SGDBatchSizeScaler,
    adam_optimal_lr,
    b_noise_from_steps,
    best_lr_from_grid,
    data_parallel_noise_inputs,
    fit_surge,
    grad_noise_trace,
    kaplan_critical_batch,
    scaled_lr,
    sgd_optimal_lr,
    simple_noise_scale,
    true_grad_sq_norm,
)
from hf_lars.scaling._common import _t_quantile, _t_quantile_fallback

EPS_MAX, B_NOISE = 3e-3, 3000.0
BATCHES = 2.0 ** np.arange(5.0, 17.5, 0.5)  # 32 .. 131072: both sides of B_NOISE


def _noisy_surge(seed: int, sigma: float = 0.15, batches: np.ndarray = BATCHES, b_noise: float = B_NOISE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return adam_optimal_lr(batches, EPS_MAX, b_noise) * np.exp(sigma * rng.standard_normal(batches.size))


# ------------------------------------------------------------------------------------------------- laws


def test_adam_law_matches_formula_and_peaks_at_b_noise() -> None:
    b = np.array([16.0, 300.0, 3000.0, 5e4, 1e7])
    direct = EPS_MAX / (0.5 * (np.sqrt(B_NOISE / b) + np.sqrt(b / B_NOISE)))
    np.testing.assert_allclose(adam_optimal_lr(b, EPS_MAX, B_NOISE), direct, rtol=1e-12)
    assert adam_optimal_lr(B_NOISE, EPS_MAX, B_NOISE) == pytest.approx(EPS_MAX, rel=1e-12)
    # symmetric in log B around the peak, and every other batch size is below the peak
    above, below = adam_optimal_lr(B_NOISE * 7, EPS_MAX, B_NOISE), adam_optimal_lr(B_NOISE / 7, EPS_MAX, B_NOISE)
    assert above == pytest.approx(below) and above < EPS_MAX
    dense = np.geomspace(10, 1e6, 2001)
    assert dense[np.argmax(adam_optimal_lr(dense, EPS_MAX, B_NOISE))] == pytest.approx(B_NOISE, rel=0.01)


def test_sgd_law_matches_formula_limits() -> None:
    b = np.array([1.0, 100.0, 3000.0, 1e9])
    np.testing.assert_allclose(sgd_optimal_lr(b, EPS_MAX, B_NOISE), EPS_MAX / (1 + B_NOISE / b), rtol=1e-12)
    assert sgd_optimal_lr(1e12, EPS_MAX, B_NOISE) == pytest.approx(EPS_MAX, rel=1e-8)
    assert sgd_optimal_lr(2.0, EPS_MAX, B_NOISE) / sgd_optimal_lr(1.0, EPS_MAX, B_NOISE) == pytest.approx(2.0, rel=1e-3)


def test_laws_scalar_in_scalar_out_array_in_array_out() -> None:
    assert isinstance(adam_optimal_lr(512, 1e-3, 1024), float)
    assert isinstance(sgd_optimal_lr(512, 1e-3, 1024), float)
    out = adam_optimal_lr(np.array([256, 512]), 1e-3, 1024)
    assert isinstance(out, np.ndarray) and out.shape == (2,)
    assert np.isfinite(adam_optimal_lr(np.array([1e-300, 1e300]), 1.0, 1.0)).all()  # no overflow


@pytest.mark.parametrize("fn", [adam_optimal_lr, sgd_optimal_lr])
@pytest.mark.parametrize(
    ("args", "name"),
    [((-1, 1e-3, 10), "batch_size"), ((8, 0.0, 10), "eps_max"), ((8, 1e-3, float("nan")), "b_noise"),
     (([8, -2], 1e-3, 10), "batch_size"), (("abc", 1e-3, 10), "batch_size")],
)
def test_laws_reject_bad_values_naming_the_argument(fn, args, name) -> None:
    with pytest.raises(ValueError, match=name):
        fn(*args)


# ---------------------------------------------------------------------------------------------- scaled_lr


def test_scaled_lr_simple_rules() -> None:
    assert scaled_lr("linear", 256, 0.1, 1024) == pytest.approx(0.4)
    assert scaled_lr("sqrt", 256, 0.1, 1024) == pytest.approx(0.2)
    assert scaled_lr("none", 256, 0.1, 1024) == pytest.approx(0.1)
    np.testing.assert_allclose(scaled_lr("linear", 256, 0.1, np.array([128, 512])), [0.05, 0.2])
    # the values hf_lars.schedule.scale_lr was tested with before it gave way to scaled_lr
    assert scaled_lr("linear", 256, 0.1, 8192) == pytest.approx(3.2)  # Goyal et al.: 0.1 * 8k/256
    assert scaled_lr("sqrt", 256, 1e-3, 1024) == pytest.approx(2e-3)
    assert scaled_lr("sqrt", 1024, 1e-3, 256) == pytest.approx(5e-4)
    assert scaled_lr("linear", 512, 0.1, 128) == pytest.approx(0.025)
    assert scaled_lr("none", 32, 3e-4, 4096) == pytest.approx(3e-4)
    assert scaled_lr("sqrt", 256, 0.1, 256) == pytest.approx(0.1)
    assert math.isclose(scaled_lr("sqrt", 3, 2.0, 7), 2.0 * math.sqrt(7 / 3))


def test_scaled_lr_laws_are_ratios_of_the_law() -> None:
    for rule, law in (("adam", adam_optimal_lr), ("surge", adam_optimal_lr), ("sgd", sgd_optimal_lr)):
        expected = 3e-4 * law(4096, 1.0, 2e5) / law(512, 1.0, 2e5)
        assert scaled_lr(rule, 512, 3e-4, 4096, b_noise=2e5) == pytest.approx(expected, rel=1e-12)
        assert scaled_lr(rule, 512, 3e-4, 512, b_noise=2e5) == pytest.approx(3e-4, rel=1e-12)
    # far below B_noise the surge law is the sqrt rule and the SGD law the linear rule
    assert scaled_lr("adam", 8, 1e-4, 32, b_noise=1e9) == pytest.approx(scaled_lr("sqrt", 8, 1e-4, 32), rel=1e-6)
    assert scaled_lr("sgd", 8, 1e-4, 32, b_noise=1e9) == pytest.approx(scaled_lr("linear", 8, 1e-4, 32), rel=1e-6)


def test_scaled_lr_errors() -> None:
    with pytest.raises(ValueError, match="valid rules: " + ", ".join(RULES)):
        scaled_lr("cubic", 256, 0.1, 512)
    with pytest.raises(ValueError, match="b_noise is required"):
        scaled_lr("surge", 256, 0.1, 512)
    with pytest.raises(ValueError, match="b_noise is required"):
        scaled_lr("sgd", 256, 0.1, 512)
    with pytest.raises(ValueError, match="ref_lr"):
        scaled_lr("linear", 256, -0.1, 512)
    with pytest.raises(ValueError, match="ref_lr"):
        scaled_lr("linear", 256, 0.0, 512)
    with pytest.raises(ValueError, match="ref_batch must be positive"):
        scaled_lr("linear", 0, 0.1, 512)
    with pytest.raises(ValueError, match="batch must be positive"):
        scaled_lr("linear", 256, 0.1, -8)
    with pytest.raises(ValueError, match="batch must be positive and finite"):
        scaled_lr("linear", 256, 0.1, float("inf"))


# ----------------------------------------------------------------------------------------------- scalers


def test_adam_scaler_peaks_at_b_noise_and_matches_scaled_lr() -> None:
    scaler = AdamBatchSizeScaler(512, 3e-4, 2e5)
    assert scaler.lr(512) == pytest.approx(3e-4)
    assert scaler.lr(4096) == pytest.approx(scaled_lr("adam", 512, 3e-4, 4096, 2e5))
    batches = np.geomspace(512, 1e8, 4001)
    assert batches[np.argmax(scaler.lr(batches))] == pytest.approx(2e5, rel=0.01)
    # symmetric ratios around the peak
    assert scaler.lr(2e5 * 16) == pytest.approx(scaler.lr(2e5 / 16), rel=1e-10)
    assert scaler.ratio(2048) == pytest.approx(scaler.lr(2048) / 3e-4)


def test_sgd_scaler_saturates() -> None:
    scaler = SGDBatchSizeScaler(256, 0.1, 1024)
    assert scaler.lr(2048) / scaler.lr(1024) == pytest.approx((1 + 1024 / 1024) / (1 + 1024 / 2048))
    assert scaler.lr(1e9) == pytest.approx(0.1 * (1 + 1024 / 256), rel=1e-5)  # eps_max
    assert BatchSizeScaler("linear", 256, 0.1).lr(1024) == pytest.approx(0.4)
    assert BatchSizeScaler("sqrt", 256, 0.1)(1024) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="b_noise is required"):
        BatchSizeScaler("sgd", 256, 0.1)


def test_scaler_from_fit_and_extrapolation_warning(caplog) -> None:
    fit = fit_surge(BATCHES[4:-4], _noisy_surge(0)[4:-4], n_bootstrap=0)
    assert fit.identifiable
    scaler = AdamBatchSizeScaler(1024, 1e-3, fit)
    assert scaler.batch_range == fit.batch_range and scaler.b_noise == fit.b_noise
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaler.lr(fit.batch_range[1])  # inside: no warning
    with (
        caplog.at_level(logging.WARNING, logger="hf_lars.scaling"),
        pytest.warns(ExtrapolationWarning, match="outside"),
    ):
        scaler.lr(fit.batch_range[1] * 10)
    assert "extrapolated" in caplog.text
    law = BatchSizeScaler.from_fit(fit)  # no reference: the fitted law itself
    assert law.lr(2000.0) == pytest.approx(fit.predict(2000.0), rel=1e-10)
    with pytest.raises(ValueError, match="'adam' law, not 'sgd'"):
        SGDBatchSizeScaler(1024, 1e-3, fit)


def test_scaler_refuses_unidentifiable_fit() -> None:
    b = np.array([64.0, 128, 256, 512, 1024])
    fit = fit_surge(b, _noisy_surge(1, 0.05, b, b_noise=1e5), n_bootstrap=0)
    with pytest.raises(ValueError, match="not identifiable"):
        AdamBatchSizeScaler(64, 1e-4, fit)


# ------------------------------------------------------------------------------------------------ fitting


@pytest.mark.parametrize("seed", range(5))
def test_fit_surge_recovers_truth_from_noisy_data(seed: int) -> None:
    fit = fit_surge(BATCHES, _noisy_surge(seed), n_bootstrap=200, seed=seed)
    assert fit.identifiable, fit.message
    assert 1 / 1.3 < fit.b_noise / B_NOISE < 1.3
    assert 1 / 1.1 < fit.eps_max / EPS_MAX < 1.1
    assert fit.best_model == "adam"
    for ci, value in ((fit.b_noise_ci, fit.b_noise), (fit.b_noise_ci_bootstrap, fit.b_noise),
                      (fit.b_noise_profile_ci, fit.b_noise), (fit.eps_max_ci, fit.eps_max),
                      (fit.eps_max_ci_bootstrap, fit.eps_max)):
        assert ci is not None and ci[0] < value < ci[1]
    assert fit.residual_sd == pytest.approx(0.15, rel=0.35)


def test_fit_surge_intervals_cover_truth_most_seeds() -> None:
    covered = 0
    for seed in range(5, 15):
        fit = fit_surge(BATCHES, _noisy_surge(seed), n_bootstrap=0)
        covered += fit.b_noise_ci[0] < B_NOISE < fit.b_noise_ci[1] and fit.eps_max_ci[0] < EPS_MAX < fit.eps_max_ci[1]
    assert covered >= 8


def test_fit_exact_data_and_residuals() -> None:
    lrs = adam_optimal_lr(BATCHES, EPS_MAX, B_NOISE)
    fit = fit_surge(BATCHES, lrs, n_bootstrap=0)
    assert fit.b_noise == pytest.approx(B_NOISE, rel=1e-6) and fit.eps_max == pytest.approx(EPS_MAX, rel=1e-6)
    noisy = _noisy_surge(3)
    fit = fit_surge(BATCHES, noisy, n_bootstrap=0)
    np.testing.assert_allclose(fit.residuals, np.log(noisy) - np.log(fit.predict(BATCHES)), atol=1e-12)
    assert abs(fit.residuals.sum()) < 1e-9  # ln eps_max is profiled out: residuals sum to zero


def test_fit_sgd_rule_recovers_mccandlish() -> None:
    rng = np.random.default_rng(7)
    lrs = sgd_optimal_lr(BATCHES, EPS_MAX, B_NOISE) * np.exp(0.1 * rng.standard_normal(BATCHES.size))
    fit = fit_surge(BATCHES, lrs, rule="sgd", n_bootstrap=100, bootstrap="pairs")
    assert fit.rule == "sgd" and fit.identifiable
    assert 1 / 1.3 < fit.b_noise / B_NOISE < 1.3 and 1 / 1.1 < fit.eps_max / EPS_MAX < 1.1
    assert fit.best_model == "sgd"
    assert fit.b_noise_ci_bootstrap[0] < fit.b_noise < fit.b_noise_ci_bootstrap[1]


def test_fit_not_identifiable_when_all_batches_below_peak() -> None:
    b = np.array([64.0, 128, 256, 512, 1024])
    fit = fit_surge(b, _noisy_surge(1, 0.05, b, b_noise=1e5))
    assert not fit.identifiable
    assert "not identifiable" in fit.message and "above the largest batch size" in fit.message
    assert fit.b_noise_ci is None and fit.b_noise_ci_bootstrap is None and fit.eps_max_ci is None
    assert math.isinf(fit.b_noise_profile_ci[1])
    assert "Identifiability: B_noise is not identifiable" in fit.summary()


def test_fit_not_identifiable_when_all_batches_past_peak() -> None:
    b = np.array([1024.0, 2048, 4096, 8192, 16384])
    fit = fit_surge(b, _noisy_surge(2, 0.05, b, b_noise=16.0))
    assert not fit.identifiable and "below the smallest batch size" in fit.message
    assert fit.b_noise_profile_ci[0] == 0.0 and fit.b_noise_ci is None


def test_fit_not_identifiable_when_monotone() -> None:
    b = np.array([256.0, 512, 1024, 2048])  # exact surge data peaking at the largest batch
    fit = fit_surge(b, adam_optimal_lr(b, EPS_MAX, 2048.0), n_bootstrap=0)
    assert not fit.identifiable and "monotonically" in fit.message


def test_fit_messages_for_misfit_and_too_few_points() -> None:
    b = np.array([64.0, 256, 1024, 4096, 16384])
    flat = fit_surge(b, np.full(5, 1e-3), n_bootstrap=0)  # saturated, like SGD: the surge law is the wrong shape
    assert flat.best_model == "sgd" and "By AIC the data prefer the 'sgd' model" in flat.message
    few = fit_surge(b[:3], adam_optimal_lr(b[:3], 1e-3, 256) * np.exp([0.1, -0.1, 0.05]), n_bootstrap=0)
    assert not few.identifiable and few.b_noise_profile_ci == (0.0, math.inf)
    assert "too few points or too much noise" in few.message


def test_fit_aic_prefers_the_true_simple_rule() -> None:
    # the laws nest the rules (B_noise -> infinity), so AIC picks the true rule most of the time, not always
    picks: dict[str, list[str]] = {"linear": [], "sqrt": []}
    for seed in range(10):
        noise = np.exp(0.05 * np.random.default_rng(seed).standard_normal(BATCHES.size))
        picks["linear"].append(fit_surge(BATCHES, 1e-7 * BATCHES * noise, n_bootstrap=0).best_model)
        picks["sqrt"].append(fit_surge(BATCHES, 1e-5 * np.sqrt(BATCHES) * noise, n_bootstrap=0).best_model)
    assert picks["linear"].count("linear") >= 7 and picks["sqrt"].count("sqrt") >= 7, picks
    fit = fit_surge(BATCHES, 1e-5 * np.sqrt(BATCHES) * noise, n_bootstrap=0)
    y = np.log(1e-5 * np.sqrt(BATCHES) * noise) - 0.5 * np.log(BATCHES)
    n = BATCHES.size
    assert fit.aic["sqrt"] == pytest.approx(n * math.log(((y - y.mean()) ** 2).sum() / n) + 4)
    assert set(fit.aic) == {"adam", "sgd", "linear", "sqrt"}


def test_fit_bootstrap_is_seeded() -> None:
    lrs = _noisy_surge(4)
    a = fit_surge(BATCHES, lrs, n_bootstrap=150, seed=1)
    b = fit_surge(BATCHES, lrs, n_bootstrap=150, seed=1)
    c = fit_surge(BATCHES, lrs, n_bootstrap=150, seed=2)
    assert a.b_noise_ci_bootstrap == b.b_noise_ci_bootstrap
    assert a.b_noise_ci_bootstrap != c.b_noise_ci_bootstrap
    assert a.n_bootstrap == 150 and a.bootstrap_log_params.shape == (150, 2)


@pytest.mark.parametrize(
    ("batches", "lrs", "kwargs", "match"),
    [
        ([256, 256, 512, 512], [1e-3] * 4, {}, "at least 3 distinct batch sizes, got 2"),
        ([256, 512, 1024], [1e-3, 1e-3], {}, "same length"),
        ([256, 512, 1024], [1e-3, -1e-3, 1e-3], {}, "best_lrs must be positive"),
        ([256, 0, 1024], [1e-3] * 3, {}, "batch_sizes must be positive"),
        ([256, 512, 1024], [1e-3] * 3, {"rule": "linear"}, "'adam'"),
        ([256, 512, 1024], [1e-3] * 3, {"bootstrap": "jackknife"}, "bootstrap must be one of"),
        ([256, 512, 1024], [1e-3] * 3, {"confidence": 1.5}, "confidence"),
    ],
)
def test_fit_surge_errors(batches, lrs, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        fit_surge(batches, lrs, **kwargs)


def test_t_quantile_fallback_matches_scipy() -> None:
    for dof in (1, 2):
        assert _t_quantile_fallback(0.975, dof) == pytest.approx(_t_quantile(0.975, dof), rel=1e-9)
    for dof in (3, 5, 10, 30):
        assert _t_quantile_fallback(0.975, dof) == pytest.approx(_t_quantile(0.975, dof), rel=2e-3)


# -------------------------------------------------------------------------------------------------- grid


def _sweep(batch: float, best: float, lrs: np.ndarray, curvature: float = 0.3) -> list[tuple[float, float, float]]:
    return [(batch, lr, 2.0 + curvature * (math.log(lr) - math.log(best)) ** 2) for lr in lrs]


def test_grid_vertex_recovers_best_lr_between_grid_points() -> None:
    lrs = 2.0 ** np.arange(-14, -4)
    rows = _sweep(256, 3.3e-4, lrs) + _sweep(1024, 1.1e-3, lrs)
    out = best_lr_from_grid(rows)
    assert [r.batch_size for r in out] == [256, 1024]
    for r, best in zip(out, (3.3e-4, 1.1e-3)):
        assert r.method == "vertex" and not r.on_edge and r.n_points == len(lrs)
        assert r.best_lr == pytest.approx(best, rel=1e-9)
        assert r.best_loss == pytest.approx(2.0, abs=1e-9)
        assert r.grid_lr == lrs[np.argmin(np.abs(np.log(lrs / best)))]


def test_grid_argmin_when_not_quadratic_and_more_points() -> None:
    lrs = 2.0 ** np.arange(-10, 0)
    rows = [(64, lr, abs(math.log2(lr) + 5.25)) for lr in lrs]  # V shape, minimum at 2^-5.25
    (r,) = best_lr_from_grid(rows, window=2)
    assert r.grid_lr == 2.0**-5 and r.method == "vertex"
    assert 2.0**-6 < r.best_lr < 2.0**-4
    flat = [(64, lr, 1.0) for lr in lrs[:3]] + [(64, lrs[3], 1.5)]
    (f,) = best_lr_from_grid(flat)
    assert f.method == "argmin" and f.best_lr == lrs[0] and f.on_edge


def test_grid_edge_flag(caplog) -> None:
    lrs = 2.0 ** np.arange(-14, -8)
    with caplog.at_level(logging.WARNING, logger="hf_lars.scaling"):
        high, low = best_lr_from_grid(_sweep(128, 1e-1, lrs) + _sweep(4096, 1e-7, lrs))
    assert high.on_edge and high.best_lr == lrs[-1] and high.method == "argmin"
    assert low.on_edge and low.best_lr == lrs[0]
    assert "highest LR tried" in caplog.text and "lowest LR tried" in caplog.text


def test_grid_non_finite_losses_are_bad_not_minima(caplog) -> None:
    lrs = 2.0 ** np.arange(-12, -6)
    rows = _sweep(512, 2.0**-9.4, lrs)
    rows[-1] = (512, lrs[-1], float("nan"))  # the largest LR diverged
    rows[0] = (512, lrs[0], float("-inf"))  # a broken log: must not win either
    (r,) = best_lr_from_grid(rows)
    assert not r.on_edge and r.n_diverged == 2 and r.n_points == len(lrs) - 2
    assert r.best_lr == pytest.approx(2.0**-9.4, rel=1e-9)
    # a best point whose only right neighbour diverged: no parabola, the grid argmin
    rows2 = _sweep(1024, 2.0**-7.2, lrs)
    rows2[-1] = (1024, lrs[-1], math.inf)
    (r2,) = best_lr_from_grid(rows2)
    assert r2.method == "argmin" and r2.best_lr == lrs[-2] and not r2.on_edge
    with caplog.at_level(logging.WARNING, logger="hf_lars.scaling"):
        out = best_lr_from_grid(_sweep(64, 1e-3, lrs) + [(32, lr, float("nan")) for lr in lrs])
    assert [g.batch_size for g in out] == [64] and "every run diverged" in caplog.text


def test_grid_repeats_are_averaged_and_any_divergence_poisons() -> None:
    rows = [(8, 0.1, 1.0), (8, 0.1, 3.0), (8, 0.2, 1.5), (8, 0.4, 2.5), (8, 0.4, float("nan")), (8, 0.05, 4.0)]
    (r,) = best_lr_from_grid(rows)
    # 0.1 averages to 2.0 (its best replicate, 1.0, would have won); 0.4 is poisoned by its diverged repeat,
    # so 0.2 has no finite right neighbour (argmin) yet is not on the edge
    assert r.grid_lr == 0.2 and r.n_diverged == 1 and r.n_points == 3
    assert r.method == "argmin" and not r.on_edge and r.best_loss == 1.5
    as_dicts = [{"batch_size": b, "lr": lr, "loss": loss} for b, lr, loss in rows]
    assert best_lr_from_grid(as_dicts)[0].best_lr == r.best_lr
    with pytest.raises(ValueError, match="lr must be positive"):
        best_lr_from_grid([(8, -0.1, 1.0)])
    with pytest.raises(ValueError, match="batch_size, lr, loss"):
        best_lr_from_grid([(8, 0.1)])


# ------------------------------------------------------------------------------------------ critical batch


def test_b_noise_from_steps_recovers_smin_emin() -> None:
    s_min, b_noise = 2000.0, 512.0
    batches = np.array([32.0, 128, 512, 2048, 8192])
    steps = s_min * (1 + b_noise / batches)
    examples = batches * steps
    fit = b_noise_from_steps(steps, examples)
    assert fit.s_min == pytest.approx(s_min, rel=1e-9)
    assert fit.e_min == pytest.approx(s_min * b_noise, rel=1e-9)
    assert fit.b_crit == pytest.approx(b_noise, rel=1e-9)
    np.testing.assert_allclose(fit.batch_sizes, batches)
    # (S/Smin - 1)(E/Emin - 1) = 1 on every point
    np.testing.assert_allclose((steps / fit.s_min - 1) * (examples / fit.e_min - 1), 1.0, rtol=1e-7)
    noisy = b_noise_from_steps(steps * np.exp(0.03 * np.random.default_rng(0).standard_normal(5)), examples)
    assert noisy.b_crit == pytest.approx(b_noise, rel=0.3)


def test_b_noise_from_steps_errors() -> None:
    with pytest.raises(ValueError, match="do not follow"):
        b_noise_from_steps([100, 200, 400], [1000, 2000, 4000])  # more steps with more examples
    with pytest.raises(ValueError, match="at least 2"):
        b_noise_from_steps([100, 200], [1000, 1000])
    with pytest.raises(ValueError, match="steps must be positive"):
        b_noise_from_steps([0, 200], [1000, 2000])


def test_kaplan_critical_batch() -> None:
    assert kaplan_critical_batch(1.0) == pytest.approx(2e8)
    assert kaplan_critical_batch(3.0) == pytest.approx(2e8 / 3.0 ** (1 / 0.21))
    out = kaplan_critical_batch(np.array([2.0, 4.0]))
    assert out[0] / out[1] == pytest.approx(2 ** (1 / 0.21)) and out[0] > out[1]
    with pytest.raises(ValueError, match="loss"):
        kaplan_critical_batch(-1.0)


# ---------------------------------------------------------------------------------------------- noise scale


def _gaussian_model(dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(dim) * 0.3
    sigma_diag = rng.uniform(0.5, 2.0, dim)  # per-example noise variances: tr(Sigma) = sum
    return g, sigma_diag


def _batch_norms(g, sigma_diag, rng, small: int, big: int, trials: int) -> tuple[np.ndarray, np.ndarray]:
    """|G_b|^2 and |G_B|^2 of per-example gradients g_i = G + N(0, Sigma); the small batch is part of the big."""
    per_example = g + rng.standard_normal((trials, big, g.size)) * np.sqrt(sigma_diag)
    small_sq = (per_example[:, :small].mean(axis=1) ** 2).sum(axis=1)
    big_sq = (per_example.mean(axis=1) ** 2).sum(axis=1)
    return small_sq, big_sq


def test_noise_estimators_are_unbiased_in_gaussian_model() -> None:
    g, sigma_diag = _gaussian_model()
    small, big, trials = 4, 32, 3000
    small_sq, big_sq = _batch_norms(g, sigma_diag, np.random.default_rng(1), small, big, trials)
    g2_true, tr_true = float(g @ g), float(sigma_diag.sum())
    # the model itself: E|G_b|^2 = |G|^2 + tr(Sigma)/b
    assert small_sq.mean() == pytest.approx(g2_true + tr_true / small, rel=0.03)
    g2 = true_grad_sq_norm(small_sq, small, big_sq, big)
    tr = grad_noise_trace(small_sq, small, big_sq, big)
    assert abs(g2.mean() - g2_true) < 4 * g2.std() / math.sqrt(trials)
    assert abs(tr.mean() - tr_true) < 4 * tr.std() / math.sqrt(trials)
    assert isinstance(simple_noise_scale(5.0, 4, 2.0, 32), float)
    assert math.isnan(simple_noise_scale(5.0, 4, 0.1, 32))  # |G|^2 estimate negative


def test_gradient_noise_scale_ema_recovers_b_simple() -> None:
    g, sigma_diag = _gaussian_model(seed=2)
    small_sq, big_sq = _batch_norms(g, sigma_diag, np.random.default_rng(3), 4, 32, 3000)
    est = GradientNoiseScale(beta=0.998)
    assert est.b_simple is None and est.grad_sq_norm is None
    for i, (s, b) in enumerate(zip(small_sq, big_sq)):
        if i % 2:  # 0-d tensors are accepted too
            est.update(torch.tensor(s), 4, torch.tensor(b), 32)
        else:
            est.update(float(s), 4, float(b), 32)
    truth = sigma_diag.sum() / (g @ g)
    assert est.steps == 3000
    assert est.b_simple == pytest.approx(truth, rel=0.15)
    assert est.trace_cov == pytest.approx(sigma_diag.sum(), rel=0.15)
    state = est.state_dict()
    clone = GradientNoiseScale()
    clone.load_state_dict(state)
    assert clone.b_simple == est.b_simple and clone.beta == 0.998


def test_gradient_noise_scale_bias_correction_and_undefined() -> None:
    est = GradientNoiseScale(beta=0.9)
    est.update(5.0, 4, 2.0, 32)
    assert est.grad_sq_norm == pytest.approx(true_grad_sq_norm(5.0, 4, 2.0, 32))  # bias-corrected: no 0.1 factor
    assert est.trace_cov == pytest.approx(grad_noise_trace(5.0, 4, 2.0, 32))
    assert est.b_simple == pytest.approx(grad_noise_trace(5.0, 4, 2.0, 32) / true_grad_sq_norm(5.0, 4, 2.0, 32))
    noisy = GradientNoiseScale()
    noisy.update(5.0, 4, 0.1, 32)  # |G|^2 estimate < 0: not defined yet
    assert noisy.b_simple is None
    with pytest.raises(ValueError, match="beta"):
        GradientNoiseScale(beta=1.0)
    with pytest.raises(ValueError, match="small_batch must be smaller"):
        est.update(5.0, 32, 2.0, 32)
    with pytest.raises(ValueError, match="big_sq_norm"):
        est.update(5.0, 4, -2.0, 32)


def test_data_parallel_noise_scale_matches_analytic_model() -> None:
    g, sigma_diag = _gaussian_model(seed=4)
    rng = np.random.default_rng(5)
    world, per_rank, trials = 4, 4, 1500
    per_example = g + rng.standard_normal((trials, world, per_rank, g.size)) * np.sqrt(sigma_diag)
    local = per_example.mean(axis=2)  # each rank's gradient before the all-reduce
    mean_local_sq = (local**2).sum(axis=2).mean(axis=1)
    global_sq = (local.mean(axis=1) ** 2).sum(axis=1)  # the all-reduced (averaged) gradient
    inputs = data_parallel_noise_inputs(mean_local_sq[0], global_sq[0], per_rank, world)
    assert inputs.small_batch == per_rank and inputs.big_batch == per_rank * world
    tr = grad_noise_trace(mean_local_sq, per_rank, global_sq, per_rank * world)
    assert abs(tr.mean() - sigma_diag.sum()) < 4 * tr.std() / math.sqrt(trials)
    est = GradientNoiseScale(beta=0.995)
    for a, b in zip(mean_local_sq, global_sq):
        est.update_data_parallel(a, b, per_rank, world)
    assert est.b_simple == pytest.approx(sigma_diag.sum() / (g @ g), rel=0.2)
    with pytest.raises(ValueError, match="world_size"):
        data_parallel_noise_inputs(1.0, 0.5, 8, 1)
