"""BatchNorm running statistics re-estimated on another set of images (freeze_bn='reestimated').

Why: a pretext's running statistics come from its own images (at `rotation.geometry=disc`:
resampled, turned and cut to a disc), while a stage that normalises with them (the frozen
layers under freeze_bn='running', the linear probe everywhere) applies them to the task's
whole, sharp squares. One no-gradient pass in train mode over the task's training images
gives the chosen BatchNorm layers the mean and variance of those images (the union of the
pass's batches, as "precise BN" does, not a momentum average); gamma, beta and every weight
stay as they are.
"""

import time
from typing import Callable, Iterable

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rotjax import batchnorm


def moments_step(variables, batch, batch_number, *, module, prepare_fn):
  """{BatchNorm path: (mean, E[x^2])} of the batch, per channel; pure, no gradient.

  `prepare_fn(batch, batch_number)` gives the images; every BatchNorm runs in batch mode (a
  model built without `frozen`), so its moments are those of its input on these images, over
  the global batch (the model's axis_name, or pooled over stats_axis_name).
  """
  images = prepare_fn(batch, batch_number)
  _, state = module.apply(
    variables, images, train=True, mutable=['batch_stats', batchnorm.MOMENTS]
  )
  flat = traverse_util.flatten_dict(state[batchnorm.MOMENTS])
  # sow keeps a tuple of the values sown: one call per layer, so one (mean, var) each.
  return {
    '/'.join(path[:-1]): (mean, var + jnp.square(mean))
    for path, ((mean, var),) in flat.items()
  }


def union_moments(batch_moments: list[dict]) -> dict:
  """{path: (mean, var)} of the union of equal-sized batches from each batch's (mean, E[x^2])."""
  out = {}
  for path in batch_moments[0]:
    mean = np.mean(
      [np.asarray(m[path][0], np.float64) for m in batch_moments], 0
    )
    mean_sq = np.mean(
      [np.asarray(m[path][1], np.float64) for m in batch_moments], 0
    )
    out[path] = (
      mean.astype(np.float32),
      np.maximum(mean_sq - mean**2, 0).astype(np.float32),
    )
  return out


def replace_stats(batch_stats, moments: dict, keep: Callable[[str], bool]):
  """batch_stats with the mean and var of each BatchNorm path that `keep` selects replaced."""
  flat = dict(traverse_util.flatten_dict(batch_stats))
  for path, (mean, var) in moments.items():
    if keep(path):
      key = tuple(path.split('/'))
      flat[key + ('mean',)] = jnp.asarray(mean, flat[key + ('mean',)].dtype)
      flat[key + ('var',)] = jnp.asarray(var, flat[key + ('var',)].dtype)
  return traverse_util.unflatten_dict(flat)


def reestimate(
  p_moments,
  variables,
  batches: Iterable,
  keep: Callable[[str], bool],
  data_parallel,
) -> tuple[dict, dict]:
  """(batch_stats re-estimated over `batches`, a record for run_info.json).

  `p_moments` is `moments_step` compiled by `data_parallel` (data_parallel.DataParallel)
  with its batch the second arg; `variables` are params and batch_stats (host, or placed
  by it); `batches` are this process's rows of each global batch.
  """
  t0 = time.time()
  replicated = data_parallel.put(variables)
  pending = [
    p_moments(
      replicated,
      data_parallel.put_batch(batch),
      data_parallel.put(np.int32(i)),
    )
    for i, batch in enumerate(batches)
  ]
  if not pending:
    raise ValueError(
      're-estimating BatchNorm statistics needs at least one batch of images'
    )
  # One host sync for the whole pass; the moments are the global batch's on every device.
  fetched = data_parallel.get(pending)
  moments = union_moments(fetched)
  stats = replace_stats(
    data_parallel.get(replicated)['batch_stats'], moments, keep
  )
  layers = sorted(p for p in moments if keep(p))
  return stats, {
    'batches': len(fetched),
    'layers': len(layers),
    'first_layer': layers[0] if layers else None,
    'last_layer': layers[-1] if layers else None,
    'seconds': round(time.time() - t0, 2),
  }
