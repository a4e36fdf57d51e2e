"""What this machine can do, and the compute settings `auto` picks from it.

`model.dtype=auto` and `model.conv=auto` mean "the fastest path that is correct on
this machine". Nothing is assumed from the machine the defaults were tuned on:
the CPU's instruction sets come from /proc/cpuinfo, oneDNN's abilities from a
probe (onednn_build.probe), and the choice and its reasons are logged once and
written to run_info.json (`describe`).

The rule, from scripts/benchmark.py on each CPU class (README, Performance):
- bfloat16 compute where the hardware has native bf16: GPUs, TPUs, and CPUs with
  AVX512-BF16 or AMX, where oneDNN's bf16 convolutions ran 1.6x its fp32 ones;
- float32 elsewhere (AVX2-only or AVX-512 without BF16), where bf16 is emulated;
- convolutions on oneDNN wherever it has optimized kernels for that dtype
  (onednn_conv.uses_onednn), XLA's own otherwise; training BatchNorms with them
  (`model.norm=auto`, onednn_batchnorm.uses_onednn).

The CPU's class comes from isa.py (`ONEDNN_MAX_CPU_ISA` caps it, for the tests of the
lesser paths); whether oneDNN takes a dtype here from onednn_conv.uses_onednn.
"""
import os
import re

import jax
import jax.numpy as jnp

from rotjax.cpu import onednn_build
from rotjax.cpu import onednn_batchnorm, onednn_conv
from rotjax.cpu.isa import NATIVE_BF16_CLASSES, cpu_flags, cpu_model, isa_class

DTYPES = ('auto', 'float32', 'bfloat16')
# NVIDIA GPUs with bf16 matrix units (tensor cores): Ampere (compute capability 8.0) and
# later. V100 (7.0), T4 (7.5) and P100 (6.0) run bf16 through float32 (XLA converts around
# every matmul and convolution): slower than float32 itself, so `auto` picks float32 there.
MIN_BF16_CUDA_CAPABILITY = (8, 0)


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
  capability = cuda_capability(device if device is not None else jax.devices()[0])
  if capability is not None:
    return capability >= MIN_BF16_CUDA_CAPABILITY
  return True   # TPUs, and GPUs that report no CUDA capability (ROCm: MI200 and later)


def compute_dtype(name: str):
  """The compute dtype for `model.dtype` (params and BatchNorm statistics stay float32)."""
  if name not in DTYPES:
    raise ValueError(f'model.dtype={name!r} is unknown; allowed: {DTYPES}')
  if name != 'auto':
    return jnp.dtype(name)
  return jnp.dtype(jnp.bfloat16) if native_bf16() else jnp.dtype(jnp.float32)


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
    return (f'auto: {device.device_kind} (compute capability {cc}) has no bfloat16 tensor cores '
            f'(they need {need} or later), so float32')
  cls = isa_class()
  native = 'native' if cls in NATIVE_BF16_CLASSES else 'not native (emulated)'
  return f'auto: CPU class {cls}, where bfloat16 is {native}'


def describe(model_config, num_devices: int = 1) -> dict:
  """What `model.dtype`, `model.conv` and `model.norm` resolve to on this machine for a run
  over `num_devices`, and why (for the log and run_info.json). Loads oneDNN only if the run
  may use it."""
  dtype = compute_dtype(model_config.dtype)
  conv = model_config.conv
  on_onednn, conv_reason = onednn_conv.uses_onednn(conv, dtype)
  norm_on_onednn, norm_reason = onednn_batchnorm.uses_onednn(model_config.norm,
                                                             conv, dtype)
  if norm_on_onednn and model_config.sync_bn and num_devices > 1:
    # batchnorm.BatchNorm leaves statistics over several devices' rows to XLA.
    norm_on_onednn, norm_reason = False, (f'statistics synced over {num_devices} devices '
                                          '(model.sync_bn): XLA\'s cross-device sums')
  info = {'backend': jax.default_backend(),
          'device_kind': jax.devices()[0].device_kind,
          'dtype': dtype.name, 'dtype_reason': _dtype_reason(model_config.dtype),
          'conv': 'onednn' if on_onednn else 'xla', 'conv_reason': conv_reason,
          'norm': 'onednn' if norm_on_onednn else 'xla', 'norm_reason': norm_reason}
  if info['backend'] == 'cpu':
    flags = cpu_flags()
    info.update(cpu=cpu_model(), cpu_isa_class=isa_class(),
                cpu_flags=sorted(f for f in flags if f.startswith(('avx', 'amx', 'fma'))),
                onednn_max_cpu_isa=os.environ.get('ONEDNN_MAX_CPU_ISA', ''))
    if on_onednn or norm_on_onednn or conv != 'xla':
      info.update(onednn_version=onednn_build.version(), onednn_source=onednn_build.source(),
                  onednn_found=[f'{i.source} {i.version}' for i in onednn_build.installations()],
                  onednn_dtypes=list(onednn_build.supported_dtypes()),
                  onednn_unavailable=onednn_build.unavailable_reason())
  return info


def summary_line(info: dict) -> str:
  """One log line: the choice and its reasons."""
  where = info.get('cpu', info['device_kind'])
  extra = ''
  if 'onednn_version' in info:
    loaded = (f'{info["onednn_version"]} ({info["onednn_source"]})' if info['onednn_version']
              else 'unavailable')
    extra = (f'; oneDNN {loaded}, optimized dtypes '
             f'{info["onednn_dtypes"] or "none"}')
  isa = f' (class {info["cpu_isa_class"]})' if 'cpu_isa_class' in info else ''
  # BatchNorm's reason only where it parts from the convolutions' path.
  norm_why = f' [{info["norm_reason"]}]' if info.get('norm', info['conv']) != info['conv'] else ''
  return (f'compute on {info["backend"]} {where}{isa}: dtype {info["dtype"]} [{info["dtype_reason"]}], '
          f'convolutions on {info["conv"]} [{info["conv_reason"]}], training BatchNorm on '
          f'{info.get("norm", "xla")}{norm_why}{extra}')


def resumed_compute(model_config, recorded: dict) -> tuple[str, str]:
  """(model.dtype, model.conv) for a run resumed after a first start that resolved to
  `recorded` (run_info.json's `compute`): what that start used, wherever the config leaves
  the choice to `auto`, so one run computes in one dtype on one convolution path however
  many machines it meets. An explicit value in the config wins (the caller records it per
  epoch). A oneDNN path this machine cannot take is refused, naming both machines."""
  dtype = recorded['dtype'] if model_config.dtype == 'auto' else model_config.dtype
  conv = model_config.conv
  if conv != 'auto' or model_config.dtype != 'auto':
    return dtype, conv
  if recorded['conv'] == 'xla':
    return dtype, 'xla'
  on_onednn, reason = onednn_conv.uses_onednn('auto', dtype)
  if not on_onednn:
    first = recorded.get('cpu', recorded.get('device_kind', '?'))
    raise ValueError(
        f'this run started with model.dtype=auto -> {dtype} on oneDNN convolutions ({first}, '
        f'class {recorded.get("cpu_isa_class", "?")}; run_info.json) and this machine '
        f'({cpu_model()}, class {isa_class()}) cannot continue it so: {reason}. Resume it on '
        'a machine of the first class, or choose explicitly (--config.model.conv=xla and/or '
        '--config.model.dtype=float32): the metrics rows then record each epoch\'s dtype and '
        'convolutions')
  return dtype, conv
