"""compute.resolve: a run's dtype and kernels, decided once per start and per load."""

import collections
import logging
import types

import jax
import numpy as np
import pytest

import rotjax
from configs import common
from rotjax import compute
from rotjax import train
from rotjax.cpu import onednn_batchnorm, onednn_conv
from rotjax.cpu.onednn_errors import OneDNNConvError


def _model(**overrides):
  model = common.get_config().model
  model.update(overrides)
  return model


def _gpu(kind, capability):
  return types.SimpleNamespace(
    device_kind=kind, compute_capability=capability, platform='gpu'
  )


@pytest.mark.parametrize(
  'kind, capability, native',
  [
    ('Tesla P100-PCIE-16GB', '6.0', False),
    ('Tesla V100-SXM2-16GB', '7.0', False),
    ('Tesla T4', '7.5', False),
    ('NVIDIA A100-SXM4-40GB', '8.0', True),
    ('NVIDIA GeForce RTX 3090', '8.6', True),
    ('NVIDIA H200', '9.0', True),
    ('NVIDIA B200', '10.0', True),
  ],
)
def test_bf16_only_on_gpus_with_bf16_tensor_cores(kind, capability, native):
  device = _gpu(kind, capability)
  assert compute.native_bf16('gpu', device) is native
  reason = compute._dtype_reason('auto', 'gpu', device)
  # The log line and run_info.json say why, with the device and its capability.
  assert kind in reason and capability in reason
  assert ('no bfloat16 tensor cores' in reason) is (not native)


def test_devices_without_a_cuda_capability_keep_bf16():
  tpu = types.SimpleNamespace(device_kind='TPU v5 lite', platform='tpu')
  assert compute.native_bf16('tpu', tpu)
  assert compute.cuda_capability(tpu) is None
  assert (
    compute._dtype_reason('auto', 'tpu', tpu)
    == 'auto: bfloat16 is native on tpu'
  )


def test_an_explicit_dtype_is_its_own_reason():
  assert (
    compute._dtype_reason('float32', 'gpu', _gpu('Tesla T4', '7.5'))
    == 'model.dtype=float32'
  )


@pytest.mark.parametrize('field', ['dtype', 'conv', 'norm'])
def test_unknown_values_are_named(field):
  with pytest.raises(
    ValueError, match=rf"model.{field}='mkl' is unknown; allowed"
  ):
    compute.resolve(_model(**{field: 'mkl'}))


def test_xla_throughout_and_the_record_says_why():
  resolved = compute.resolve(_model(dtype='float32', conv='xla'))
  assert (resolved.dtype, resolved.conv, resolved.norm) == (
    'float32',
    'xla',
    'xla',
  )
  assert (
    resolved.conv_general_dilated() is None and resolved.batchnorm() is None
  )
  record = resolved.record()
  assert record['conv_reason'] == 'model.conv=xla'
  assert record['dtype_reason'] == 'model.dtype=float32'
  assert record['norm_reason'].startswith('as the convolutions')
  assert (
    record['backend'] == jax.default_backend()
    and 'onednn_version' not in record
  )
  # The reasons explain the choice; they are no part of it.
  assert resolved == compute.Compute() and hash(resolved) == hash(
    compute.Compute()
  )


def test_norm_follows_the_convolutions_except_statistics_synced_over_devices():
  """run_info.json's `norm`: oneDNN with the convolutions; XLA for statistics synced over
  several devices (oneDNN's BatchNorm has no cross-device sums), saying why."""
  model = _model(dtype='float32', sync_bn=True)
  conv = compute.resolve(model).conv
  assert compute.resolve(model, num_devices=1).norm == conv
  synced = compute.resolve(model, num_devices=2).record()
  assert (
    synced['norm'] == 'xla' and 'synced over 2 devices' in synced['norm_reason']
  )
  assert (
    'synced over 2 devices' in compute.summary_line(synced) or conv == 'xla'
  )
  model.sync_bn = False
  assert compute.resolve(model, num_devices=2).norm == conv


def test_a_resumed_run_keeps_its_first_starts_choices_where_the_config_says_auto(
  monkeypatch,
):
  monkeypatch.setattr(
    onednn_conv, 'uses_onednn', lambda impl, dtype: (impl != 'xla', 'test')
  )
  first = {'dtype': 'bfloat16', 'conv': 'xla', 'norm': 'xla'}
  resolved = compute.resolve(_model(), recorded=first)
  assert (resolved.dtype, resolved.conv) == ('bfloat16', 'xla')
  assert resolved.reasons['dtype'] == 'model.dtype=bfloat16'
  # An explicit value wins; the metrics rows record it per epoch.
  assert (
    compute.resolve(_model(dtype='float32'), recorded=first).dtype == 'float32'
  )
  # Started before training BatchNorm could run on oneDNN: XLA's, whatever the convolutions.
  before_norm = compute.resolve(
    _model(), recorded={'dtype': 'float32', 'conv': 'onednn'}
  )
  assert (
    before_norm.norm == 'xla'
    and before_norm.reasons['norm'] == 'model.norm=xla'
  )


def test_a_resume_this_machine_cannot_continue_names_both(monkeypatch):
  monkeypatch.setattr(
    onednn_conv, 'uses_onednn', lambda impl, dtype: (False, 'no bf16 kernels')
  )
  first = {
    'dtype': 'bfloat16',
    'conv': 'onednn',
    'cpu': 'First CPU',
    'cpu_isa_class': 'amx',
  }
  with pytest.raises(
    ValueError, match=r'(?s)bfloat16 on oneDNN.*First CPU.*no bf16 kernels'
  ):
    compute.resolve(_model(), recorded=first)
  assert compute.resolve(_model(conv='xla'), recorded=first).conv == 'xla'


def test_predicting_falls_back_from_an_onednn_that_cannot_run(
  monkeypatch, caplog
):
  def uses_onednn(impl, dtype):
    if impl == 'onednn':
      raise OneDNNConvError('model.conv=onednn, but not here')
    return False, 'oneDNN unavailable (test)'

  monkeypatch.setattr(onednn_conv, 'uses_onednn', uses_onednn)
  model = _model(dtype='float32', conv='onednn', norm='auto')
  with pytest.raises(OneDNNConvError):
    compute.resolve(model)
  with caplog.at_level(logging.WARNING):
    resolved = compute.resolve(model, fallback=True)
  assert (resolved.conv, resolved.conv_strict) == ('xla', False)
  assert 'predicting with model.conv=auto instead' in caplog.text


def _count_calls(monkeypatch):
  """Counts compute.resolve and what decides inside it (the dtype, oneDNN convolutions,
  oneDNN BatchNorm); `outside` lists any of those called other than from a resolve."""
  calls, outside, depth = collections.Counter(), [], [0]
  real_resolve = compute.resolve

  def resolve(*args, **kwargs):
    calls['resolve'] += 1
    depth[0] += 1
    try:
      return real_resolve(*args, **kwargs)
    finally:
      depth[0] -= 1

  monkeypatch.setattr(compute, 'resolve', resolve)
  for module, name in (
    (compute, '_dtype'),
    (compute, 'native_bf16'),
    (onednn_conv, 'uses_onednn'),
    (onednn_batchnorm, 'require'),
  ):

    def spy(
      *args,
      _real=getattr(module, name),
      _name=f'{module.__name__}.{name}',
      **kwargs,
    ):
      calls[_name] += 1
      if not depth[0]:
        outside.append(_name)
      return _real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
  return calls, outside


def test_compute_is_resolved_once_per_start_and_per_load_and_never_per_layer(
  make_config, tmp_path, monkeypatch
):
  calls, outside = _count_calls(monkeypatch)
  train.train_and_evaluate(
    make_config('supervised', tmp_path, num_epochs=1, **{'model.dtype': 'auto'})
  )
  assert calls['resolve'] == 1 and calls['rotjax.compute._dtype'] == 1, calls
  assert calls['rotjax.cpu.onednn_conv.uses_onednn'] == 1, calls
  model = rotjax.load(str(tmp_path))
  images = np.zeros((2, 16, 16, 3), np.uint8)
  model.predict(images)
  model.features(images, layer='layer2')
  assert calls['resolve'] == 2, calls
  # Model init, tracing and the compiled steps only read the resolved Compute.
  assert outside == []
