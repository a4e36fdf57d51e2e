"""Data-parallel plumbing for pmap: multi-host start-up, device selection, replicate / unreplicate.

Multi-host: every process runs the same program; pmap spans the devices of all
processes, each process feeds its local devices with its slice of every global
batch (process_slice), so the union over processes is the single-process batch.
"""
import logging

import jax
import numpy as np
from flax import jax_utils


def initialize_distributed(dist_config) -> bool:
  """jax.distributed.initialize from config.distributed; call before anything touches devices."""
  if not dist_config.get('coordinator_address') and not dist_config.get('auto'):
    return False
  if dist_config.get('cpu_collectives'):
    # Without a CPU collectives backend, cross-process pmap on CPU hosts cannot all-reduce.
    jax.config.update('jax_cpu_collectives_implementation', dist_config.cpu_collectives)
  if dist_config.get('auto'):
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(
        coordinator_address=dist_config.coordinator_address,
        num_processes=dist_config.num_processes or None,
        process_id=None if dist_config.process_id < 0 else dist_config.process_id)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def select_devices(num_devices: int = 0):
  """The first `num_devices` local devices (0 = all); every process's devices when multi-host."""
  if jax.process_count() > 1:
    if num_devices:
      raise ValueError(f'num_devices={num_devices}: with {jax.process_count()} processes every '
                       'device of every process is used; leave num_devices=0')
    return jax.devices()
  devices = jax.local_devices()
  if num_devices > len(devices):
    raise ValueError(f'num_devices={num_devices} but only {len(devices)} local devices exist')
  return devices[:num_devices] if num_devices else devices


def local(devices):
  """This process's share of `devices`."""
  return [d for d in devices if d.process_index == jax.process_index()]


def process_slice(batch: dict) -> dict:
  """This process's contiguous slice of a global batch (the whole batch with one process)."""
  count, index = jax.process_count(), jax.process_index()
  if count == 1:
    return batch
  def take(x):
    if x.shape[0] % count:
      raise ValueError(f'batch of {x.shape[0]} does not split over {count} processes')
    size = x.shape[0] // count
    return x[index * size:(index + 1) * size]
  return {k: take(np.asarray(v)) for k, v in batch.items()}


def shard_global_batch(batch: dict, devices) -> dict:
  """Global batch -> [local devices, per_device, ...]: this process's input to a pmap."""
  from rotjax import input_pipeline
  return input_pipeline.shard(process_slice(batch), len(local(devices)))


def replicate(tree, devices=None):
  """A copy of `tree` on each of this process's `devices`."""
  return jax_utils.replicate(tree, local(devices) if devices is not None else None)


def unreplicate(tree):
  """One copy of a replicated tree (stays on device).

  flax's unreplicate returns the [1, ...] array unchanged when pmap runs on a
  subset of one device, so it is done here from the first shard directly.
  """
  def one(x):
    if getattr(x, 'ndim', 0) == 0:
      return x
    data = x.addressable_shards[0].data
    return data[0] if data.ndim == x.ndim else data
  return jax.tree.map(one, tree)
