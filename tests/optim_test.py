"""The learning-rate schedules: the reports' step decay by default, one-cycle on request."""

import ml_collections
import numpy as np
import pytest

from configs import common
from rotjax import optim


def _optim(**overrides) -> ml_collections.ConfigDict:
  config = common.get_config().optim
  config.update(overrides)
  return config


def test_adam_defaults_to_the_reports_step_decay():
  schedule = optim.learning_rate_schedule(_optim(), 10, 30)
  assert optim.schedule_name(_optim()) == 'step'
  np.testing.assert_allclose(
    [schedule(s) for s in (0, 99, 100, 199, 200)],
    [1e-3, 1e-3, 1e-4, 1e-4, 1e-5],
    rtol=1e-6,
  )


def test_sgd_defaults_to_cosine():
  config = _optim(name='sgd', learning_rate=0.1)
  schedule = optim.learning_rate_schedule(config, 10, 3)
  assert optim.schedule_name(config) == 'cosine'
  assert float(schedule(0)) == pytest.approx(0.1)
  assert float(schedule(30)) == pytest.approx(0.0, abs=1e-7)


def test_onecycle_rises_to_the_learning_rate_then_anneals_to_zero():
  steps_per_epoch, epochs = 10, 4
  schedule = optim.learning_rate_schedule(
    _optim(schedule='onecycle'), steps_per_epoch, epochs
  )
  values = np.array([float(schedule(s)) for s in range(41)])
  peak = int(np.argmax(values))
  assert peak == round(optim.ONECYCLE_RISE * 40)
  assert values[peak] == pytest.approx(1e-3)
  assert values[0] == pytest.approx(1e-3 / 25)
  assert np.all(np.diff(values[: peak + 1]) > 0)
  assert np.all(np.diff(values[peak:]) < 0)
  assert values[40] < 1e-6  # the run's last step is annealed


def test_an_unknown_schedule_is_named():
  with pytest.raises(ValueError, match="optim.schedule='linear' is unknown"):
    optim.learning_rate_schedule(_optim(schedule='linear'), 10, 3)
