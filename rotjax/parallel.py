"""Multi-host start-up, device selection, and pmap mode's replicate / unreplicate / shard
(data_parallel.py decides which mode runs a step).

Multi-host: every process runs the same program over the devices of all processes, and
each process feeds its local devices with its own data shard's part of every global
batch (input_pipeline.load_dataset / batch_plans.train_batches).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# The data-parallel axis: the mesh's (jit) or pmap's, named by every collective of a step
# and by the model's BatchNorm.
AXIS = 'data'


def initialize_distributed(dist_config) -> bool:
  """jax.distributed.initialize from config.distributed; call before anything touches devices."""
  if not dist_config.coordinator_address and not dist_config.auto:
    return False
  if dist_config.cpu_collectives:
    # Without a CPU collectives backend, cross-process pmap on CPU hosts cannot all-reduce.
    jax.config.update(
      'jax_cpu_collectives_implementation', dist_config.cpu_collectives
    )
  if dist_config.auto:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(
      coordinator_address=dist_config.coordinator_address,
      num_processes=dist_config.num_processes or None,
      process_id=None if dist_config.process_id < 0 else dist_config.process_id,
    )
  if jax.process_count() > 1:
    connect_all_devices()
  logging.info(
    'jax.distributed: process %d of %d, %d local / %d global devices',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def connect_all_devices() -> None:
  """One tiny all-reduce over every device of every process, right after start-up.

  The first collective over a set of devices sets up its communicator (a Gloo
  context on CPU), and that set-up gives up when the processes arrive more than
  30 s apart, as they do when one compiles the train step much later than the
  other. Here, just after initialize (itself a barrier), they arrive together;
  later collectives reuse the communicator and wait as long as they must.
  """
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
  ones = jax.make_array_from_process_local_data(
    NamedSharding(mesh, P(AXIS)), np.ones(jax.local_device_count(), np.float32)
  )
  total = jax.jit(
    jax.shard_map(
      lambda x: jax.lax.psum(x, AXIS),
      mesh=mesh,
      in_specs=P(AXIS),
      out_specs=P(),
    )
  )(ones)
  if float(np.asarray(total.addressable_data(0)).ravel()[0]) != len(devices):
    raise RuntimeError(f'all-reduce over {len(devices)} devices gave {total}')


def shutdown_distributed() -> None:
  """Leaves the jax.distributed cluster once this process's work is done.

  Explicit, after the last checkpoint commit, so that every process reaches the
  shut-down barrier from the same place instead of from interpreter exit.
  """
  if jax.process_count() > 1:
    jax.distributed.shutdown()


def select_devices(num_devices: int = 0):
  """The first `num_devices` local devices (0 = all); every process's devices when multi-host."""
  if jax.process_count() > 1:
    if num_devices:
      raise ValueError(
        f'num_devices={num_devices}: with {jax.process_count()} processes every '
        'device of every process is used; leave num_devices=0'
      )
    return jax.devices()
  devices = jax.local_devices()
  if num_devices > len(devices):
    raise ValueError(
      f'num_devices={num_devices} but only {len(devices)} local devices exist'
    )
  return devices[:num_devices] if num_devices else devices


def local(devices):
  """This process's share of `devices`."""
  return [d for d in devices if d.process_index == jax.process_index()]


def replicate(tree, devices=None, axis_name: str = AXIS):
  """A copy of `tree` on each of this process's `devices`, laid out as pmap lays out its outputs.

  pmap compiles once per input sharding, and its outputs live on a mesh whose axis
  is its axis_name. flax's jax_utils.replicate puts arrays on a mesh named
  '_device_put_sharded' instead, so the train state it made differed from the one
  step 1 returned and the step was compiled a second time at step 2.
  """
  devices = local(devices) if devices is not None else jax.local_devices()
  sharding = jax.sharding.NamedSharding(
    jax.sharding.Mesh(np.array(devices), (axis_name,)),
    jax.sharding.PartitionSpec(axis_name),
  )

  def put(x):
    if jnp.issubdtype(
      getattr(x, 'dtype', None), jax.dtypes.prng_key
    ):  # typed PRNG keys
      return jax.random.wrap_key_data(
        put(jax.random.key_data(x)), impl=jax.random.key_impl(x)
      )
    x = np.asarray(x)  # stacked on the host: one transfer, no per-shape compile
    return jax.device_put(
      np.broadcast_to(x, (len(devices), *x.shape)), sharding
    )

  return jax.tree.map(put, tree)


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


def shard(batch: dict, num_devices: int) -> dict:
  """[global, ...] -> [devices, per_device, ...], for pmap."""

  def reshape(x):
    if x.shape[0] % num_devices:
      raise ValueError(
        f'batch of {x.shape[0]} does not split over {num_devices} devices'
      )
    return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])

  return {k: reshape(v) for k, v in batch.items()}
