import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rotjax import preprocess


def _batch(size=16, n=4):
  return jnp.asarray(np.random.default_rng(0).integers(0, 256, (n, size, size, 3)), jnp.uint8)


def test_cifar_eval_is_normalisation_only():
  images = _batch()
  out = preprocess.preprocess(images, jax.random.key(0), train=False, style='cifar')
  mean = np.asarray(preprocess.CIFAR_MEAN) * 255
  std = np.asarray(preprocess.CIFAR_STD) * 255
  np.testing.assert_allclose(out, (np.asarray(images, np.float32) - mean) / std, atol=1e-5)


def test_cifar_train_crops_are_shifted_copies():
  images = _batch()
  out = preprocess.random_pad_crop(images, jax.random.key(3))
  assert out.shape == images.shape
  padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
  for b in range(4):
    found = any(np.array_equal(out[b], padded[b, y:y + 16, x:x + 16])
                for y in range(9) for x in range(9))
    assert found


def test_flip_is_horizontal():
  images = _batch(n=64)
  out = np.asarray(preprocess.random_flip(images, jax.random.key(0)))
  flipped = [np.array_equal(o, np.asarray(i)[:, ::-1]) for o, i in zip(out, images)]
  kept = [np.array_equal(o, np.asarray(i)) for o, i in zip(out, images)]
  assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_imagenet_style_sizes():
  images = _batch(size=37)
  train = preprocess.preprocess(images, jax.random.key(0), train=True, style='imagenet', image_size=32)
  evals = preprocess.preprocess(images, jax.random.key(0), train=False, style='imagenet', image_size=32)
  assert train.shape == evals.shape == (4, 32, 32, 3)
  assert np.isfinite(np.asarray(train)).all()


def test_unknown_style_is_an_error():
  with pytest.raises(ValueError, match="data.preprocess='vgg'"):
    preprocess.preprocess(_batch(), jax.random.key(0), train=True, style='vgg')
