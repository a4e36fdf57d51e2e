import os

import flax
import jax
import numpy as np
import pytest

from rotjax import checkpoint
from rotjax import input_pipeline
from rotjax import train


def _flat(tree):
  return flax.traverse_util.flatten_dict(jax.device_get(tree), sep='/')


def test_pretext_to_finetune_restores_backbone_and_reinits_head(make_config, tmp_path):
  pre = make_config('pretext', tmp_path / 'pre', num_epochs=1)
  train.train_and_evaluate(pre)
  saved = checkpoint.load_variables(str(tmp_path / 'pre'))
  assert saved['params']['fc']['kernel'].shape[-1] == 4   # the rotation head

  fine = make_config('finetune', tmp_path / 'fine', init_from=str(tmp_path / 'pre'))
  dataset = input_pipeline.load_dataset(fine.data)
  state, _, _, info = train.create_train_state(fine, dataset.num_classes, 4)
  assert info['reinitialised'] == ['fc/bias', 'fc/kernel']
  loaded, restored = _flat(saved['params']), _flat(state.params)
  for name, value in restored.items():
    if name.startswith('fc/'):
      assert value.shape[-1] == 3
    else:
      np.testing.assert_array_equal(value, loaded[name], err_msg=name)
  for name, value in _flat(state.batch_stats).items():
    np.testing.assert_array_equal(value, _flat(saved['batch_stats'])[name], err_msg=name)
  # A fresh run with the same seed has a different backbone: the restore did something.
  scratch, _, _, _ = train.create_train_state(make_config('finetune', tmp_path / 'x', seed=5),
                                              dataset.num_classes, 4)
  assert not np.array_equal(_flat(scratch.params)['layer1/0/conv1/kernel'],
                            restored['layer1/0/conv1/kernel'])
  # And the fine-tune runs end to end from it.
  summary = train.train_and_evaluate(fine)
  assert summary['epochs'] == 2


def test_shape_mismatch_outside_head_names_the_parameter():
  init = {'conv1': {'kernel': np.zeros((3, 3, 3, 8))}, 'fc': {'kernel': np.zeros((8, 10))}}
  loaded = {'conv1': {'kernel': np.zeros((3, 3, 3, 16))}, 'fc': {'kernel': np.zeros((16, 4))}}
  with pytest.raises(ValueError, match="'conv1/kernel' has shape"):
    checkpoint.merge_params(init, loaded)


def test_missing_init_from_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpoint.load_variables(str(tmp_path / 'nope'))
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='not a rotjax run'):
    checkpoint.load_variables(str(tmp_path / 'empty'))


def test_partial_checkpoint_is_never_restored(make_config, tmp_path):
  config = make_config('supervised', tmp_path / 'run', num_epochs=1)
  train.train_and_evaluate(config)
  ckpt_dir = tmp_path / 'run' / 'checkpoints'
  # What a kill mid-write leaves behind: an uncommitted temporary step directory.
  os.makedirs(ckpt_dir / '999.orbax-checkpoint-tmp-0' / 'default')
  dataset = input_pipeline.load_dataset(config.data)
  state, _, _, _ = train.create_train_state(config, dataset.num_classes, 4)
  manager = checkpoint.Checkpoints(str(tmp_path / 'run'))
  restored = manager.restore_latest(state)
  manager.close()
  assert int(restored.step) == len(dataset.train) // config.batch_size
