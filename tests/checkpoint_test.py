import json
import os

import flax
import jax
import numpy as np
import pytest

from rotjax import checkpoint
from rotjax import input_pipeline
from rotjax import train


from rotjax import run_state


def _flat(tree):
  return flax.traverse_util.flatten_dict(jax.device_get(tree), sep='/')


@pytest.mark.slow
def test_pretext_to_finetune_restores_backbone_and_reinits_head(
  make_config, tmp_path
):
  pre = make_config('pretext', tmp_path / 'pre', num_epochs=1)
  train.train_and_evaluate(pre)
  saved = checkpoint.load_variables(str(tmp_path / 'pre'))
  assert saved['params']['fc']['kernel'].shape[-1] == 4  # the rotation head

  fine = make_config(
    'finetune', tmp_path / 'fine', init_from=str(tmp_path / 'pre')
  )
  dataset = input_pipeline.load_dataset(fine.data)
  state, _, _, info = run_state.create_train_state(fine, dataset.num_classes, 4)
  assert info['reinitialised'] == ['fc/bias', 'fc/kernel']
  loaded, restored = _flat(saved['params']), _flat(state.params)
  for name, value in restored.items():
    if name.startswith('fc/'):
      assert value.shape[-1] == 3
    else:
      np.testing.assert_array_equal(value, loaded[name], err_msg=name)
  for name, value in _flat(state.batch_stats).items():
    np.testing.assert_array_equal(
      value, _flat(saved['batch_stats'])[name], err_msg=name
    )
  # A fresh run with the same seed has a different backbone: the restore did something.
  scratch, _, _, _ = run_state.create_train_state(
    make_config('finetune', tmp_path / 'x', seed=5), dataset.num_classes, 4
  )
  assert not np.array_equal(
    _flat(scratch.params)['layer1/0/conv1/kernel'],
    restored['layer1/0/conv1/kernel'],
  )
  # And the fine-tune runs end to end from it.
  summary = train.train_and_evaluate(fine)
  assert summary['epochs'] == 2


def test_shape_mismatch_outside_head_names_the_parameter():
  init = {
    'conv1': {'kernel': np.zeros((3, 3, 3, 8))},
    'fc': {'kernel': np.zeros((8, 10))},
  }
  loaded = {
    'conv1': {'kernel': np.zeros((3, 3, 3, 16))},
    'fc': {'kernel': np.zeros((16, 4))},
  }
  with pytest.raises(ValueError, match="'conv1/kernel' has shape"):
    checkpoint.merge_params(init, loaded)


def test_loaded_arrays_the_model_lacks_outside_the_head_are_an_error():
  """A resnet34 into a resnet18: layer1 block 2 has nowhere to go."""
  init = {
    'layer1': {'0': {'conv1': {'kernel': np.zeros((3, 3, 4, 4))}}},
    'fc': {'kernel': np.zeros((4, 3))},
  }
  loaded = {
    'layer1': {
      '0': {'conv1': {'kernel': np.ones((3, 3, 4, 4))}},
      '2': {'conv1': {'kernel': np.ones((3, 3, 4, 4))}},
    },
    'fc': {'kernel': np.ones((4, 4)), 'extra': np.ones(4)},
  }
  with pytest.raises(
    ValueError,
    match=r"1 params arrays this model lacks, e.g. \['layer1/2/conv1/kernel'\]",
  ):
    checkpoint.merge_params(init, loaded)
  del loaded['layer1'][
    '2'
  ]  # extra head arrays are the head's business: re-initialised anyway
  merged, _, kept = checkpoint.merge_params(init, loaded)
  assert (
    kept == ['fc/kernel'] and merged['layer1']['0']['conv1']['kernel'].sum() > 0
  )


def _fake_run(workdir, config, num_classes):
  """A finished run's files: its state as a best checkpoint, and its config.json."""
  state, _, _, _ = run_state.create_train_state(config, num_classes, 4)
  ckpt = checkpoint.Checkpoints(str(workdir))
  ckpt.save(4, jax.device_get(state), is_best=True)
  ckpt.close()
  (workdir / 'config.json').write_text(json.dumps(config.to_dict()))
  return str(workdir)


@pytest.mark.parametrize(
  'field,value', [('name', 'resnet34'), ('stem', 'imagenet'), ('width', 8)]
)
def test_init_from_of_another_architecture_is_refused_before_compute(
  make_config, tmp_path, monkeypatch, field, value
):
  source = make_config('pretext', tmp_path / 'pre')
  source.model[field] = value
  os.makedirs(
    tmp_path / 'pre' / 'checkpoints' / '4'
  )  # a committed step, as the check sees it
  (tmp_path / 'pre' / 'config.json').write_text(json.dumps(source.to_dict()))
  monkeypatch.setattr(
    run_state,
    'create_train_state',
    lambda *a, **k: pytest.fail('compute started'),
  )
  fine = make_config(
    'finetune', tmp_path / 'fine', init_from=str(tmp_path / 'pre')
  )
  ours = fine.model[field]
  with pytest.raises(
    ValueError,
    match=rf'trained with model\.{field}={value!r}, this run has '
    rf'model\.{field}={ours!r}',
  ):
    train.train_and_evaluate(fine)


@pytest.mark.slow
def test_head_is_reinitialised_when_the_source_stage_differs(
  make_config, tmp_path
):
  """A 3-class supervised run into a 3-class fine-tune: the shapes agree, the head still resets."""
  source = _fake_run(
    tmp_path / 'sup', make_config('supervised', tmp_path / 'sup', seed=5), 3
  )
  saved = _flat(checkpoint.load_variables(source)['params'])
  for stage, reinit in (('finetune', True), ('supervised', False)):
    config = make_config(stage, tmp_path / stage, init_from=source)
    state, _, _, info = run_state.create_train_state(config, 3, 4)
    fresh, _, _, _ = run_state.create_train_state(
      make_config(stage, tmp_path / 'x'), 3, 4
    )
    assert info['reinitialised'] == (['fc/bias', 'fc/kernel'] if reinit else [])
    params = _flat(state.params)
    expected = _flat(fresh.params) if reinit else saved
    np.testing.assert_array_equal(params['fc/kernel'], expected['fc/kernel'])
    np.testing.assert_array_equal(
      params['layer1/0/conv1/kernel'], saved['layer1/0/conv1/kernel']
    )


def test_missing_init_from_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpoint.load_variables(str(tmp_path / 'nope'))
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='not a rotjax run'):
    checkpoint.load_variables(str(tmp_path / 'empty'))


@pytest.mark.slow
def test_partial_checkpoint_is_never_restored(make_config, tmp_path):
  config = make_config('supervised', tmp_path / 'run', num_epochs=1)
  train.train_and_evaluate(config)
  ckpt_dir = tmp_path / 'run' / 'checkpoints'
  # What a kill mid-write leaves behind: an uncommitted temporary step directory.
  os.makedirs(ckpt_dir / '999.orbax-checkpoint-tmp-0' / 'default')
  dataset = input_pipeline.load_dataset(config.data)
  state, _, _, _ = run_state.create_train_state(config, dataset.num_classes, 4)
  manager = checkpoint.Checkpoints(str(tmp_path / 'run'))
  restored = manager.restore_latest(state)
  manager.close()
  assert int(restored.step) == -(-len(dataset.train) // config.batch_size)


@pytest.mark.slow
@pytest.mark.gpu
def test_a_checkpoint_made_on_the_cpu_is_used_on_this_backend(
  image_folder, tmp_path
):
  """Checkpoints hold host arrays, no device: a run trained on the CPU (JAX_PLATFORMS=cpu,
  in its own process) is loaded, predicted with and fine-tuned from on this process's
  backend (the GPU where there is one)."""
  import subprocess
  import sys
  import rotjax

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = (
    f'import sys; sys.path.insert(0, {os.path.join(repo, "tests")!r}); import conftest;'
    f'from rotjax import train; import jax; assert jax.default_backend() == "cpu";'
    f'train.train_and_evaluate(conftest.tiny_config("pretext", {str(tmp_path / "pre")!r},'
    f' {image_folder!r}, num_epochs=1))'
  )
  subprocess.run(
    [sys.executable, '-c', code],
    check=True,
    cwd=repo,
    timeout=600,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  model = rotjax.load(str(tmp_path / 'pre'))
  images = np.random.default_rng(0).integers(
    0, 256, (4, 16, 16, 3), dtype=np.uint8
  )
  probs = model.predict(images)
  assert probs.shape == (4, 4) and np.allclose(probs.sum(-1), 1, atol=1e-5)
  saved = checkpoint.load_variables(str(tmp_path / 'pre'))
  from conftest import tiny_config

  fine = tiny_config(
    'finetune',
    tmp_path / 'fine',
    image_folder,
    num_epochs=1,
    init_from=str(tmp_path / 'pre'),
  )
  state, _, _, _ = run_state.create_train_state(fine, 3, 4)
  np.testing.assert_array_equal(
    _flat(state.params)['layer1/0/conv1/kernel'],
    _flat(saved['params'])['layer1/0/conv1/kernel'],
  )
  assert train.train_and_evaluate(fine)['epochs'] == 1
