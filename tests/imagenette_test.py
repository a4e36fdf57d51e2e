"""ImageNet-style pipeline on a tiny generated folder of odd-sized, grayscale and RGBA images."""

import os

import numpy as np
import pytest
from PIL import Image

from configs import imagenette
from rotjax import input_pipeline
from rotjax import train


@pytest.fixture(scope='module')
def odd_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('odd_imagenette')
  rng = np.random.default_rng(0)
  modes = ['RGB', 'L', 'RGBA']
  for split, count in (('train', 12), ('val', 4)):
    for c, wnid in enumerate(('n01440764', 'n02102040')):
      os.makedirs(root / split / wnid)
      for i in range(count):
        h, w = rng.integers(30, 90, 2)
        mode = modes[i % 3]
        channels = {'RGB': 3, 'L': 1, 'RGBA': 4}[mode]
        pixels = rng.integers(0, 256, (h, w, channels)).astype(np.uint8)
        pixels[: h // 3] = 255 * c  # class signal
        image = Image.fromarray(
          pixels.squeeze(-1) if channels == 1 else pixels, mode
        )
        image.save(
          root / split / wnid / f'{i}.{"png" if mode == "RGBA" else "JPEG"}'
        )
  return str(root)


def _config(stage, workdir, source):
  config = imagenette.get_config(f'{stage},smoke')
  config.workdir = str(workdir)
  config.data.source = f'folder:{source}'
  config.data.cache_dir = ''
  config.data.max_train_images = 0
  config.data.max_eval_images = 0
  config.model.width = 4
  config.batch_size = 8
  config.eval_batch_size = 8
  return config


def test_folder_images_are_stored_square_rgb_with_crop_margin(
  odd_folder, tmp_path
):
  config = _config('pretext', tmp_path, odd_folder)
  ds = input_pipeline.load_dataset(
    config.data
  )  # test_split 'validation' finds the 'val' folder
  assert ds.train.images.shape[1:] == (37, 37, 3)  # round(32 / 0.875)
  assert len(ds.test) == 8 and ds.num_classes == 2


@pytest.mark.slow
@pytest.mark.parametrize('num_rotations', [4, 8])
def test_pretext_then_finetune_run_on_imagenet_style_images(
  odd_folder, tmp_path, num_rotations
):
  pre = _config('pretext', tmp_path / 'pre', odd_folder)
  pre.rotation.num_rotations = num_rotations
  pre.num_epochs = 1
  summary = train.train_and_evaluate(pre)
  assert summary['epochs'] == 1 and np.isfinite(summary['min_val_loss'])
  fine = _config('finetune', tmp_path / 'fine', odd_folder)
  fine.init_from = str(tmp_path / 'pre')
  fine.num_epochs = 1
  assert train.train_and_evaluate(fine)['epochs'] == 1


def test_preset_carries_the_report_settings():
  config = imagenette.get_config('finetune')
  assert (
    config.batch_size,
    config.optim.name,
    config.optim.learning_rate,
    config.label_smoothing,
  ) == (16, 'adam', 1e-3, 0.1)
  assert (
    config.model.stem == 'imagenet' and config.data.preprocess == 'imagenet'
  )
  assert config.trainable == ('layer4', 'fc')
  with pytest.raises(ValueError, match='stage must be one of'):
    imagenette.get_config('linear')
