"""Update rules (how): reuse, Taylor (TaylorSeer) and BDF2/Heun (FoCa) forecasts; calibration fits."""

import logging

import numpy as np
import pytest
import torch

from caching import (CacheConfig, FoCaUpdate, IntervalTrigger, ResidualScope, TaylorUpdate, apply_cache,
                     calibrate_magcache, calibrate_teacache, fit_teacache_polynomial, get_preset, remove_cache)
from caching.testing import ToyTransformer, drive
from caching.updates import FoCaForecaster, ReuseForecaster, TaylorForecaster


def toy_model(kind="shift", num_blocks=1):
    torch.manual_seed(0)
    return ToyTransformer(dim=4, num_blocks=num_blocks, kind=kind).eval()


def run_shift(update, tembs, sigmas=None, interval=3):
    """Outputs of a 1-block shift toy (residual = temb * direction) with and without the cache."""
    model = toy_model()
    inputs = [dict(hidden_states=torch.zeros(1, 3, 4), temb=torch.tensor([float(t)])) for t in tembs]
    truth = drive(model, inputs, sigmas=sigmas)
    apply_cache(model, CacheConfig(IntervalTrigger(interval), ResidualScope(), update=update))
    cached = drive(model, inputs, sigmas=sigmas)
    remove_cache(model)
    return truth, cached


def max_error(truth, cached, steps):
    return max((truth[s] - cached[s]).abs().max().item() for s in steps)


def test_taylor_forecast_is_exact_on_a_linear_in_step_toy():
    tembs = [2.0 + 3.0 * i for i in range(9)]            # computed at 0, 3, 6
    for order in (1, 2):
        truth, cached = run_shift(TaylorUpdate(order=order), tembs)
        assert max_error(truth, cached, [4, 5, 7, 8]) < 1e-5
        assert max_error(truth, cached, [1]) == pytest.approx(3.0, rel=1e-5)  # one point: plain reuse
    truth, cached = run_shift(TaylorUpdate(order=0), tembs)
    assert max_error(truth, cached, [4]) == pytest.approx(3.0, rel=1e-5)


def test_reuse_returns_the_last_computed_residual():
    truth, cached = run_shift(get_preset("fora").update, [2.0 + 3.0 * i for i in range(6)])
    assert torch.equal(cached[4], truth[3])


def test_taylor_on_sigma_axis_is_exact_for_features_linear_in_sigma():
    sigmas = [1.0, 0.9, 0.75, 0.6, 0.4, 0.3, 0.15, 0.1, 0.05]  # uneven spacing
    tembs = [5.0 * s for s in sigmas]
    truth, cached = run_shift(TaylorUpdate(order=1, axis="sigma"), tembs, sigmas=sigmas)
    assert max_error(truth, cached, [4, 5, 7, 8]) < 1e-5
    truth, cached = run_shift(TaylorUpdate(order=1, axis="step"), tembs, sigmas=sigmas)
    assert max_error(truth, cached, [4, 5, 7, 8]) > 1e-2


def test_foca_is_exact_on_quadratics_where_taylor_lags():
    tembs = [float(i * i) for i in range(9)]              # computed at 0, 3, 6
    truth, foca = run_shift(FoCaUpdate(calibration=1.0), tembs)
    assert max_error(truth, foca, [7, 8]) < 1e-4
    truth, taylor = run_shift(TaylorUpdate(order=2), tembs)
    # TaylorSeer's backward differences: 36 + 9 k + k^2 instead of (6 + k)^2
    direction = torch.linspace(-1.0, 1.0, 4)
    assert torch.allclose(taylor[7], (36 + 9 + 1) * direction.expand(1, 3, 4), atol=1e-4)


def test_forecasters_on_uneven_coordinates():
    coords = [0.0, 0.5, 2.0]
    quadratic = [torch.tensor([1.0 + 2.0 * x + 3.0 * x * x]) for x in coords]
    foca, taylor, reuse = FoCaForecaster(1.0), TaylorForecaster(1), ReuseForecaster()
    for x, value in zip(coords, quadratic):
        for forecaster in (foca, taylor, reuse):
            forecaster.record(x, (value, None))
    assert foca.predict(3.0)[0].item() == pytest.approx(1 + 6 + 27, rel=1e-6)
    assert foca.predict(3.0)[1] is None
    slope = (quadratic[2] - quadratic[1]).item() / 1.5
    assert taylor.predict(3.0)[0].item() == pytest.approx(quadratic[2].item() + slope, rel=1e-6)
    assert reuse.predict(3.0)[0] is quadratic[2]
    damped = FoCaForecaster(0.0)
    for x, value in zip(coords, quadratic):
        damped.record(x, (value,))
    slope_bdf2 = 2.0 + 6.0 * 2.0                            # exact slope of the quadratic at x = 2
    assert damped.predict(3.0)[0].item() == pytest.approx(quadratic[2].item() + slope_bdf2, rel=1e-6)


def test_forecaster_restarts_when_shapes_change():
    taylor = TaylorForecaster(2)
    taylor.record(0.0, (torch.ones(2),))
    taylor.record(1.0, (torch.ones(3) * 2,))
    assert torch.equal(taylor.predict(5.0)[0], torch.ones(3) * 2)


def test_fit_recovers_known_polynomial():
    x = np.linspace(0.01, 0.5, 30)
    y = 4.0 * x ** 3 - 2.0 * x ** 2 + 0.5 * x + 0.01
    assert np.allclose(fit_teacache_polynomial(x, y, degree=3), (4.0, -2.0, 0.5, 0.01), atol=1e-8)
    assert len(fit_teacache_polynomial(x[:3], y[:3], degree=4)) == 3   # degree lowered to 2
    with pytest.raises(ValueError, match="pairs"):
        fit_teacache_polynomial([0.1], [0.2])


def test_calibrate_teacache_fits_the_models_relation():
    # one block squares its input; inputs a_t * 1 give input change x and output change (1 + x)^2 - 1
    model = toy_model(kind="square")
    levels = [1.0 + 0.1 * i + 0.03 * i * i for i in range(10)]
    inputs = [dict(hidden_states=torch.full((1, 3, 4), a), temb=torch.tensor([0.0])) for a in levels]
    calibration = calibrate_teacache(model, lambda: (drive(model, inputs), drive(model, inputs[:6])), degree=2)
    assert len(calibration.input_changes) == 9 + 5
    assert np.allclose(calibration.coefficients, (1.0, 2.0, 0.0), atol=1e-3)
    assert not hasattr(model, "_diffusers_hook")


def test_teacache_calibrates_itself_on_the_first_generation():
    model = toy_model(kind="square")
    levels = [1.0 + 0.1 * i + 0.03 * i * i for i in range(10)]
    calibration_run = [dict(hidden_states=torch.full((1, 3, 4), a), temb=torch.tensor([0.0])) for a in levels]
    inputs = [dict(hidden_states=torch.full((1, 3, 4), 1.1 ** i), temb=torch.tensor([0.0])) for i in range(8)]
    handle = apply_cache(model, get_preset("teacache", threshold=0.5, degree=2, cooldown=0.0))
    drive(model, calibration_run)
    assert handle.stats.last_run().steps_computed() == list(range(10))
    drive(model, inputs)                                  # per step: (1.1^2 - 1) = 0.21
    assert np.allclose(handle.config.trigger.coefficients, (1.0, 2.0, 0.0), atol=1e-3)
    assert handle.stats.last_run().steps_computed() == [0, 3, 6]
    remove_cache(model)


def test_calibrate_magcache_records_magnitude_ratios():
    model = toy_model(kind="double")                      # residual = input, so ratios = a_t / a_{t-1}
    inputs = [dict(hidden_states=torch.full((1, 3, 4), 1.1 ** i), temb=torch.tensor([0.0])) for i in range(6)]
    calibration = calibrate_magcache(model, lambda: drive(model, inputs))
    assert np.allclose(calibration.ratios, (1.0,) + (1.1,) * 5, atol=1e-5)


def test_auto_calibration_waits_for_enough_data():
    model = toy_model(kind="double")
    one_step = [dict(hidden_states=torch.full((1, 3, 4), 1.0), temb=torch.tensor([0.0]))]
    handle = apply_cache(model, get_preset("magcache"))
    drive(model, one_step)                               # nothing to compare yet
    drive(model, one_step * 4)                            # still calibrating, then enough
    assert handle.config.trigger.ratios is None
    drive(model, one_step * 4)
    remove_cache(model)
    assert handle.config.trigger.ratios == pytest.approx((1.0, 1.0, 1.0, 1.0))


def test_teacache_auto_calibration_keeps_recording_after_a_too_short_run(caplog):
    model = toy_model(kind="square")
    levels = [1.0 + 0.1 * i + 0.03 * i * i for i in range(6)]
    inputs = [dict(hidden_states=torch.full((1, 3, 4), a), temb=torch.tensor([0.0])) for a in levels]
    handle = apply_cache(model, get_preset("teacache", degree=2))
    drive(model, inputs[:2])                              # one pair: cannot fit yet
    with caplog.at_level(logging.WARNING, logger="caching"):
        drive(model, inputs)
    assert "calibrating on the next generation too" in caplog.text
    drive(model, inputs)
    remove_cache(model)
    assert np.allclose(handle.config.trigger.coefficients, (1.0, 2.0, 0.0), atol=1e-3)


def test_taylor_gains_scale_each_segments_extrapolation():
    tembs = [2.0 + 3.0 * i for i in range(12)]          # computed at 0, 3, 6, 9
    truth, cached = run_shift(TaylorUpdate(order=1, gains=(0.5, 2.0)), tembs)
    errors = [max_error(truth, cached, [step]) for step in range(12)]
    # steps 1, 2: one point, plain reuse; 4, 5: half the slope; 7, 8: twice; 10, 11: past the gains, 1
    assert errors == pytest.approx([0, 3, 6, 0, 1.5, 3, 0, 3, 6, 0, 0, 0], abs=1e-4)


def test_search_forecast_gains_stops_the_forecast_where_features_level_off():
    from caching import search_forecast_gains

    model = toy_model()
    tembs = [float(min(i, 5)) for i in range(12)]        # rises to step 5, then flat
    inputs = [dict(hidden_states=torch.zeros(1, 3, 4), temb=torch.tensor([t])) for t in tembs]

    def run_fn():
        return torch.stack(drive(model, inputs))

    reference = run_fn()
    found = search_forecast_gains(
        model, lambda gains: CacheConfig(IntervalTrigger(3), ResidualScope(), update=TaylorUpdate(1, gains=gains)),
        run_fn, reference, segments=3)
    # segment 0 (after step 3) extrapolates the true slope; segment 1 (after step 6) sees the old
    # slope 2/3 while the feature is flat: gain 0; segment 2 (after step 9) has slope 0: stays 1
    assert found.gains == pytest.approx((1.0, 0.0, 1.0))
    assert found.objective < found.initial_objective - 5 and found.trials >= 6
    assert torch.equal(run_fn(), reference)


def test_gains_are_checked():
    with pytest.raises(ValueError, match=r"gains\[1\]=5.0 must be a number in \[0, 4\]"):
        TaylorUpdate(gains=(1.0, 5.0))
    with pytest.raises(ValueError, match="gains must be a list"):
        TaylorUpdate(gains="1.0")
    with pytest.raises(ValueError, match="update='foca' takes none"):
        get_preset("foca", gains=[1.0])
    assert get_preset("taylorseer", gains=[0.5, 1]).update.gains == (0.5, 1.0)
