"""Where a step meets the devices: data parallel under `jax.jit` over a device mesh (the
default, config.parallel='auto' or 'jit') or under `jax.pmap` (parallel='pmap').

Both modes run the same per-device step (steps.py), whose collectives (gradient and
BatchNorm means, metric sums) name the mesh axis AXIS:
- jit: one program over a 1-D mesh ('data',) of every device of every process. The state
  is a global array replicated on the mesh (PartitionSpec()), each batch a global array
  split on its first axis (PartitionSpec('data')), made from each process's rows
  (jax.make_array_from_process_local_data); the step is jax.shard_map'ped over the mesh,
  so each device computes on its rows exactly as under pmap. No host reshape, no
  replicate/unreplicate, and checkpoints save the global state itself.
- pmap: the state stacked once per local device, each batch reshaped on the host to
  [local devices, per device, ...]; kept as a mode (JAX keeps pmap in maintenance).

Everything that places a step's inputs or reads its outputs goes through DataParallel,
so train.py, run_state.py (BatchNorm re-estimation), probes.py and scripts/benchmark.py
hold no device code of their own.
"""

import collections
import dataclasses
import functools
import os
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rotjax import parallel

AXIS = parallel.AXIS
MODES = ('auto', 'jit', 'pmap')


# What 'auto' means where it is set (e.g. ROTJAX_PARALLEL=pmap python -m pytest: the whole
# suite in pmap mode); unset, 'auto' is 'jit'.
ENV = 'ROTJAX_PARALLEL'


def resolve_mode(mode: str) -> str:
  """'auto' -> 'jit' (JAX's way since 0.8), or $ROTJAX_PARALLEL where set; 'jit' and
  'pmap' as they are."""
  if mode not in MODES:
    raise ValueError(f'parallel={mode!r} is unknown; allowed: {MODES}')
  if mode != 'auto':
    return mode
  chosen = os.environ.get(ENV, '') or 'jit'
  if chosen not in ('jit', 'pmap'):
    raise ValueError(f'{ENV}={chosen!r} is unknown; allowed: jit, pmap')
  return chosen


@dataclasses.dataclass(frozen=True)
class DataParallel:
  """How steps run on `devices` (all processes' in a multi-host run): `mode` jit or pmap."""

  mode: str
  devices: Sequence

  def __post_init__(self):
    object.__setattr__(self, 'mode', resolve_mode(self.mode))
    object.__setattr__(self, 'devices', tuple(self.devices))

  # Built once per DataParallel (a batch is placed every step).
  @functools.cached_property
  def local_devices(self) -> list:
    return parallel.local(self.devices)

  @functools.cached_property
  def mesh(self) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(self.devices), (AXIS,))

  @functools.cached_property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @functools.cached_property
  def split(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(AXIS))

  @functools.cached_property
  def _local_split(self) -> NamedSharding:
    """pmap's input layout: [local devices, ...] split over this process's devices."""
    local = jax.sharding.Mesh(np.array(self.local_devices), (AXIS,))
    return NamedSharding(local, P(AXIS))

  # ------------------------------------------------------------------ programs

  def compile(
    self, fn: Callable, *, batch_args: Sequence[int], donate: Sequence[int] = ()
  ) -> Callable:
    """`fn(*args)` (a per-device function whose collectives name AXIS) as one data-parallel
    program: the args at `batch_args` hold this process's rows of a global batch (placed
    by put_batch), the others are replicated (placed by put); every output is the same on
    every device (pmean'd or psum'd inside `fn`). `donate`: args whose buffers the
    outputs reuse (the train state)."""
    if self.mode == 'pmap':
      return jax.pmap(
        fn,
        axis_name=AXIS,
        devices=self.devices,
        donate_argnums=tuple(donate),
      )

    def program(*args):
      specs = tuple(
        P(AXIS) if i in batch_args else P() for i in range(len(args))
      )
      # check_vma=False: the outputs are replicated by the step's own pmean/psum, and
      # autodiff through BatchNorm's pmean (model.sync_bn) then transposes as under pmap.
      mapped = jax.shard_map(
        fn, mesh=self.mesh, in_specs=specs, out_specs=P(), check_vma=False
      )
      return mapped(*args)

    return jax.jit(program, donate_argnums=tuple(donate))

  # ------------------------------------------------------------------ placing

  def put(self, tree):
    """A host tree (or one already placed) replicated for the programs' non-batch args."""
    if self.mode == 'pmap':
      return parallel.replicate(tree, self.devices, AXIS)
    return jax.tree.map(self._put_replicated, tree)

  def _put_replicated(self, x):
    if isinstance(x, jax.Array) and jnp.issubdtype(
      x.dtype, jax.dtypes.prng_key
    ):
      data = self._put_replicated(jax.random.key_data(x))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and x.sharding == self.replicated:
      return x
    host = np.asarray(x)
    # From each process's (equal) host copy: works on one process and on many.
    return jax.make_array_from_callback(
      host.shape, self.replicated, lambda index: host[index]
    )

  def put_batch(self, batch: dict) -> dict:
    """This process's rows of a global batch -> the programs' batch args."""
    if self.mode == 'pmap':
      return jax.device_put(
        parallel.shard(batch, len(self.local_devices)), self._local_split
      )
    return {
      k: jax.make_array_from_process_local_data(self.split, np.asarray(v))
      for k, v in batch.items()
    }

  def prefetch(self, batches: Iterable[dict], size: int = 2) -> Iterator[dict]:
    """`batches` placed `size` ahead of the step that takes them (the transfer overlaps the
    step running on the devices)."""
    queue = collections.deque()
    batches = iter(batches)
    while True:
      while len(queue) < size:
        batch = next(batches, None)
        if batch is None:
          break
        queue.append(self.put_batch(batch))
      if not queue:
        return
      yield queue.popleft()

  # ------------------------------------------------------------------ reading

  def get(self, tree):
    """Host (numpy) values of a program's outputs or of a placed tree: one copy each."""
    if self.mode == 'pmap':
      return jax.device_get(parallel.unreplicate(tree))
    return jax.device_get(jax.tree.map(_one_replica, tree))

  def to_save(self, state):
    """What a checkpoint writes of a placed state: under jit the global arrays themselves
    (Orbax writes a replicated array once, from every process's call); under pmap one host
    copy of the stacked state."""
    return state if self.mode == 'jit' else self.get(state)

  def restore_target(self, host_state):
    """The tree Orbax restores onto: under jit placed (so a checkpoint comes back as global
    arrays on the mesh, without a host round trip); under pmap the host state, which
    put() then replicates."""
    return self.put(host_state) if self.mode == 'jit' else host_state

  def describe(self) -> str:
    processes = len({d.process_index for d in self.devices})
    where = f'{len(self.devices)} devices' + (
      f' of {processes} processes' if processes > 1 else ''
    )
    if self.mode == 'jit':
      return f"jit over a mesh ('{AXIS}',) of {where}"
    return f'pmap over {where}'


def _one_replica(x):
  """A replicated global array's local copy (a multi-process one is not fully addressable)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x.addressable_data(0)
  return x
