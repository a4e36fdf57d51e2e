"""Where rotation happens: the pretext task's inputs and labels, in pure jnp.

Direction k of N is a counter-clockwise rotation by k * 360 / N degrees and has
label k. N = 4 uses exact `rot90`. N = 6 or 8 needs an interpolating rotation,
and then *every* direction, 0 degrees included, goes through the same bilinear
resampling (with a random sub-pixel shift, so the amount of interpolation blur
does not depend on the angle) and the same inscribed-circle mask. Otherwise the
black corners or the sharpness of the 0/90/180/270 degree copies alone would
give the angle away (big_vision's ops_image.py records such a shortcut).
"""
import jax
import jax.numpy as jnp

SUPPORTED = (4, 6, 8)


def check_num_rotations(num_rotations: int) -> None:
  if num_rotations not in SUPPORTED:
    raise ValueError(
        f'rotation.num_rotations={num_rotations} is not supported; allowed: {SUPPORTED}')


def circle_mask(height: int, width: int) -> jnp.ndarray:
  """1 inside the inscribed circle of an H x W image, 0 outside; shape [H, W, 1]."""
  y = jnp.arange(height) - (height - 1) / 2
  x = jnp.arange(width) - (width - 1) / 2
  radius = min(height, width) / 2
  inside = (y[:, None] ** 2 + x[None, :] ** 2) <= radius ** 2
  return inside[..., None].astype(jnp.float32)


def resample_rotate(image_HWC, angle, shift):
  """Bilinear rotation of one image by `angle` radians (counter-clockwise) about its centre.

  `shift` ([2], in pixels) moves the sampling grid by a sub-pixel amount, so
  that every output pixel is interpolated, whatever the angle. Output is float32
  and masked to the inscribed circle.
  """
  height, width, _ = image_HWC.shape
  cy, cx = (height - 1) / 2, (width - 1) / 2
  yy, xx = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing='ij')
  yy, xx = yy - cy + shift[0], xx - cx + shift[1]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # Inverse map: output pixel (y, x) reads the input at the point rotated by -angle.
  # Rows point down, so this is counter-clockwise on screen, the way np.rot90 turns.
  src_y = cos * yy + sin * xx + cy
  src_x = -sin * yy + cos * xx + cx
  image = image_HWC.astype(jnp.float32)
  sample = lambda channel: jax.scipy.ndimage.map_coordinates(
      channel, [src_y, src_x], order=1, mode='constant', cval=0.0)
  rotated = jax.vmap(sample, in_axes=2, out_axes=2)(image)
  return rotated * circle_mask(height, width)


def rotate(images_BHWC, k_B, num_rotations: int, rng):
  """Rotates image b by direction k_B[b] of `num_rotations`. Returns float32 images."""
  check_num_rotations(num_rotations)
  if num_rotations == 4:
    # Exact: all four quarter turns, then pick one per image (a select, no gather).
    candidates = jnp.stack([jnp.rot90(images_BHWC, k, axes=(1, 2)) for k in range(4)])
    onehot = jax.nn.one_hot(k_B, 4, dtype=jnp.bool_)
    picked = jnp.where(onehot.T[:, :, None, None, None], candidates, 0).sum(0)
    return picked.astype(jnp.float32)
  angles_B = k_B.astype(jnp.float32) * (2 * jnp.pi / num_rotations)
  shifts_B2 = jax.random.uniform(rng, (images_BHWC.shape[0], 2), minval=-0.5, maxval=0.5)
  return jax.vmap(resample_rotate)(images_BHWC, angles_B, shifts_B2)


def rotate_all(images_BHWC, num_rotations: int, rng):
  """All N directions of each image, as RotNet trains: ([N*B, H, W, C], labels [N*B]).

  Rows are direction-major: rows [k*B, (k+1)*B) hold direction k of the batch.
  """
  check_num_rotations(num_rotations)
  batch = images_BHWC.shape[0]
  labels_NB = jnp.repeat(jnp.arange(num_rotations), batch)
  if num_rotations == 4:
    rotated = [jnp.rot90(images_BHWC, k, axes=(1, 2)) for k in range(4)]
    return jnp.concatenate(rotated).astype(jnp.float32), labels_NB
  images_NBHWC = jnp.tile(images_BHWC, (num_rotations, 1, 1, 1))
  return rotate(images_NBHWC, labels_NB, num_rotations, rng), labels_NB


def rotate_random(images_BHWC, num_rotations: int, rng):
  """One random direction per image: ([B, H, W, C], labels [B])."""
  label_rng, shift_rng = jax.random.split(rng)
  labels_B = jax.random.randint(label_rng, (images_BHWC.shape[0],), 0, num_rotations)
  return rotate(images_BHWC, labels_B, num_rotations, shift_rng), labels_B
