import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rotjax import rotation


def _images(batch=3, size=8, seed=0):
  return jnp.asarray(
    np.random.default_rng(seed).normal(size=(batch, size, size, 3)), jnp.float32
  )


def test_rotate_all_four_is_exact_rot90_with_labels():
  images = _images()
  out, labels = rotation.rotate_all(
    images, 4, jax.random.key(0), geometry='square'
  )
  assert out.shape == (12, 8, 8, 3)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(4), 3))
  for row in range(12):
    k, b = divmod(row, 3)
    np.testing.assert_array_equal(
      out[row], np.rot90(np.asarray(images[b]), k, axes=(0, 1))
    )


def test_rotate_random_four_matches_np_rot90():
  images = _images(batch=16)
  out, labels = rotation.rotate_random(
    images, 4, jax.random.key(1), geometry='square'
  )
  assert set(np.asarray(labels).tolist()) <= {0, 1, 2, 3}
  assert len(set(np.asarray(labels).tolist())) > 1
  for b in range(16):
    np.testing.assert_array_equal(
      out[b], np.rot90(np.asarray(images[b]), int(labels[b]), axes=(0, 1))
    )


def test_rot90_four_times_is_identity():
  images = _images()
  out = images
  for _ in range(4):
    out = rotation.rotate(
      out, jnp.ones(3, jnp.int32), 4, jax.random.key(0), geometry='square'
    )
  np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize('num', [4, 6, 8])
def test_every_direction_is_masked_and_resampled(num):
  images = _images(batch=2, size=16) + 5.0  # no zeros in the input
  out, labels = rotation.rotate_all(images, num, jax.random.key(2))
  assert out.shape == (2 * num, 16, 16, 3)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(num), 2))
  outside = np.asarray(rotation.circle_mask(16, 16))[..., 0] == 0
  assert outside.any()
  for row in range(2 * num):
    assert np.all(np.asarray(out[row])[outside] == 0), f'row {row} not masked'
  # 0 degrees went through the resampling too: not a copy of the input, but a blurred one.
  zero_deg = np.asarray(out[:2])
  inside = ~outside
  assert not np.allclose(zero_deg[:, inside], np.asarray(images)[:, inside])
  np.testing.assert_allclose(
    zero_deg[:, inside].mean(), np.asarray(images)[:, inside].mean(), rtol=0.05
  )


def test_interpolated_quarter_turn_agrees_with_rot90():
  """Direction 2 of 8 (90 degrees) is the same turn as rot90 (counter-clockwise)."""
  yy, xx = np.mgrid[:16, :16]
  smooth = np.stack(
    [np.sin(yy / 3.0), np.cos(xx / 4.0), np.sin((yy + xx) / 5.0)], -1
  )
  image = jnp.asarray(smooth[None], jnp.float32)
  mask = np.asarray(rotation.circle_mask(16, 16))
  zero = rotation.resample_rotate(image[0], 0.0, jnp.zeros(2))
  quarter = rotation.resample_rotate(image[0], jnp.pi / 2, jnp.zeros(2))
  np.testing.assert_allclose(
    quarter, np.rot90(np.asarray(zero), 1, axes=(0, 1)) * mask, atol=1e-4
  )
  np.testing.assert_allclose(zero, smooth * mask, atol=1e-5)


def test_unsupported_count_is_an_error():
  with pytest.raises(ValueError, match='num_rotations=5'):
    rotation.rotate_all(_images(), 5, jax.random.key(0))


def test_square_geometry_is_for_quarter_turns_only():
  with pytest.raises(
    ValueError, match="geometry='square' needs num_rotations=4"
  ):
    rotation.rotate_all(_images(), 8, jax.random.key(0), geometry='square')
  with pytest.raises(ValueError, match="geometry='round'"):
    rotation.check_geometry('round', 4)


@pytest.mark.parametrize('num', [4, 6, 8])
@pytest.mark.parametrize('size', [(16, 16), (32, 32), (15, 20)])
def test_kept_pixels_read_only_image_pixels(num, size):
  """Inside the mask an all-ones image stays all ones in every direction, at the extreme
  sub-pixel shifts too: no kept pixel's bilinear footprint reaches the fill outside the
  image, which would dim a rim whose shape turns with the angle."""
  ones = jnp.ones((*size, 1), jnp.float32)
  inside = np.asarray(rotation.circle_mask(*size))[..., 0] > 0
  turn = jax.jit(rotation.resample_rotate)
  for k in range(num):
    for shift in itertools.product((-0.5, 0.5), repeat=2):
      out = np.asarray(
        turn(ones, 2 * np.pi * k / num, jnp.asarray(shift, jnp.float32))
      )[..., 0]
      np.testing.assert_allclose(
        out[inside], 1.0, atol=1e-5, err_msg=f'k={k} shift={shift}'
      )
      assert np.all(out[~inside] == 0)


@pytest.mark.parametrize('num', [6, 8])
def test_an_example_draws_its_shift_from_its_own_key(num):
  """With one key per example, an image's rotated copies do not depend on its batch-mates
  or its place in the batch (what makes eval independent of the device count)."""
  images = _images(batch=4, size=16)
  keys = jax.random.split(jax.random.key(3), 4)
  whole, _ = rotation.rotate_all(images, num, keys)
  alone, _ = rotation.rotate_all(images[2:3], num, keys[2:3])
  np.testing.assert_allclose(
    np.asarray(whole).reshape(num, 4, 16, 16, 3)[:, 2],
    np.asarray(alone),
    atol=1e-6,
  )
