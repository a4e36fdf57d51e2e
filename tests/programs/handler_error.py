"""A failure inside the oneDNN custom call (a bf16 convolution where oneDNN has no bf16
kernels) becomes a named OneDNNConvError, and the process lives on."""

import _path  # noqa: F401  (this checkout first)
import jax
import jax.numpy as jnp

from rotjax.cpu import onednn_build, onednn_conv, onednn_errors

assert onednn_build.load()
x, w = (
  jnp.ones((2, 8, 8, 16), jnp.bfloat16),
  jnp.ones((3, 3, 16, 16), jnp.bfloat16),
)
try:
  with onednn_errors.named_errors():
    # conv2d calls the FFI handler directly, past the checks made while tracing.
    jax.block_until_ready(
      jax.jit(lambda x, w: onednn_conv.conv2d(x, w, (1, 1), ((1, 1), (1, 1))))(
        x, w
      )
    )
  print('RAN')
except onednn_errors.OneDNNConvError as e:
  print('NAMED', e)
print('ALIVE')
