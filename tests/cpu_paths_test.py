"""The default compute path on every class of CPU: train a step and predict, never a crash.

oneDNN honours ONEDNN_MAX_CPU_ISA, and rotjax caps what it believes the CPU has by
the same variable (isa.py), so one machine covers the lesser CPUs:
(a) ONEDNN_MAX_CPU_ISA=AVX2 (an AVX2-only laptop or cloud CPU), (b) no oneDNN
(ROTJAX_ONEDNN=0), (c) the machine as it is. Each runs in a fresh interpreter, as
both variables are read once per process; the 2 host devices of conftest.py are
kept, since the AVX2 crash (a segfault in fp32 backward-weights) needed a multi-device pmap.
"""

import json
import os
import subprocess
import sys

import pytest

from rotjax import testing
from rotjax import compute as compute_lib
from rotjax.cpu import isa
from rotjax.cpu import onednn_build

pytestmark = pytest.mark.cpu_only(
  'the CPU paths (instruction-set classes, oneDNN, XLA on the CPU)'
)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROGRAMS = os.path.join(HERE, 'programs')
REQUIRED = os.environ.get('ROTJAX_REQUIRE_ONEDNN') == '1'


def _env(**overrides):
  # 'as-is' keeps the suite's own environment (CI also runs the suite under
  # ONEDNN_MAX_CPU_ISA=AVX2 and ROTJAX_ONEDNN=0), so its expectations hold there too.
  return testing.child_env(**overrides)


def _run(args, env, timeout=600):
  out = subprocess.run(
    [sys.executable, *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=REPO,
  )
  assert out.returncode == 0, out.stderr[-3000:]  # a segfault shows as -11 here
  return out


def _onednn_expected() -> bool:
  if REQUIRED:
    assert onednn_build.load(), onednn_build.unavailable_reason()
  return onednn_build.load()


@pytest.mark.slow
@pytest.mark.parametrize('cpu', ['as-is', 'avx2', 'no-onednn'])
def test_default_path_trains_and_predicts(cpu, image_folder, tmp_path):
  env = _env(
    **{
      'as-is': {},
      'avx2': {'ONEDNN_MAX_CPU_ISA': 'AVX2'},
      'no-onednn': {'ROTJAX_ONEDNN': '0'},
    }[cpu]
  )
  out = _run(
    [
      os.path.join(PROGRAMS, 'train_and_predict.py'),
      image_folder,
      str(tmp_path / 'run'),
      'supervised',
    ],
    env,
  )
  result = json.loads(out.stdout.strip().splitlines()[-1])
  compute = result['compute']
  assert (
    result['probs_shape'] == [3, 3]
    and result['probs_finite']
    and result['epochs'] == 1
  )
  assert all(abs(s - 1) < 1e-3 for s in result['row_sums'])
  if cpu == 'avx2':
    # What an AVX2-only CPU gets: float32 (bf16 is emulated there) on oneDNN's AVX2 kernels.
    assert compute['cpu_isa_class'] == 'avx2' and compute['dtype'] == 'float32'
    assert compute['conv'] == ('onednn' if _onednn_expected() else 'xla')
  elif cpu == 'no-onednn':
    assert (
      compute['conv'] == 'xla' and 'ROTJAX_ONEDNN=0' in compute['conv_reason']
    )
  else:
    assert compute['dtype'] == (
      'bfloat16' if compute_lib.native_bf16() else 'float32'
    )
    assert compute['cpu_isa_class'] == isa.isa_class()
    expected_conv = (
      _onednn_expected() and compute['dtype'] in onednn_build.supported_dtypes()
    )
    assert compute['conv'] == ('onednn' if expected_conv else 'xla')
  assert compute['dtype_reason'] and compute['conv_reason']


def test_bf16_on_avx2_goes_to_xla_and_onednn_is_refused_up_front(
  image_folder, tmp_path
):
  if not _onednn_expected():
    pytest.skip('oneDNN unavailable: nothing to refuse')
  out = _run(
    [
      os.path.join(PROGRAMS, 'conv_choice.py'),
      image_folder,
      str(tmp_path / 'run'),
    ],
    _env(ONEDNN_MAX_CPU_ISA='AVX2'),
  ).stdout
  assert 'AUTO xla oneDNN' in out and 'no optimized bfloat16 convolution' in out
  refused = [line for line in out.splitlines() if line.startswith('REFUSED')]
  assert refused, out
  assert 'bfloat16' in refused[0] and 'model.conv=xla' in refused[0]


def test_an_error_inside_the_custom_call_is_a_named_exception():
  if not _onednn_expected():
    pytest.skip('oneDNN unavailable: no custom call to fail')
  out = _run(
    [os.path.join(PROGRAMS, 'handler_error.py')],
    _env(ONEDNN_MAX_CPU_ISA='AVX2'),
  ).stdout
  assert 'ALIVE' in out and 'NAMED' in out, out
  named = next(line for line in out.splitlines() if line.startswith('NAMED'))
  assert (
    'input NHWC [2, 8, 8, 16]' in named
    and 'bfloat16' in named
    and 'model.conv=xla' in named
  )


def test_model_conv_xla_never_builds_or_loads_onednn(image_folder, tmp_path):
  out = _run(
    [
      os.path.join(PROGRAMS, 'xla_only.py'),
      image_folder,
      str(tmp_path / 'run'),
    ],
    _env(ROTJAX_CACHE=str(tmp_path / 'cache')),
  ).stdout
  assert 'CONV xla' in out and 'LOADED False' in out, out
  assert not (tmp_path / 'cache' / 'onednn').exists()


def test_a_too_old_onednn_falls_back_and_is_named():
  if not _onednn_expected():
    pytest.skip('oneDNN unavailable: no version to check')
  out = _run([os.path.join(PROGRAMS, 'too_old.py')], _env()).stdout
  assert 'LOADED False' in out and 'AUTO False' in out, out
  assert 'too old' in next(
    l for l in out.splitlines() if l.startswith('REASON')
  )
  named = next(l for l in out.splitlines() if l.startswith('NAMED'))
  assert 'too old' in named and 'model.conv=xla' in named


@pytest.mark.slow
@pytest.mark.parametrize('cpu', ['as-is', 'avx2'])
def test_the_same_gradient_bit_for_bit_every_time(cpu, image_folder, tmp_path):
  # Under ONEDNN_MAX_CPU_ISA=AVX2, oneDNN 2.6.3's jit_1x1:avx2 backward-weights kernel gave a
  # width-4 ResNet's strided 1x1 layer a different weight gradient from run to run (off by
  # up to 5.8 against the first run; CI's resume test saw the drift); rotjax passes that
  # kernel over (csrc/onednn_conv.cc, SkipBroken): that weight gradient is computed by XLA.
  env = _env(
    XLA_FLAGS='--xla_force_host_platform_device_count=1',
    **({'ONEDNN_MAX_CPU_ISA': 'AVX2'} if cpu == 'avx2' else {}),
  )
  out = _run(
    [
      os.path.join(PROGRAMS, 'gradient_repeats.py'),
      image_folder,
      str(tmp_path / 'run'),
    ],
    env,
  ).stdout
  assert 'MAXDIFF 0.0' in out, out
