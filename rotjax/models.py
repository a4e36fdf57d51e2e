"""Flax ResNet18/34/50 with torchvision's parameter names.

Top-level subtrees are `conv1`, `bn1`, `layer1`..`layer4` and `fc`, with blocks
named `0`, `1`, ... inside each layer, so `layer4` means the same thing here as
in the reports. `__call__` returns `(logits, feats)` like big_vision's models;
`feats` holds every block's output map and the pooled vector.

BatchNorm layers inside the `frozen` subtrees (path prefixes) use their running
statistics in training too, and leave them as they are. train.py names subtrees
here only for `freeze_bn='running'` or `'reestimated'`: by default (the reports' PyTorch, whose
frozen layers stay in .train() mode) a frozen BatchNorm normalises with batch
statistics and updates its running ones like any other; the freeze mask alone
keeps its gamma and beta fixed.

`compute` (rotjax/compute.py) is the run's dtype and kernels, resolved once before the
model is built: each layer reads it, none decides. The default is float32 on XLA.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from rotjax import batchnorm
from rotjax.compute import Compute

STEMS = ('cifar', 'imagenet')


def is_frozen(path: str, frozen: Sequence[str]) -> bool:
  """Whether `path` lies in one of the `frozen` subtrees (path prefixes)."""
  return any(path == p or path.startswith(p + '/') for p in frozen)


class _Block(nn.Module):
  """Shared plumbing: a BatchNorm that knows whether it sits in a frozen subtree."""

  frozen: Sequence[str] = ()
  axis_name: str | None = None
  # Where per-device statistics (axis_name None) are pooled into the running ones.
  stats_axis_name: str | None = None
  compute: Compute = Compute()

  @property
  def dtype(self):
    return jnp.dtype(self.compute.dtype)

  def norm(self, name, train, relu=False):
    # Running statistics in eval and in `frozen` subtrees (freeze_bn='running'); batch
    # statistics synced over `axis_name` otherwise. `relu`: the ReLU after it (fused on oneDNN).
    frozen = not train or is_frozen('/'.join((*self.path, name)), self.frozen)
    return batchnorm.BatchNorm(
      use_running_average=frozen,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
      axis_name=None if frozen else self.axis_name,
      stats_axis_name=self.stats_axis_name,
      relu=relu,
      onednn=self.compute.batchnorm(),
      name=name,
    )

  def conv(self, features, kernel, strides=1, name=None):
    return nn.Conv(
      features,
      (kernel, kernel),
      strides=strides,
      padding=kernel // 2,
      use_bias=False,
      dtype=self.dtype,
      name=name,
      conv_general_dilated=self.compute.conv_general_dilated(),
      kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
    )


class BasicBlock(_Block):
  features: int = 64
  strides: int = 1
  expansion = 1

  @nn.compact
  def __call__(self, x, train):
    residual = x
    y = self.conv(self.features, 3, self.strides, name='conv1')(x)
    y = self.norm('bn1', train, relu=True)(y)
    y = self.conv(self.features, 3, name='conv2')(y)
    y = self.norm('bn2', train)(y)
    if residual.shape != y.shape:
      residual = self.conv(
        self.features, 1, self.strides, name='downsample_conv'
      )(residual)
      residual = self.norm('downsample_bn', train)(residual)
    return nn.relu(residual + y)


class Bottleneck(_Block):
  features: int = 64
  strides: int = 1
  expansion = 4

  @nn.compact
  def __call__(self, x, train):
    residual = x
    y = self.norm('bn1', train, relu=True)(
      self.conv(self.features, 1, name='conv1')(x)
    )
    y = self.conv(self.features, 3, self.strides, name='conv2')(y)
    y = self.norm('bn2', train, relu=True)(y)
    y = self.norm('bn3', train)(
      self.conv(self.features * 4, 1, name='conv3')(y)
    )
    if residual.shape != y.shape:
      residual = self.conv(
        self.features * 4, 1, self.strides, name='downsample_conv'
      )(residual)
      residual = self.norm('downsample_bn', train)(residual)
    return nn.relu(residual + y)


class ResLayer(_Block):
  """torchvision's `layerN`: a stack of blocks named '0', '1', ..."""

  block: Any = BasicBlock
  features: int = 64
  num_blocks: int = 2
  strides: int = 1

  @nn.compact
  def __call__(self, x, train):
    for i in range(self.num_blocks):
      x = self.block(
        features=self.features,
        strides=self.strides if i == 0 else 1,
        frozen=self.frozen,
        axis_name=self.axis_name,
        stats_axis_name=self.stats_axis_name,
        compute=self.compute,
        name=str(i),
      )(x, train)
    return x


class ResNet(_Block):
  block: Any = BasicBlock
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 10
  width: int = 64
  stem: str = 'cifar'

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.stem not in STEMS:
      raise ValueError(f'model.stem={self.stem!r} is unknown; allowed: {STEMS}')
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(
        f'ResNet expects images [batch, height, width, 3]; got shape {x.shape}'
      )
    x = x.astype(self.dtype)
    if self.stem == 'cifar':  # 32x32 inputs: 3x3 stride 1, no max-pool.
      x = self.conv(self.width, 3, name='conv1')(x)
      x = self.norm('bn1', train, relu=True)(x)
    else:  # ImageNet: 7x7 stride 2, then 3x3/2 max-pool.
      x = self.conv(self.width, 7, 2, name='conv1')(x)
      x = self.norm('bn1', train, relu=True)(x)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    feats = {'stem': x}
    for i, num_blocks in enumerate(self.stage_sizes):
      name = f'layer{i + 1}'
      x = ResLayer(
        block=self.block,
        features=self.width * 2**i,
        num_blocks=num_blocks,
        strides=1 if i == 0 else 2,
        frozen=self.frozen,
        axis_name=self.axis_name,
        stats_axis_name=self.stats_axis_name,
        compute=self.compute,
        name=name,
      )(x, train)
      feats[name] = x
    # Pooled and classified in float32: bf16 logits would round the loss and the argmax.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    feats['pooled'] = x
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name='fc')(x)
    return logits.astype(jnp.float32), feats


ResNet18 = functools.partial(ResNet, block=BasicBlock, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, block=BasicBlock, stage_sizes=(3, 4, 6, 3))
ResNet50 = functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 6, 3))
MODELS = {'resnet18': ResNet18, 'resnet34': ResNet34, 'resnet50': ResNet50}
LAYER_NAMES = ('stem', 'layer1', 'layer2', 'layer3', 'layer4', 'pooled')


def create_model(name: str, **kwargs) -> ResNet:
  """A ResNet by name ('resnet18' | 'resnet34' | 'resnet50')."""
  if name not in MODELS:
    raise ValueError(
      f'model.name={name!r} is unknown; allowed: {tuple(MODELS)}'
    )
  return MODELS[name](**kwargs)
