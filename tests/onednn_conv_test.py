"""oneDNN convolutions: same values and gradients as XLA's, and clear fallbacks."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rotjax import models
from rotjax import onednn_conv

pytestmark = pytest.mark.cpu_only('oneDNN convolutions, a CPU-only path')

_HEADERS = bool(onednn_conv.installations())
# .ci/run installs oneDNN and sets ROTJAX_REQUIRE_ONEDNN=1, so there these tests never skip.
needs_onednn = pytest.mark.skipif(
    (not _HEADERS or onednn_conv.disabled()) and os.environ.get('ROTJAX_REQUIRE_ONEDNN') != '1',
    reason='no oneDNN installed (pip install onednn-devel-cpu-gomp) or ROTJAX_ONEDNN=0')
DN = ('NHWC', 'HWIO', 'NHWC')
# (spatial, in, out, kernel, stride, padding): the stems, blocks and shortcuts of the ResNets.
CASES = [(8, 3, 16, 3, 1, 1), (8, 16, 32, 3, 2, 1), (8, 16, 32, 1, 2, 0), (16, 3, 8, 7, 2, 3),
         (7, 8, 8, 3, 2, 1)]


def _xla(x, w, s, p):
  return jax.lax.conv_general_dilated(x, w, (s, s), [(p, p)] * 2, dimension_numbers=DN)


def _ours(x, w, s, p):
  # strict: on oneDNN or an error, never a silent fall back to XLA that would compare XLA to XLA.
  return onednn_conv.conv_general_dilated_strict(x, w, (s, s), [(p, p)] * 2, dimension_numbers=DN)


def _skip_unless_onednn_has(dtype):
  name = jnp.dtype(dtype).name
  if name not in onednn_conv.supported_dtypes():
    pytest.skip(f'oneDNN has no optimized {name} convolutions on this CPU '
                f'(ONEDNN_MAX_CPU_ISA={os.environ.get("ONEDNN_MAX_CPU_ISA", "")!r})')


@needs_onednn
def test_kernels_build_and_load():
  assert onednn_conv.load(), onednn_conv.unavailable_reason()


@needs_onednn
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize('case', CASES)
def test_values_and_gradients_match_xla(case, dtype, tol):
  _skip_unless_onednn_has(dtype)
  hw, cin, cout, k, s, p = case
  status, info = onednn_conv._prepare(onednn_conv._geometry((3, hw, hw, cin), (k, k, cin, cout), (s, s),
                                                            ((p, p), (p, p))), jnp.dtype(dtype).name)
  if status not in (0, 3):   # 3: the weight gradient on XLA (SkipBroken under AVX2)
    pytest.skip(f'oneDNN does not take this convolution here: {info}')
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, hw, hw, cin)), dtype)
  w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin), dtype)
  results = []
  for conv in (_xla, _ours):
    loss = lambda x, w: jnp.sum(jnp.sin(conv(x, w, s, p).astype(jnp.float32)))
    y = jax.jit(conv, static_argnums=(2, 3))(x, w, s, p)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    results.append((y, *grads))
  for name, a, b in zip(('y', 'dx', 'dw'), *results):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    scale = float(jnp.max(jnp.abs(a.astype(jnp.float32)))) + 1e-6
    err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    assert err <= tol * scale, (name, err, scale)


@needs_onednn
def test_ffi_call_is_in_the_compiled_step():
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  hlo = jax.jit(jax.grad(lambda x, w: jnp.sum(_ours(x, w, 1, 1) ** 2), argnums=(0, 1))).lower(x, w).as_text()
  for target in ('RotjaxConvForward', 'RotjaxConvBackwardData', 'RotjaxConvBackwardWeights'):
    assert target in hlo


def test_unsupported_convolutions_go_to_xla():
  x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 2, 4))
  grouped = jax.jit(lambda x, w: onednn_conv.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=DN, feature_group_count=2))
  assert 'Rotjax' not in grouped.lower(x, w).as_text()
  np.testing.assert_allclose(grouped(x, w), jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=DN, feature_group_count=2))


@needs_onednn
def test_resnet_on_onednn_matches_xla():
  kw = dict(num_classes=5, width=8, stem='cifar')
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 16, 3)), jnp.float32)
  # 'auto': oneDNN for every convolution it takes here, XLA's for the rest (and for the
  # weight gradient of the 1x1 ones under ONEDNN_MAX_CPU_ISA=AVX2, csrc/onednn_conv.cc SkipBroken).
  a, b = (models.create_model('resnet18', conv_impl=impl, **kw) for impl in ('xla', 'auto'))
  variables = a.init(jax.random.key(0), x)
  assert 'RotjaxConvForward' in jax.jit(b.apply).lower(variables, x).as_text()
  (la, _), (lb, _) = a.apply(variables, x), b.apply(variables, x)
  np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-4)


def test_unknown_impl_is_named():
  with pytest.raises(ValueError, match=r"model.conv='mkl' is unknown"):
    onednn_conv.resolve('mkl')
  assert onednn_conv.resolve('xla') is None


def test_without_a_compiler_auto_falls_back_and_onednn_says_why(tmp_path):
  code = ('from rotjax import onednn_conv as c\n'
          'assert c.resolve("auto") is None\n'
          'try:\n  c.resolve("onednn")\nexcept RuntimeError as e:\n  print(e)\n')
  env = dict(os.environ, CXX=str(tmp_path / 'no-such-compiler'), ROTJAX_CACHE=str(tmp_path))
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
  assert 'model.conv=onednn, but the oneDNN kernels are unavailable' in out.stdout


@pytest.mark.parametrize('isa, first', [
    ('older', 'pip'), ('avx2', 'pip'), ('avx512', 'system'), ('avx512_bf16', 'system'),
    ('amx', 'pip')])
def test_which_onednn_each_cpu_class_tries_first(isa, first):
  """The measured fastest first: 3.2 without AVX-512 and on AMX, Debian's 2.6 with AVX-512."""
  inst = lambda source, version: onednn_conv.Installation(source, '/x', None, version)
  system, pip = inst('system', '2.6.3'), inst('pip', '3.2.0')
  expected = [pip, system] if first == 'pip' else [system, pip]
  assert onednn_conv.preferred([system, pip], isa) == expected
  assert onednn_conv.preferred([pip, system], isa) == expected
  assert onednn_conv.preferred([pip], isa) == [pip]
  assert onednn_conv.preferred([], isa) == []


def test_every_cpu_class_has_a_measured_choice():
  from rotjax import hardware
  assert set(onednn_conv.FASTEST) == {name for name, _ in hardware.ISA_CLASSES}


def test_found_installations_are_real(tmp_path):
  """Only directories holding dnnl_version.h count; ROTJAX_ONEDNN_ROOT replaces the search."""
  root = tmp_path / 'onednn'
  (root / 'include' / 'oneapi' / 'dnnl').mkdir(parents=True)
  (root / 'include' / 'oneapi' / 'dnnl' / 'dnnl_version.h').write_text(
      '#define DNNL_VERSION_MAJOR 3\n#define DNNL_VERSION_MINOR 9\n#define DNNL_VERSION_PATCH 1\n')
  code = 'from rotjax import onednn_conv as c; print([(i.source, i.version) for i in c.installations()])'
  run = lambda **env: subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                                     check=True, env=dict(os.environ, **env)).stdout.strip()
  assert run(ROTJAX_ONEDNN_ROOT=str(root)) == "[('ROTJAX_ONEDNN_ROOT', '3.9.1')]"
  assert run(ROTJAX_ONEDNN_ROOT=str(tmp_path / 'empty')) == '[]'


_BOTH = {i.source for i in onednn_conv.installations()} >= {'pip', 'system'}


@pytest.mark.skipif(not _BOTH or onednn_conv.disabled(), reason='needs the pip and the system oneDNN')
def test_headers_of_one_onednn_with_the_library_of_another_are_refused(tmp_path):
  """A build whose headers and library differ never loads; load() goes on to the next."""
  code = '''
from rotjax import onednn_conv as c
pip = next(i for i in c.installations() if i.source == 'pip')
system = next(i for i in c.installations() if i.source == 'system')
for headers, lib_dir in ((pip.include, None), (system.include, pip.lib_dir)):
  try:
    c._build_and_open(c.Installation('mixed', headers, lib_dir, 'x'))
    print('LOADED')
  except (OSError, RuntimeError) as e:
    print('REFUSED', str(e).splitlines()[0][:200])
'''
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       env=dict(os.environ, ROTJAX_CACHE=str(tmp_path)))
  assert out.returncode == 0, out.stderr[-2000:]   # an error, never a crash
  lines = out.stdout.splitlines()
  assert len(lines) == 2 and all(l.startswith('REFUSED') for l in lines), lines
