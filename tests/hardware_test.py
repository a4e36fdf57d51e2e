"""`model.dtype=auto` on GPUs: bfloat16 only where there are bf16 tensor cores."""
import types

import pytest

from rotjax.cpu import hardware


def _gpu(kind, capability):
  return types.SimpleNamespace(device_kind=kind, compute_capability=capability, platform='gpu')


@pytest.mark.parametrize('kind, capability, native', [
    ('Tesla P100-PCIE-16GB', '6.0', False), ('Tesla V100-SXM2-16GB', '7.0', False),
    ('Tesla T4', '7.5', False), ('NVIDIA A100-SXM4-40GB', '8.0', True),
    ('NVIDIA GeForce RTX 3090', '8.6', True), ('NVIDIA H200', '9.0', True),
    ('NVIDIA B200', '10.0', True)])
def test_bf16_only_on_gpus_with_bf16_tensor_cores(kind, capability, native):
  device = _gpu(kind, capability)
  assert hardware.native_bf16('gpu', device) is native
  reason = hardware._dtype_reason('auto', 'gpu', device)
  # The log line and run_info.json say why, with the device and its capability.
  assert kind in reason and capability in reason
  assert ('no bfloat16 tensor cores' in reason) is (not native)


def test_devices_without_a_cuda_capability_keep_bf16():
  tpu = types.SimpleNamespace(device_kind='TPU v5 lite', platform='tpu')
  assert hardware.native_bf16('tpu', tpu)
  assert hardware.cuda_capability(tpu) is None
  assert hardware._dtype_reason('auto', 'tpu', tpu) == 'auto: bfloat16 is native on tpu'


def test_an_explicit_dtype_is_its_own_reason():
  assert hardware._dtype_reason('float32', 'gpu', _gpu('Tesla T4', '7.5')) == 'model.dtype=float32'
