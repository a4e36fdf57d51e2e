"""Data parallel under jit (one program over a device mesh, parallel=auto) and under pmap
train alike: for the same batches on 2 host devices, the same losses, parameters,
BatchNorm statistics and optimiser state, for every stage and both model.sync_bn; a run
started in one mode resumes in the other as if unbroken."""

import functools

import jax
import numpy as np
import pytest

import rotjax
from rotjax import batch_plans
from rotjax import data_parallel
from rotjax import input_pipeline
from rotjax import metrics
from rotjax import model_factory
from rotjax import run_state
from rotjax import steps
from rotjax import train

pytestmark = pytest.mark.skipif(
  jax.local_device_count() < 2, reason='needs 2 devices (XLA_FLAGS)'
)
STEPS = 3
# Same per-device program, collectives and data: rounding is all that may differ.
RTOL, ATOL = 1e-5, 1e-6


def _setup(make_config, tmp_path, stage, sync_bn):
  config = make_config(
    stage, tmp_path, init_from='', **{'model.sync_bn': sync_bn}
  )
  dataset = input_pipeline.load_dataset(config.data)
  state, mask, _, _ = run_state.create_train_state(
    config, model_factory.num_outputs(config, dataset), STEPS
  )
  batches = list(
    batch_plans.train_batches(dataset.train, 8, 0, 1, num_steps=STEPS)
  )
  return config, state, mask, batches


def _train(dp, step, state, batches):
  """(losses, host state after the steps) of `step` compiled by `dp`."""
  placed, rng = dp.put(state), dp.put(jax.random.key(0))
  losses = []
  for batch in batches:
    placed, m = step(placed, dp.put_batch(batch), rng)
    losses.append(float(dp.get(m)['loss']))
  return losses, dp.get(placed)


def _run_mode(mode, config, state, mask, batches, batch_args=(1,)):
  dp = data_parallel.DataParallel(mode, jax.local_devices()[:2])
  step = functools.partial(
    steps.train_step,
    prepare_fn=steps.make_prepare_fn(config, train=True),
    mask=mask,
    smoothing=config.label_smoothing,
  )
  return _train(dp, dp.compile(step, batch_args=batch_args), state, batches)


def _assert_trees_close(a, b, **tolerance):
  for (path, x), y in zip(
    jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
  ):
    np.testing.assert_allclose(
      np.asarray(x, np.float64),
      np.asarray(y, np.float64),
      err_msg=jax.tree_util.keystr(path),
      **tolerance,
    )


@pytest.mark.parametrize('sync_bn', [True, False])
@pytest.mark.parametrize('stage', ['pretext', 'finetune', 'supervised'])
def test_jit_and_pmap_take_the_same_steps(
  make_config, tmp_path, stage, sync_bn
):
  config, state, mask, batches = _setup(make_config, tmp_path, stage, sync_bn)
  jit_losses, jit_state = _run_mode('jit', config, state, mask, batches)
  pmap_losses, pmap_state = _run_mode('pmap', config, state, mask, batches)
  np.testing.assert_allclose(jit_losses, pmap_losses, rtol=RTOL)
  for tree in ('params', 'batch_stats', 'opt_state'):
    _assert_trees_close(
      getattr(jit_state, tree), getattr(pmap_state, tree), rtol=RTOL, atol=ATOL
    )
  assert int(jit_state.step) == int(pmap_state.step) == STEPS
  if stage == 'finetune':
    # layer4 + fc train; every other parameter is bit for bit the initial one, in both.
    flat = lambda tree: jax.tree_util.tree_leaves_with_path(tree)
    labels = jax.tree.leaves(mask)
    for (path, before), jit_after, pmap_after, label in zip(
      flat(state.params),
      jax.tree.leaves(jit_state.params),
      jax.tree.leaves(pmap_state.params),
      labels,
      strict=True,
    ):
      name = jax.tree_util.keystr(path)
      if label == 'frozen':
        np.testing.assert_array_equal(before, jit_after, err_msg=name)
        np.testing.assert_array_equal(before, pmap_after, err_msg=name)
      else:
        assert not np.array_equal(before, jit_after), name
    assert 'frozen' in labels and 'trainable' in labels


def test_the_comparison_sees_a_batch_given_whole_to_every_device(
  make_config, tmp_path
):
  """The comparison above can fail: under jit with the batch replicated (each device then
  steps on the whole global batch, its rows indexed as if they were its own) instead of
  split, the losses and parameters are not pmap's."""
  config, state, mask, batches = _setup(
    make_config, tmp_path, 'supervised', False
  )
  broken_losses, broken = _run_mode(
    'jit', config, state, mask, batches, batch_args=()
  )
  pmap_losses, pmap_state = _run_mode('pmap', config, state, mask, batches)
  assert not np.allclose(broken_losses, pmap_losses, rtol=RTOL)
  with pytest.raises(AssertionError):
    _assert_trees_close(broken.params, pmap_state.params, rtol=RTOL, atol=ATOL)


def test_jit_state_and_batches_are_global_arrays_on_one_mesh(
  make_config, tmp_path
):
  config, state, mask, batches = _setup(
    make_config, tmp_path, 'supervised', True
  )
  dp = data_parallel.DataParallel('jit', jax.local_devices()[:2])
  placed = dp.put(state)
  batch = dp.put_batch(batches[0])
  for leaf in jax.tree.leaves(placed.params):
    assert leaf.sharding == dp.replicated
  assert (
    batch['image'].shape == batches[0]['image'].shape
  )  # no [devices, ...] axis
  assert batch['image'].sharding == dp.split
  step = steps.compiled_train_step(config, mask, dp)
  out, _ = step(placed, batch, dp.put(jax.random.key(0)))
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(dp.put(state))):
    assert (
      a.sharding == b.sharding
    )  # step 2 reuses the program and donated buffers


def test_auto_is_jit_unless_rotjax_parallel_says_otherwise(monkeypatch):
  monkeypatch.delenv(data_parallel.ENV, raising=False)
  assert data_parallel.resolve_mode('auto') == 'jit'
  monkeypatch.setenv(data_parallel.ENV, 'pmap')
  assert data_parallel.resolve_mode('auto') == 'pmap'
  assert data_parallel.resolve_mode('jit') == 'jit'
  monkeypatch.setenv(data_parallel.ENV, 'gspmd')
  with pytest.raises(ValueError, match="ROTJAX_PARALLEL='gspmd' is unknown"):
    data_parallel.resolve_mode('auto')
  with pytest.raises(ValueError, match="parallel='vmap' is unknown"):
    data_parallel.DataParallel('vmap', jax.local_devices())


def _comparable(rows):
  keep = (
    'train_loss',
    'train_accuracy',
    'val_loss',
    'val_accuracy',
    'test_loss',
  )
  return [[r[k] for k in keep] for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize('first,then', [('pmap', 'jit'), ('jit', 'pmap')])
def test_a_run_resumes_in_the_other_mode_as_if_unbroken(
  make_config, tmp_path, first, then
):
  """Checkpoints hold one copy of the state in either mode (under jit Orbax writes the
  global arrays themselves), so epoch 2 under `then` continues epoch 1 under `first`;
  rotjax.load reads the run either way."""
  unbroken = make_config(
    'supervised', tmp_path / 'unbroken', num_epochs=2, parallel=then
  )
  train.train_and_evaluate(unbroken)
  broken = make_config('supervised', tmp_path / 'broken', num_epochs=1)
  broken.parallel = first
  train.train_and_evaluate(broken)
  broken.num_epochs, broken.parallel = 2, then
  train.train_and_evaluate(broken)
  a = metrics.read_metrics(str(tmp_path / 'unbroken'))
  b = metrics.read_metrics(str(tmp_path / 'broken'))
  np.testing.assert_allclose(_comparable(a), _comparable(b), rtol=1e-5)
  model = rotjax.load(str(tmp_path / 'broken'))
  images = np.zeros((2, model.image_size, model.image_size, 3), np.uint8)
  np.testing.assert_allclose(
    model.predict(images),
    rotjax.load(str(tmp_path / 'unbroken')).predict(images),
    rtol=1e-4,
    atol=1e-5,
  )
