"""Data-parallel plumbing for pmap: device selection, replicate / unreplicate."""
import jax
from flax import jax_utils


def select_devices(num_devices: int = 0):
  """The first `num_devices` local devices (0 = all)."""
  devices = jax.local_devices()
  if num_devices > len(devices):
    raise ValueError(f'num_devices={num_devices} but only {len(devices)} local devices exist')
  return devices[:num_devices] if num_devices else devices


replicate = jax_utils.replicate


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
