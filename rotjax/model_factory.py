"""A run's model from its config: which ResNet, how many outputs, its first variables.

Training (train.py), the config checks and `rotjax.load` (api.py) all build models here,
with the run's Compute (compute.resolve, decided once per start or load).
"""

import functools

import jax
import jax.numpy as jnp

from rotjax import models
from rotjax import parallel
from rotjax.compute import Compute


def num_outputs(config, dataset) -> int:
  """The head's size: the pretext predicts one of its rotations, the others a class."""
  return (
    config.rotation.num_rotations
    if config.stage == 'pretext'
    else dataset.num_classes
  )


def build_model(
  config, num_classes: int, compute: Compute, frozen=()
) -> models.ResNet:
  """config.model's ResNet; BatchNorm statistics synced over the data-parallel axis
  (parallel.AXIS) where model.sync_bn (pooled into the running ones over it either way)."""
  return models.create_model(
    config.model.name,
    num_classes=num_classes,
    width=config.model.width,
    stem=config.model.stem,
    compute=compute,
    frozen=frozen,
    axis_name=parallel.AXIS if config.model.sync_bn else None,
    stats_axis_name=parallel.AXIS,
  )


def init_variables(model, rng, image_size: int):
  """The model's variables for square RGB images of `image_size`, as one program."""
  return jax.jit(functools.partial(model.init, train=False))(
    rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  )
