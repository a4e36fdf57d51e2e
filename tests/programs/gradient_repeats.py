"""The same weight gradient four times over, bit for bit (prints the largest difference).
Usage: gradient_repeats.py IMAGE_FOLDER WORKDIR"""

import sys

import _path  # noqa: F401
import conftest
import jax
import jax.numpy as jnp
import numpy as np
from rotjax import train

from rotjax import run_state

folder, workdir = sys.argv[1:3]
config = conftest.tiny_config('supervised', workdir, folder)
config.model.sync_bn = False  # per-device statistics, on one device
state, _, _, _ = run_state.create_train_state(config, 3, steps_per_epoch=10)
x = jnp.asarray(
  np.random.default_rng(0).standard_normal((8, 16, 16, 3)), jnp.float32
)


def loss(params, x):
  (logits, _), _ = state.apply_fn(
    {'params': params, 'batch_stats': state.batch_stats},
    x,
    train=True,
    mutable=['batch_stats'],
  )
  return jnp.sum(logits**2)


# A pmap of one names the axis BatchNorm pools its running statistics over.
p_grad = jax.pmap(
  jax.grad(loss),
  axis_name='data',
  in_axes=(None, 0),
  devices=jax.devices()[:1],
)
results = [
  np.concatenate(
    [
      np.ravel(g)
      for g in jax.tree.leaves(jax.device_get(p_grad(state.params, x[None])))
    ]
  )
  for _ in range(4)
]
print(
  'MAXDIFF', max(float(np.max(np.abs(r - results[0]))) for r in results[1:])
)
