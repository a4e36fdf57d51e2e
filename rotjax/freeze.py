"""Where the freeze mask is built: which parameters a stage may train.

`trainable` names subtrees by path prefix ('layer4', 'fc', or deeper such as
'layer4/1'); ('all',) trains everything. The mask goes to optax.multi_transform
(optim.py), so frozen leaves get exactly zero updates: no momentum, no weight
decay. BatchNorm statistics are not parameters: by default (`freeze_bn='batch'`,
the reports' PyTorch semantics) frozen BatchNorm layers normalise with batch
statistics and keep updating their running statistics; with 'running' the
frozen prefixes go to the model, whose BatchNorm layers there use (and keep)
their running statistics; 'reestimated' too, after replacing those statistics
by the training images' own (run_state.reestimate_frozen_bn, bn_stats.py).
"""

from typing import Sequence

import flax
import jax

ALL = ('all',)


def _paths(params) -> list[str]:
  return ['/'.join(k) for k in flax.traverse_util.flatten_dict(params)]


def _matches(path: str, name: str) -> bool:
  return path == name or path.startswith(name + '/')


def check_trainable(params, trainable: Sequence[str]) -> None:
  """Every name must select at least one parameter."""
  if tuple(trainable) == ALL:
    return
  if not trainable:
    raise ValueError(
      'trainable=() would train nothing; use ("all",) or subtree names'
    )
  paths = _paths(params)
  top_level = sorted({p.split('/')[0] for p in paths})
  for name in trainable:
    if not any(_matches(p, name) for p in paths):
      raise ValueError(
        f'trainable name {name!r} matches no parameter; '
        f'top-level subtrees are {top_level}'
      )


def trainable_mask(params, trainable: Sequence[str]):
  """A pytree like `params` of 'trainable' / 'frozen' labels, for optax.multi_transform."""
  check_trainable(params, trainable)
  flat = flax.traverse_util.flatten_dict(params)
  labels = {}
  for key in flat:
    path = '/'.join(key)
    train = tuple(trainable) == ALL or any(_matches(path, n) for n in trainable)
    labels[key] = 'trainable' if train else 'frozen'
  return flax.traverse_util.unflatten_dict(labels)


def frozen_prefixes(params, trainable: Sequence[str]) -> tuple[str, ...]:
  """The smallest subtrees that hold only frozen parameters (the model's `frozen`, for
  freeze_bn='running')."""
  labels = flax.traverse_util.flatten_dict(trainable_mask(params, trainable))
  frozen = []

  def visit(prefix):
    below = [v for k, v in labels.items() if k[: len(prefix)] == prefix]
    if all(v == 'frozen' for v in below):
      frozen.append('/'.join(prefix))
      return
    children = sorted(
      {
        k[len(prefix)]
        for k in labels
        if k[: len(prefix)] == prefix and len(k) > len(prefix) + 1
      }
    )
    for child in children:
      visit(prefix + (child,))

  for top in sorted({k[0] for k in labels}):
    visit((top,))
  return tuple(frozen)


def count(params, mask) -> tuple[int, int]:
  """(trainable, total) parameter counts."""
  sizes = jax.tree.map(lambda p, m: (p.size, m == 'trainable'), params, mask)
  leaves = jax.tree.leaves(sizes, is_leaf=lambda x: isinstance(x, tuple))
  return sum(s for s, t in leaves if t), sum(s for s, _ in leaves)
