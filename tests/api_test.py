import json
import os
import subprocess
import sys

import numpy as np
import pytest

import rotjax
from rotjax import input_pipeline
from rotjax import testing
from rotjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def run_dir(image_folder, tmp_path_factory):
  from conftest import tiny_config

  workdir = tmp_path_factory.mktemp('api') / 'sup'
  train.train_and_evaluate(
    tiny_config('supervised', workdir, image_folder, num_epochs=1)
  )
  return str(workdir)


@pytest.mark.slow
@pytest.mark.gpu
def test_load_in_fresh_process_predicts_probabilities(run_dir, image_folder):
  # The docs/python-api.md example, run as a new user would: a fresh interpreter, no CLI.
  script = f"""
import glob, json, numpy as np, rotjax
from PIL import Image
model = rotjax.load({run_dir!r})
files = sorted(glob.glob({image_folder!r} + '/test/*/*.png'))[:5]
images = np.stack([np.asarray(Image.open(f).convert('RGB')) for f in files])
probs = model.predict(images)
one = model.predict(images[0])
big = model.predict(np.asarray(Image.open(files[0]).convert('RGB').resize((40, 40))))
feats = model.features(images, layer='layer3')
print(json.dumps({{'probs': probs.tolist(), 'one': one.tolist(), 'feats': list(feats.shape),
                   'big': list(big.shape), 'classes': model.class_names}}))
"""
  env = testing.child_env(XLA_FLAGS='')
  out = subprocess.run(
    [sys.executable, '-c', script],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  probs = np.asarray(result['probs'])
  assert probs.shape == (5, 3)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(result['one'][0], probs[0], rtol=1e-4, atol=1e-6)
  assert result['feats'] == [5, 16]  # width 4 -> layer3 has 4 * 4 channels
  assert result['big'] == [1, 3]
  assert result['classes'] == ['circle', 'square', 'stripes']


def test_predict_matches_training_eval_accuracy(run_dir):
  model = rotjax.load(run_dir)
  config = model.config
  dataset = input_pipeline.load_dataset(config.data)
  probs = model.predict(dataset.val.images)
  accuracy = np.mean(probs.argmax(-1) == dataset.val.labels)
  info = json.load(open(os.path.join(run_dir, 'summary.json')))
  # Every run leaves its config and TensorBoard events beside metrics.jsonl.
  assert (
    json.load(open(os.path.join(run_dir, 'config.json')))['stage']
    == 'supervised'
  )
  assert [f for f in os.listdir(run_dir) if f.startswith('events.out.tfevents')]
  assert accuracy == pytest.approx(info['best_val_accuracy'], abs=1e-6)


def test_every_layer_and_a_step_dir(run_dir):
  step = sorted(os.listdir(os.path.join(run_dir, 'checkpoints')))[-1]
  model = rotjax.load(os.path.join(run_dir, 'checkpoints', step))
  images = np.zeros((2, 16, 16, 3), np.uint8)
  widths = {
    'stem': 4,
    'layer1': 4,
    'layer2': 8,
    'layer3': 16,
    'layer4': 32,
    'pooled': 32,
  }
  for layer, width in widths.items():
    assert model.features(images, layer=layer).shape == (2, width)


def test_clear_errors(run_dir, tmp_path):
  model = rotjax.load(run_dir)
  with pytest.raises(TypeError, match='uint8'):
    model.predict(np.zeros((16, 16, 3), np.float32))
  with pytest.raises(ValueError, match='height, width, 3'):
    model.predict(np.zeros((16, 16), np.uint8))
  with pytest.raises(ValueError, match="layer='fc7' is unknown"):
    model.features(np.zeros((16, 16, 3), np.uint8), layer='fc7')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    rotjax.load(str(tmp_path / 'nope'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='not a rotjax run'):
    rotjax.load(str(tmp_path / 'empty'))
  (tmp_path / 'empty' / 'config.json').write_text(
    json.dumps(model.config.to_dict())
  )
  with pytest.raises(FileNotFoundError, match='no complete checkpoint'):
    rotjax.load(str(tmp_path / 'empty'))
