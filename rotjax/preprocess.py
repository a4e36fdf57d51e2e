"""Device side of the data: uint8 batches in, normalised float images out, under jit.

CIFAR style: random crop with 4-pixel zero padding and horizontal flip (train),
nothing but normalisation (eval). ImageNet style: random resized crop and flip
(train), centre crop (eval), from images stored at size / 0.875.
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


def random_flip(images_BHWC, rng):
  flip_B = jax.random.bernoulli(rng, 0.5, (images_BHWC.shape[0],))
  return jnp.where(flip_B[:, None, None, None], images_BHWC[:, :, ::-1], images_BHWC)


def random_pad_crop(images_BHWC, rng, pad: int = 4):
  """Zero-pad by `pad` and take a random crop of the original size from each image."""
  batch, height, width, channels = images_BHWC.shape
  padded = jnp.pad(images_BHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets_B2 = jax.random.randint(rng, (batch, 2), 0, 2 * pad + 1)
  crop = lambda image, off: jax.lax.dynamic_slice(
      image, (off[0], off[1], 0), (height, width, channels))
  return jax.vmap(crop)(padded, offsets_B2)


def random_resized_crop(images_BHWC, rng, size: int, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)):
  """Inception-style crop: a random area fraction and aspect ratio, resized to `size`."""
  batch, height, width, _ = images_BHWC.shape
  area_rng, ratio_rng, pos_rng = jax.random.split(rng, 3)
  area = jax.random.uniform(area_rng, (batch,), minval=scale[0], maxval=scale[1])
  log_ratio = jax.random.uniform(ratio_rng, (batch,), minval=jnp.log(ratio[0]),
                                 maxval=jnp.log(ratio[1]))
  aspect = jnp.exp(log_ratio)
  crop_w = jnp.clip(jnp.sqrt(area * aspect) * width, 1, width)
  crop_h = jnp.clip(jnp.sqrt(area / aspect) * height, 1, height)
  pos = jax.random.uniform(pos_rng, (batch, 2))
  top, left = pos[:, 0] * (height - crop_h), pos[:, 1] * (width - crop_w)

  def crop_one(image, top, left, crop_h, crop_w):
    scale_hw = jnp.stack([size / crop_h, size / crop_w])
    translation = -jnp.stack([top, left]) * scale_hw
    return jax.image.scale_and_translate(
        image.astype(jnp.float32), (size, size, image.shape[-1]), (0, 1), scale_hw,
        translation, method='linear', antialias=True)
  return jax.vmap(crop_one)(images_BHWC, top, left, crop_h, crop_w)


def center_crop(images_BHWC, size: int):
  _, height, width, _ = images_BHWC.shape
  top, left = (height - size) // 2, (width - size) // 2
  return images_BHWC[:, top:top + size, left:left + size]


def preprocess(images_BHWC, rng, *, train: bool, style: str = 'cifar', image_size: int = 32):
  """uint8 [B, H, W, 3] -> float32 normalised [B, image_size, image_size, 3]."""
  if style not in STYLES:
    raise ValueError(f'data.preprocess={style!r} is unknown; allowed: {STYLES}')
  crop_rng, flip_rng = jax.random.split(rng)
  if style == 'cifar':
    if train:
      images_BHWC = random_flip(random_pad_crop(images_BHWC, crop_rng), flip_rng)
    return normalize(images_BHWC, CIFAR_MEAN, CIFAR_STD)
  if train:
    images_BHWC = random_flip(random_resized_crop(images_BHWC, crop_rng, image_size), flip_rng)
  else:
    images_BHWC = center_crop(images_BHWC, image_size)
  return normalize(images_BHWC, IMAGENET_MEAN, IMAGENET_STD)
