"""Using a trained run from Python: `rotjax.load(workdir)` -> predict / features.

  import numpy as np, rotjax
  model = rotjax.load('runs/finetune')             # best checkpoint, else the latest
  probs = model.predict(images_uint8_BHWC)          # [B, num_classes], rows sum to 1
  feats = model.features(images_uint8_BHWC, layer='layer3')   # [B, channels]

No CLI and no dataset needed: the run's config.json and run_info.json say how
to build the model and preprocess images (eval style, as in training's eval). The
compute is this machine's (compute.resolve, once per load): a run trained with
model.conv or model.norm = onednn still predicts where oneDNN cannot run (a GPU, a CPU
without the dtype's kernels), since its weights do not depend on the kernels' code.
"""

import numpy as np

from rotjax import compute as compute_lib
from rotjax import model_factory
from rotjax import models
from rotjax import rundir
from rotjax.cpu import onednn_errors


class RotjaxModel:
  """A trained run's model and variables, with jitted eval-mode apply functions."""

  def __init__(
    self,
    config,
    variables,
    *,
    class_names,
    checkpoint_path,
    compute=None,
    batch_size=256,
  ):
    self.config = config
    self.variables = variables
    self.checkpoint_path = checkpoint_path
    self.num_classes = int(variables['params']['fc']['kernel'].shape[-1])
    self.class_names = tuple(class_names)
    if compute is None:  # random_init resolved it already
      compute = compute_lib.resolve(config.model, fallback=True)
    self.compute = compute
    self.module = model_factory.build_model(
      config, self.num_classes, self.compute
    )
    self.batch_size = batch_size
    self._jitted = {}

  def __repr__(self):
    return (
      f'RotjaxModel({self.config.model.name}, stage={self.config.stage}, '
      f'{self.num_classes} classes, {self.checkpoint_path})'
    )

  @property
  def image_size(self) -> int:
    return self.config.data.image_size

  @onednn_errors.named_errors()
  def predict(self, images) -> np.ndarray:
    """uint8 [H, W, 3] or [B, H, W, 3] -> class probabilities [B, num_classes]."""
    return self._run('probs', images)

  def logits(self, images) -> np.ndarray:
    """uint8 image(s) -> logits [B, num_classes]."""
    return self._run('logits', images)

  @onednn_errors.named_errors()
  def features(self, images, layer: str = 'layer3') -> np.ndarray:
    """uint8 image(s) -> global-average-pooled features of `layer` [B, channels]."""
    if layer not in models.LAYER_NAMES:
      raise ValueError(
        f'layer={layer!r} is unknown; allowed: {models.LAYER_NAMES}'
      )
    return self._run(layer, images)

  # -------------------------------------------------------------- internals

  def _apply_fn(self, output: str):
    if output not in self._jitted:
      import jax
      import jax.numpy as jnp
      from rotjax import preprocess

      def apply(variables, images_BHWC):
        images = preprocess.preprocess(
          images_BHWC,
          jax.random.key(0),
          train=False,
          style=self.config.data.preprocess,
          image_size=self.image_size,
        )
        logits, feats = self.module.apply(variables, images, train=False)
        if output == 'logits':
          return logits
        if output == 'probs':
          return jax.nn.softmax(logits, axis=-1)
        x = feats[output].astype(jnp.float32)
        return x if x.ndim == 2 else jnp.mean(x, axis=(1, 2))

      self._jitted[output] = jax.jit(apply)
    return self._jitted[output]

  def _run(self, output: str, images) -> np.ndarray:
    images = self.prepare_images(images)
    fn = self._apply_fn(output)
    outs = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start : start + self.batch_size]
      # Pad to a power of two: a handful of compiled shapes serves every batch size.
      padded = min(self.batch_size, 1 << (len(chunk) - 1).bit_length())
      if padded > len(chunk):
        chunk = np.concatenate(
          [
            chunk,
            np.zeros((padded - len(chunk), *chunk.shape[1:]), chunk.dtype),
          ]
        )
      outs.append(
        np.asarray(fn(self.variables, chunk))[
          : min(self.batch_size, len(images) - start)
        ]
      )
    return np.concatenate(outs)

  def prepare_images(self, images) -> np.ndarray:
    """Checks dtype/shape; resizes to the run's stored size like the data loader does."""
    from rotjax import image_files, input_pipeline

    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise TypeError(
        f'images must be uint8 (0-255, as decoded from files); got {images.dtype}. '
        'Convert with np.clip(x, 0, 255).astype(np.uint8) if they are 0-255 floats.'
      )
    if images.ndim == 3:
      images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape:
      raise ValueError(
        'images must be RGB [height, width, 3] or [batch, height, width, 3]; '
        f'got shape {images.shape}'
      )
    size = input_pipeline.storage_size(self.config.data)
    if images.shape[1:3] != (size, size):
      from PIL import Image

      images = np.stack(
        [image_files.fit_square(Image.fromarray(im), size) for im in images]
      )
    return images


def load(path: str, batch_size: int = 256) -> RotjaxModel:
  """A run's model from its workdir (best checkpoint, else latest) or WORKDIR/checkpoints/<step>."""
  from rotjax import compile_cache
  from rotjax import checkpoint

  workdir, step_dir = rundir.find_checkpoint(path)
  compile_cache.enable(
    'auto'
  )  # eval programs too (ROTJAX_COMPILE_CACHE moves or stops it)
  config = rundir.read_config(workdir)
  if config is None:
    raise FileNotFoundError(
      f'{workdir} has no {rundir.CONFIG}: cannot tell how to build its model'
    )
  class_names = _class_names(workdir, config)
  variables = checkpoint.restore_variables(step_dir)
  return RotjaxModel(
    config,
    variables,
    class_names=class_names,
    checkpoint_path=step_dir,
    batch_size=batch_size,
  )


def _class_names(workdir, config):
  if config.stage == 'pretext':
    num = config.rotation.num_rotations
    return tuple(f'{k * 360 // num}deg' for k in range(num))
  return tuple(rundir.read(workdir, rundir.RUN_INFO, {}).get('class_names', ()))


def random_init(config, num_classes: int, seed: int = 0) -> RotjaxModel:
  """A freshly initialised model of `config`'s architecture (the 'random' baseline)."""
  import jax
  from rotjax import compile_cache

  compile_cache.enable('auto')
  compute = compute_lib.resolve(config.model, fallback=True)
  module = model_factory.build_model(config, num_classes, compute)
  variables = jax.device_get(
    model_factory.init_variables(
      module, jax.random.key(seed), config.data.image_size
    )
  )
  variables = {
    'params': variables['params'],
    'batch_stats': variables.get('batch_stats', {}),
  }
  return RotjaxModel(
    config,
    variables,
    class_names=[str(i) for i in range(num_classes)],
    checkpoint_path='random-init',
    compute=compute,
  )
