"""Device side of the data: uint8 batches in, normalised float images out, under jit.

CIFAR style: random crop with 4-pixel zero padding and horizontal flip (train),
nothing but normalisation (eval). ImageNet style: random resized crop and flip
(train), centre crop (eval), from images stored at size / 0.875.

`isotropic=True` (the rotation pretext, rotation.geometry 'disc') keeps only
augmentation whose traces have no direction that would turn with the image: no
pad-crop (the straight edge of its zero fill would lie inside the disc, at 45 or
60 degrees to the axes for some directions only, and tell N = 8 or 6 apart), and
a square resized crop (an aspect-ratio stretch along the axes would turn too).

Random numbers come one key per example (`rng` of shape [B]; a single key is
split), so an example's crop and flip do not depend on its place in the batch.
"""

import jax
import jax.numpy as jnp

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STYLES = ('cifar', 'imagenet')


def normalize(images_BHWC, mean, std):
  mean = jnp.asarray(mean, jnp.float32) * 255
  std = jnp.asarray(std, jnp.float32) * 255
  return (images_BHWC.astype(jnp.float32) - mean) / std


def example_keys(rng, batch: int):
  """One key per example: `rng` itself if it holds `batch` keys already, else split from it."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.shape == (
    batch,
  ):
    return rng
  return jax.random.split(rng, batch)


def split_each(keys_B, num: int):
  """`num` key arrays [B] from one key per example: independent streams per example."""
  keys_BN = jax.vmap(lambda key: jax.random.split(key, num))(keys_B)
  return tuple(keys_BN[:, i] for i in range(num))


def _per_example(draw, rng, batch: int):
  """draw(key) for each example's key (rng: [B] keys, or one key to split)."""
  return jax.vmap(draw)(example_keys(rng, batch))


def random_flip(images_BHWC, rng):
  flip_B = _per_example(
    lambda key: jax.random.bernoulli(key, 0.5), rng, images_BHWC.shape[0]
  )
  return jnp.where(
    flip_B[:, None, None, None], images_BHWC[:, :, ::-1], images_BHWC
  )


def random_pad_crop(images_BHWC, rng, pad: int = 4):
  """Zero-pad by `pad` and take a random crop of the original size from each image."""
  batch, height, width, channels = images_BHWC.shape
  padded = jnp.pad(images_BHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets_B2 = _per_example(
    lambda key: jax.random.randint(key, (2,), 0, 2 * pad + 1), rng, batch
  )
  crop = lambda image, off: jax.lax.dynamic_slice(
    image, (off[0], off[1], 0), (height, width, channels)
  )
  return jax.vmap(crop)(padded, offsets_B2)


def random_resized_crop(
  images_BHWC, rng, size: int, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)
):
  """Inception-style crop: a random area fraction and aspect ratio, resized to `size`."""
  batch, height, width, _ = images_BHWC.shape
  area_rng, ratio_rng, pos_rng = split_each(example_keys(rng, batch), 3)
  area = jax.vmap(
    lambda key: jax.random.uniform(key, minval=scale[0], maxval=scale[1])
  )(area_rng)
  aspect = jnp.exp(
    jax.vmap(
      lambda key: jax.random.uniform(
        key, minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1])
      )
    )(ratio_rng)
  )
  crop_w = jnp.clip(jnp.sqrt(area * aspect) * width, 1, width)
  crop_h = jnp.clip(jnp.sqrt(area / aspect) * height, 1, height)
  pos = jax.vmap(lambda key: jax.random.uniform(key, (2,)))(pos_rng)
  top, left = pos[:, 0] * (height - crop_h), pos[:, 1] * (width - crop_w)

  def crop_one(image, top, left, crop_h, crop_w):
    scale_hw = jnp.stack([size / crop_h, size / crop_w])
    translation = -jnp.stack([top, left]) * scale_hw
    return jax.image.scale_and_translate(
      image.astype(jnp.float32),
      (size, size, image.shape[-1]),
      (0, 1),
      scale_hw,
      translation,
      method='linear',
      antialias=True,
    )

  return jax.vmap(crop_one)(images_BHWC, top, left, crop_h, crop_w)


def center_crop(images_BHWC, size: int):
  _, height, width, _ = images_BHWC.shape
  top, left = (height - size) // 2, (width - size) // 2
  return images_BHWC[:, top : top + size, left : left + size]


def preprocess(
  images_BHWC,
  rng,
  *,
  train: bool,
  style: str = 'cifar',
  image_size: int = 32,
  isotropic: bool = False,
):
  """uint8 [B, H, W, 3] -> float32 normalised [B, image_size, image_size, 3].

  `isotropic`: no augmentation that leaves a direction in the image (module doc).
  """
  if style not in STYLES:
    raise ValueError(f'data.preprocess={style!r} is unknown; allowed: {STYLES}')
  crop_rng, flip_rng = split_each(example_keys(rng, images_BHWC.shape[0]), 2)
  if style == 'cifar':
    if train:
      cropped = (
        images_BHWC if isotropic else random_pad_crop(images_BHWC, crop_rng)
      )
      images_BHWC = random_flip(cropped, flip_rng)
    return normalize(images_BHWC, CIFAR_MEAN, CIFAR_STD)
  if train:
    ratio = (1.0, 1.0) if isotropic else (3 / 4, 4 / 3)
    images_BHWC = random_flip(
      random_resized_crop(images_BHWC, crop_rng, image_size, ratio=ratio),
      flip_rng,
    )
  else:
    images_BHWC = center_crop(images_BHWC, image_size)
  return normalize(images_BHWC, IMAGENET_MEAN, IMAGENET_STD)
