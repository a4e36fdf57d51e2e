"""A run's compute, decided once: its dtype, where its convolutions and training BatchNorms
run, and why.

`model.dtype`, `model.conv` and `model.norm` default to `auto`, "the fastest path that is
correct on this machine". `resolve` turns them into a `Compute` once per training start
(train.py) and once per `rotjax.load` (api.py); the model takes that Compute, and its layers
only read it. So the log line, run_info.json's `compute`, each epoch's metrics row and the
traced model all say the same thing, and nothing asks again while tracing.

The rules, from scripts/benchmark.py on each CPU class (README, Performance):
- dtype: bfloat16 where it is native: CPUs with AVX512-BF16 or AMX (oneDNN's bf16
  convolutions ran 1.6x its fp32 ones there), NVIDIA GPUs with bf16 tensor cores, TPUs;
  float32 elsewhere, where bf16 is emulated through float32.
- conv: oneDNN on the CPU wherever it has optimized kernels for that dtype
  (onednn_conv.uses_onednn), XLA's own otherwise.
- norm: with the convolutions, except statistics synced over several devices
  (onednn_batchnorm.covers: oneDNN has no cross-device sums).
- A resumed run keeps what its first start resolved (`recorded`), so one run computes in one
  dtype on one path however many machines it meets; an explicit value in the config wins.
- Predicting (`fallback`): a run trained with model.conv or model.norm = onednn still loads
  where oneDNN cannot run; its weights do not depend on the kernels' code.
"""

import dataclasses
import logging
import re

import jax

from rotjax.cpu import hardware
from rotjax.cpu import onednn_batchnorm, onednn_conv
from rotjax.cpu.isa import NATIVE_BF16_CLASSES, cpu_model, isa_class
from rotjax.cpu.onednn_errors import OneDNNConvError, OneDNNNormError

DTYPES = ('auto', 'float32', 'bfloat16')
IMPLS = ('auto', 'xla', 'onednn')  # model.conv and model.norm
# NVIDIA GPUs with bf16 matrix units (tensor cores): Ampere (compute capability 8.0) and
# later. V100 (7.0), T4 (7.5) and P100 (6.0) run bf16 through float32 (XLA converts around
# every matmul and convolution): slower than float32 itself, so `auto` picks float32 there.
MIN_BF16_CUDA_CAPABILITY = (8, 0)


@dataclasses.dataclass(frozen=True)
class Compute:
  """What a run computes with. The default (float32, XLA throughout) is a bare model's.

  `conv_strict` / `norm_strict`: model.conv / model.norm = onednn insisted, so a layer oneDNN
  declines is an error rather than XLA's. `reasons` and `machine` say why and where (the
  record); they do not take part in equality or hashing (a Flax module holds this).
  """

  dtype: str = 'float32'  # float32 | bfloat16 (params and BatchNorm statistics stay float32)
  conv: str = 'xla'  # xla | onednn
  norm: str = 'xla'  # xla | onednn: training BatchNorm (+ the ReLU after it)
  conv_strict: bool = False
  norm_strict: bool = False
  reasons: dict = dataclasses.field(default_factory=dict, compare=False)
  machine: dict = dataclasses.field(default_factory=dict, compare=False)

  def conv_general_dilated(self):
    """What nn.Conv computes with: oneDNN's drop-in, or None for XLA's own."""
    if self.conv == 'xla':
      return None
    return (
      onednn_conv.conv_general_dilated_strict
      if self.conv_strict
      else onednn_conv.conv_general_dilated
    )

  def batchnorm(self):
    """What batchnorm.BatchNorm hands a training BatchNorm to (None: XLA's)."""
    if self.norm == 'xla':
      return None
    return (
      onednn_batchnorm.apply_strict
      if self.norm_strict
      else onednn_batchnorm.apply
    )

  def record(self) -> dict:
    """run_info.json's `compute`: the choices, their reasons, and the machine."""
    machine = dict(self.machine)
    return {
      'backend': machine.pop('backend', None),
      'device_kind': machine.pop('device_kind', None),
      'dtype': self.dtype,
      'dtype_reason': self.reasons.get('dtype'),
      'conv': self.conv,
      'conv_reason': self.reasons.get('conv'),
      'norm': self.norm,
      'norm_reason': self.reasons.get('norm'),
      **machine,
    }


def check_names(model_config) -> None:
  """model.dtype, model.conv and model.norm are known values (no machine is asked)."""
  for field, allowed in (('dtype', DTYPES), ('conv', IMPLS), ('norm', IMPLS)):
    if model_config[field] not in allowed:
      raise ValueError(
        f'model.{field}={model_config[field]!r} is unknown; allowed: {allowed}'
      )


def resolve(
  model_config,
  num_devices: int = 1,
  recorded: dict | None = None,
  *,
  fallback: bool = False,
) -> Compute:
  """The Compute of `model_config` on this machine, for a run over `num_devices`.

  recorded: run_info.json's `compute` of the run's first start, for a resumed run: what
  it used wherever the config leaves the choice to `auto`. fallback: predicting, where an
  insisted oneDNN that cannot run here falls back to `auto` with a warning. Loads oneDNN
  only if the run may use it.
  """
  check_names(model_config)
  dtype_name, conv_impl, norm_impl, continue_onednn = _asked(
    model_config, recorded
  )
  dtype = _dtype(dtype_name)
  conv_impl, (conv_on, conv_reason) = _decide(
    conv_impl,
    lambda impl: onednn_conv.uses_onednn(impl, dtype),
    OneDNNConvError,
    'model.conv',
    fallback,
  )
  if continue_onednn and not conv_on:
    _refuse_resume(recorded, dtype, conv_reason)
  norm_impl, (norm_on, norm_reason) = _decide(
    norm_impl,
    lambda impl: _norm_onednn(impl, dtype, conv_on, conv_reason),
    OneDNNNormError,
    'model.norm',
    fallback,
  )
  if norm_on and not onednn_batchnorm.covers(num_devices, model_config.sync_bn):
    norm_on, norm_reason = (
      False,
      (
        f'statistics synced over {num_devices} devices '
        "(model.sync_bn): XLA's cross-device sums"
      ),
    )
  machine = hardware.facts(onednn=conv_on or norm_on or conv_impl != 'xla')
  return Compute(
    dtype=dtype,
    conv='onednn' if conv_on else 'xla',
    norm='onednn' if norm_on else 'xla',
    conv_strict=conv_impl == 'onednn',
    norm_strict=norm_impl == 'onednn',
    reasons={
      'dtype': _dtype_reason(dtype_name),
      'conv': conv_reason,
      'norm': norm_reason,
    },
    machine=machine,
  )


def _asked(model_config, recorded):
  """(dtype, conv, norm, whether the run must go on with oneDNN convolutions): the config's
  values, with a resumed run's first-start choices pinned where the config says `auto`."""
  dtype, conv, norm = model_config.dtype, model_config.conv, model_config.norm
  if not recorded:
    return dtype, conv, norm, False
  if norm == 'auto' and 'norm' not in recorded:
    # Started before training BatchNorm could run on oneDNN: it goes on with XLA's.
    norm = 'xla'
  if dtype != 'auto':
    return dtype, conv, norm, False
  dtype = recorded['dtype']
  if conv != 'auto':
    return dtype, conv, norm, False
  if recorded['conv'] == 'xla':
    return dtype, 'xla', norm, False
  return dtype, conv, norm, True


def _decide(impl, decide, error, field, fallback):
  """(impl, decide(impl)); predicting, an impl that cannot run here becomes `auto`."""
  try:
    return impl, decide(impl)
  except error as e:
    if not fallback:
      raise
    logging.warning('%s; predicting with %s=auto instead', e, field)
    return 'auto', decide('auto')


def _norm_onednn(impl, dtype, conv_on, conv_reason):
  """(whether training BatchNorms run on oneDNN, why): 'auto' follows the convolutions, so
  model.conv=xla is XLA throughout and a resumed run keeps its path with its convolutions'."""
  if impl == 'xla':
    return False, 'model.norm=xla'
  if impl == 'auto':
    return conv_on, f'as the convolutions: {conv_reason}'
  return True, onednn_batchnorm.require(dtype)


def _refuse_resume(recorded, dtype, reason):
  first = recorded.get('cpu', recorded.get('device_kind', '?'))
  raise ValueError(
    f'this run started with model.dtype=auto -> {dtype} on oneDNN convolutions ({first}, '
    f'class {recorded.get("cpu_isa_class", "?")}; run_info.json) and this machine '
    f'({cpu_model()}, class {isa_class()}) cannot continue it so: {reason}. Resume it on '
    'a machine of the first class, or choose explicitly (--config.model.conv=xla and/or '
    "--config.model.dtype=float32): the metrics rows then record each epoch's dtype and "
    'convolutions'
  )


# ---------------------------------------------------------------- the dtype


def cuda_capability(device) -> tuple | None:
  """(major, minor) of an NVIDIA GPU, None where the device does not say (not CUDA)."""
  text = str(getattr(device, 'compute_capability', '') or '')
  match = re.match(r'(\d+)\.(\d+)', text)
  return (int(match.group(1)), int(match.group(2))) if match else None


def native_bf16(backend: str | None = None, device=None) -> bool:
  """Whether bfloat16 arithmetic is native here (not emulated through float32)."""
  backend = backend or jax.default_backend()
  if backend == 'cpu':
    return isa_class() in NATIVE_BF16_CLASSES
  capability = cuda_capability(
    device if device is not None else jax.devices()[0]
  )
  if capability is not None:
    return capability >= MIN_BF16_CUDA_CAPABILITY
  return True  # TPUs, and GPUs that report no CUDA capability (ROCm: MI200 and later)


def _dtype(name: str) -> str:
  if name != 'auto':
    return name
  return 'bfloat16' if native_bf16() else 'float32'


def _dtype_reason(name: str, backend: str | None = None, device=None) -> str:
  if name != 'auto':
    return f'model.dtype={name}'
  backend = backend or jax.default_backend()
  if backend != 'cpu':
    device = device if device is not None else jax.devices()[0]
    capability = cuda_capability(device)
    if capability is None:
      return f'auto: bfloat16 is native on {backend}'
    cc = '.'.join(map(str, capability))
    need = '.'.join(map(str, MIN_BF16_CUDA_CAPABILITY))
    if capability >= MIN_BF16_CUDA_CAPABILITY:
      return f'auto: {device.device_kind} (compute capability {cc}) has bfloat16 tensor cores'
    return (
      f'auto: {device.device_kind} (compute capability {cc}) has no bfloat16 tensor cores '
      f'(they need {need} or later), so float32'
    )
  cls = isa_class()
  native = 'native' if cls in NATIVE_BF16_CLASSES else 'not native (emulated)'
  return f'auto: CPU class {cls}, where bfloat16 is {native}'


# ---------------------------------------------------------------- the log line


def summary_line(info: dict) -> str:
  """One log line of a record (Compute.record): the choice and its reasons."""
  where = info.get('cpu', info['device_kind'])
  extra = ''
  if 'onednn_version' in info:
    loaded = (
      f'{info["onednn_version"]} ({info["onednn_source"]})'
      if info['onednn_version']
      else 'unavailable'
    )
    extra = (
      f'; oneDNN {loaded}, optimized dtypes {info["onednn_dtypes"] or "none"}'
    )
  isa = f' (class {info["cpu_isa_class"]})' if 'cpu_isa_class' in info else ''
  # BatchNorm's reason only where it parts from the convolutions' path.
  norm_why = (
    f' [{info["norm_reason"]}]'
    if info.get('norm', info['conv']) != info['conv']
    else ''
  )
  return (
    f'compute on {info["backend"]} {where}{isa}: '
    f'dtype {info["dtype"]} [{info["dtype_reason"]}], '
    f'convolutions on {info["conv"]} [{info["conv_reason"]}], training BatchNorm on '
    f'{info.get("norm", "xla")}{norm_why}{extra}'
  )
