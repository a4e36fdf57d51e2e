"""oneDNN convolutions: same values and gradients as XLA's, and clear fallbacks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rotjax import models
from rotjax.compute import Compute
from rotjax.cpu import onednn_build
from rotjax.cpu import onednn_conv
from rotjax.cpu.onednn_build import Status

pytestmark = pytest.mark.cpu_only('oneDNN convolutions, a CPU-only path')

_HEADERS = bool(onednn_build.installations())
# .ci/run installs oneDNN and sets ROTJAX_REQUIRE_ONEDNN=1, so there these tests never skip.
needs_onednn = pytest.mark.skipif(
  (not _HEADERS or onednn_build.disabled())
  and os.environ.get('ROTJAX_REQUIRE_ONEDNN') != '1',
  reason='no oneDNN installed (pip install onednn-devel-cpu-gomp) or ROTJAX_ONEDNN=0',
)
DN = ('NHWC', 'HWIO', 'NHWC')
# (spatial, in, out, kernel, stride, padding): the stems, blocks and shortcuts of the ResNets.
CASES = [
  (8, 3, 16, 3, 1, 1),
  (8, 16, 32, 3, 2, 1),
  (8, 16, 32, 1, 2, 0),
  (16, 3, 8, 7, 2, 3),
  (7, 8, 8, 3, 2, 1),
]


def _xla(x, w, s, p):
  return jax.lax.conv_general_dilated(
    x, w, (s, s), [(p, p)] * 2, dimension_numbers=DN
  )


def _ours(x, w, s, p):
  # strict: on oneDNN or an error, never a silent fall back to XLA that would compare XLA to XLA.
  return onednn_conv.conv_general_dilated_strict(
    x, w, (s, s), [(p, p)] * 2, dimension_numbers=DN
  )


def _skip_unless_onednn_has(dtype):
  name = jnp.dtype(dtype).name
  if name not in onednn_build.supported_dtypes():
    pytest.skip(
      f'oneDNN has no optimized {name} convolutions on this CPU '
      f'(ONEDNN_MAX_CPU_ISA={os.environ.get("ONEDNN_MAX_CPU_ISA", "")!r})'
    )


@needs_onednn
@pytest.mark.parametrize(
  'dtype,tol', [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)]
)
@pytest.mark.parametrize('case', CASES)
def test_values_and_gradients_match_xla(case, dtype, tol):
  _skip_unless_onednn_has(dtype)
  hw, cin, cout, k, s, p = case
  status, info = onednn_build.prepare(
    onednn_build.geometry(
      (3, hw, hw, cin), (k, k, cin, cout), (s, s), ((p, p), (p, p))
    ),
    jnp.dtype(dtype).name,
  )
  # NO_WEIGHT_GRADIENT: that gradient on XLA (SkipBroken under AVX2).
  if status not in (Status.OPTIMIZED, Status.NO_WEIGHT_GRADIENT):
    pytest.skip(f'oneDNN does not take this convolution here: {info}')
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, hw, hw, cin)), dtype)
  w = jnp.asarray(
    rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin), dtype
  )
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
  hlo = (
    jax.jit(
      jax.grad(lambda x, w: jnp.sum(_ours(x, w, 1, 1) ** 2), argnums=(0, 1))
    )
    .lower(x, w)
    .as_text()
  )
  for target in (
    'RotjaxConvForward',
    'RotjaxConvBackwardData',
    'RotjaxConvBackwardWeights',
  ):
    assert target in hlo


def test_unsupported_convolutions_go_to_xla():
  x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 2, 4))
  grouped = jax.jit(
    lambda x, w: onednn_conv.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=DN, feature_group_count=2
    )
  )
  assert 'Rotjax' not in grouped.lower(x, w).as_text()
  np.testing.assert_allclose(
    grouped(x, w),
    jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=DN, feature_group_count=2
    ),
  )


@needs_onednn
def test_resnet_on_onednn_matches_xla():
  kw = dict(num_classes=5, width=8, stem='cifar')
  x = jnp.asarray(
    np.random.default_rng(1).standard_normal((2, 16, 16, 3)), jnp.float32
  )
  # Not strict ('auto'): oneDNN for every convolution it takes here, XLA's for the rest (and
  # for the weight gradient of the 1x1 ones under ONEDNN_MAX_CPU_ISA=AVX2, csrc/onednn_conv.cc
  # SkipBroken).
  a, b = (
    models.create_model('resnet18', compute=Compute(conv=conv), **kw)
    for conv in ('xla', 'onednn')
  )
  variables = a.init(jax.random.key(0), x)
  assert 'RotjaxConvForward' in jax.jit(b.apply).lower(variables, x).as_text()
  (la, _), (lb, _) = a.apply(variables, x), b.apply(variables, x)
  np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-4)
