"""Where rotation happens: the pretext task's inputs and labels, in pure jnp.

Direction k of N is a counter-clockwise rotation by k * 360 / N degrees and has
label k. Nothing but the image's content may tell the directions apart, so by
default (geometry 'disc') *every* direction, 0 degrees included and N = 4 too,
goes through the same bilinear resampling, with a random sub-pixel shift (so the
amount of interpolation blur does not depend on the angle), and is cut to the
same disc: the largest one whose every pixel reads only image pixels, for every
angle and shift. Black corners, a rim half-blended with the fill, or the
sharpness of the 0/90/180/270 degree copies would otherwise give the angle away
(big_vision's ops_image.py records such a shortcut). All N then see the same
pixels, so their accuracies compare. Geometry 'square' (N = 4 only) is RotNet's
and the reports' exact rot90 of the whole square. What no resampling hides at 45
or 60 degrees is the pixel grid itself, in the finest texture (docs/design.md).

Random numbers come one key per example (`rng` of shape [B]), so that an example's
shift does not depend on where in which device's batch it sits (steps.make_prepare_fn).
"""

import math

import jax
import jax.numpy as jnp

from rotjax import preprocess

SUPPORTED = (4, 6, 8)
GEOMETRIES = ('disc', 'square')
MAX_SHIFT = 0.5  # the sub-pixel shift, per axis, in pixels


def check_num_rotations(num_rotations: int) -> None:
  if num_rotations not in SUPPORTED:
    raise ValueError(
      f'rotation.num_rotations={num_rotations} is not supported; allowed: {SUPPORTED}'
    )


def check_geometry(geometry: str, num_rotations: int) -> None:
  if geometry not in GEOMETRIES:
    raise ValueError(
      f'rotation.geometry={geometry!r} is unknown; allowed: {GEOMETRIES}'
    )
  if geometry == 'square' and num_rotations != 4:
    raise ValueError(
      f"rotation.geometry='square' needs num_rotations=4 (got {num_rotations}): a square "
      "turned by other angles has corners that give the angle away; use geometry='disc'"
    )


def disc_radius(height: int, width: int) -> float:
  """Radius (pixels, from the image centre) of the disc that every direction keeps.

  Output pixel p (from the centre) reads the input at p + shift turned about the
  centre, at most |p| + sqrt(2) * MAX_SHIFT from it whatever the angle, and its
  bilinear footprint lies inside the image while that is <= (side - 1) / 2.
  """
  return (min(height, width) - 1) / 2 - math.sqrt(2) * MAX_SHIFT


def circle_mask(height: int, width: int) -> jnp.ndarray:
  """1 on the pixels every direction keeps (disc_radius), 0 elsewhere; shape [H, W, 1]."""
  y = jnp.arange(height) - (height - 1) / 2
  x = jnp.arange(width) - (width - 1) / 2
  inside = (y[:, None] ** 2 + x[None, :] ** 2) <= disc_radius(
    height, width
  ) ** 2
  return inside[..., None].astype(jnp.float32)


def resample_rotate(image_HWC, angle, shift):
  """Bilinear rotation of one image by `angle` radians (counter-clockwise) about its centre.

  `shift` ([2], in pixels, each within +-MAX_SHIFT) moves the sampling grid by a
  sub-pixel amount, so that every output pixel is interpolated, whatever the
  angle. Output is float32 and masked to circle_mask, inside which every pixel is
  a weighted mean of four image pixels (no fill value).
  """
  height, width, _ = image_HWC.shape
  cy, cx = (height - 1) / 2, (width - 1) / 2
  yy, xx = jnp.meshgrid(
    jnp.arange(height, dtype=jnp.float32),
    jnp.arange(width, dtype=jnp.float32),
    indexing='ij',
  )
  yy, xx = yy - cy + shift[0], xx - cx + shift[1]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # Inverse map: output pixel (y, x) reads the input at the point rotated by -angle.
  # Rows point down, so this is counter-clockwise on screen, the way np.rot90 turns.
  src_y = cos * yy + sin * xx + cy
  src_x = -sin * yy + cos * xx + cx
  y0, x0 = jnp.floor(src_y), jnp.floor(src_x)
  wy, wx = (src_y - y0)[..., None], (src_x - x0)[..., None]
  # Clipping only moves reads of pixels outside the disc (masked below) and of a
  # neighbour whose weight is 0 at the image's last row or column.
  row = lambda y: jnp.clip(y, 0, height - 1).astype(jnp.int32)
  col = lambda x: jnp.clip(x, 0, width - 1).astype(jnp.int32)
  image = image_HWC.astype(jnp.float32)
  top = image[row(y0), col(x0)] * (1 - wx) + image[row(y0), col(x0 + 1)] * wx
  bottom = (
    image[row(y0 + 1), col(x0)] * (1 - wx)
    + image[row(y0 + 1), col(x0 + 1)] * wx
  )
  return (top * (1 - wy) + bottom * wy) * circle_mask(height, width)


def _shifts(keys_B):
  return jax.vmap(
    lambda key: jax.random.uniform(
      key, (2,), minval=-MAX_SHIFT, maxval=MAX_SHIFT
    )
  )(keys_B)


def rotate(images_BHWC, k_B, num_rotations: int, rng, geometry: str = 'disc'):
  """Rotates image b by direction k_B[b] of `num_rotations`. Returns float32 images.

  `rng`: one key per image (its shift), or one key to split.
  """
  check_num_rotations(num_rotations)
  check_geometry(geometry, num_rotations)
  if geometry == 'square':
    # Exact: all four quarter turns, then pick one per image (a select, no gather).
    candidates = jnp.stack(
      [jnp.rot90(images_BHWC, k, axes=(1, 2)) for k in range(4)]
    )
    onehot = jax.nn.one_hot(k_B, 4, dtype=jnp.bool_)
    picked = jnp.where(onehot.T[:, :, None, None, None], candidates, 0).sum(0)
    return picked.astype(jnp.float32)
  angles_B = k_B.astype(jnp.float32) * (2 * jnp.pi / num_rotations)
  shifts_B2 = _shifts(preprocess.example_keys(rng, images_BHWC.shape[0]))
  return jax.vmap(resample_rotate)(images_BHWC, angles_B, shifts_B2)


def rotate_all(images_BHWC, num_rotations: int, rng, geometry: str = 'disc'):
  """All N directions of each image, as RotNet trains: ([N*B, H, W, C], labels [N*B]).

  Rows are direction-major: rows [k*B, (k+1)*B) hold direction k of the batch.
  `rng`: one key per image (direction k of image b draws from fold_in(key_b, k)),
  or one key to split.
  """
  check_num_rotations(num_rotations)
  check_geometry(geometry, num_rotations)
  batch = images_BHWC.shape[0]
  labels_NB = jnp.repeat(jnp.arange(num_rotations), batch)
  if geometry == 'square':
    rotated = [jnp.rot90(images_BHWC, k, axes=(1, 2)) for k in range(4)]
    return jnp.concatenate(rotated).astype(jnp.float32), labels_NB
  keys_B = preprocess.example_keys(rng, batch)
  keys_NB = jnp.concatenate(
    [
      jax.vmap(jax.random.fold_in, (0, None))(keys_B, k)
      for k in range(num_rotations)
    ]
  )
  images_NBHWC = jnp.tile(images_BHWC, (num_rotations, 1, 1, 1))
  return rotate(
    images_NBHWC, labels_NB, num_rotations, keys_NB, geometry
  ), labels_NB


def rotate_random(images_BHWC, num_rotations: int, rng, geometry: str = 'disc'):
  """One random direction per image: ([B, H, W, C], labels [B]). `rng`: as rotate_all."""
  keys_B2 = jax.vmap(jax.random.split)(
    preprocess.example_keys(rng, images_BHWC.shape[0])
  )
  labels_B = jax.vmap(
    lambda key: jax.random.randint(key, (), 0, num_rotations)
  )(keys_B2[:, 0])
  return rotate(
    images_BHWC, labels_B, num_rotations, keys_B2[:, 1], geometry
  ), labels_B
