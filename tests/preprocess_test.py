import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rotjax import preprocess


def _batch(size=16, n=4):
  return jnp.asarray(
    np.random.default_rng(0).integers(0, 256, (n, size, size, 3)), jnp.uint8
  )


def test_cifar_eval_is_normalisation_only():
  images = _batch()
  out = preprocess.preprocess(
    images, jax.random.key(0), train=False, style='cifar'
  )
  mean = np.asarray(preprocess.CIFAR_MEAN) * 255
  std = np.asarray(preprocess.CIFAR_STD) * 255
  np.testing.assert_allclose(
    out, (np.asarray(images, np.float32) - mean) / std, atol=1e-5
  )


def test_cifar_train_crops_are_shifted_copies():
  images = _batch()
  out = preprocess.random_pad_crop(images, jax.random.key(3))
  assert out.shape == images.shape
  padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
  for b in range(4):
    found = any(
      np.array_equal(out[b], padded[b, y : y + 16, x : x + 16])
      for y in range(9)
      for x in range(9)
    )
    assert found


def test_flip_is_horizontal():
  images = _batch(n=64)
  out = np.asarray(preprocess.random_flip(images, jax.random.key(0)))
  flipped = [
    np.array_equal(o, np.asarray(i)[:, ::-1]) for o, i in zip(out, images)
  ]
  kept = [np.array_equal(o, np.asarray(i)) for o, i in zip(out, images)]
  assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_imagenet_style_sizes():
  images = _batch(size=37)
  train = preprocess.preprocess(
    images, jax.random.key(0), train=True, style='imagenet', image_size=32
  )
  evals = preprocess.preprocess(
    images, jax.random.key(0), train=False, style='imagenet', image_size=32
  )
  assert train.shape == evals.shape == (4, 32, 32, 3)
  assert np.isfinite(np.asarray(train)).all()


def test_unknown_style_is_an_error():
  with pytest.raises(ValueError, match="data.preprocess='vgg'"):
    preprocess.preprocess(_batch(), jax.random.key(0), train=True, style='vgg')


def test_pretext_augmentation_leaves_no_fill_and_no_stretch():
  """isotropic=True (the 'disc' pretext): CIFAR style only flips (no pad-crop fill), and
  ImageNet style crops squares, so a ramp rising equally along both axes still does."""
  images = _batch(n=16)
  out = np.asarray(
    preprocess.preprocess(
      images, jax.random.key(0), train=True, style='cifar', isotropic=True
    )
  )
  plain = np.asarray(
    preprocess.normalize(images, preprocess.CIFAR_MEAN, preprocess.CIFAR_STD)
  )
  assert all(
    np.allclose(o, p) or np.allclose(o, p[:, ::-1]) for o, p in zip(out, plain)
  )
  yy, xx = np.mgrid[:37, :37]
  ramp = np.broadcast_to((60 + 2 * (yy + xx))[None, ..., None], (8, 37, 37, 3))
  out = np.asarray(
    preprocess.preprocess(
      jnp.asarray(ramp, jnp.uint8),
      jax.random.key(1),
      train=True,
      style='imagenet',
      image_size=32,
      isotropic=True,
    )
  )
  rise_y = np.abs(np.diff(out, axis=1)[:, 4:-4, 4:-4]).mean((1, 2, 3))
  rise_x = np.abs(np.diff(out, axis=2)[:, 4:-4, 4:-4]).mean((1, 2, 3))
  np.testing.assert_allclose(rise_y, rise_x, rtol=0.02)


@pytest.mark.parametrize('style', ['cifar', 'imagenet'])
def test_an_example_is_augmented_from_its_own_key_alone(style):
  """One key per example: its crop and flip do not depend on its batch-mates or its place."""
  images = _batch(size=18, n=6)
  keys = jax.random.split(jax.random.key(5), 6)
  whole = preprocess.preprocess(
    images, keys, train=True, style=style, image_size=16
  )
  alone = preprocess.preprocess(
    images[3:4], keys[3:4], train=True, style=style, image_size=16
  )
  np.testing.assert_allclose(whole[3], alone[0], atol=1e-5)
