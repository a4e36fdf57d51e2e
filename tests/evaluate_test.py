import json
import os

import numpy as np
import pytest

from rotjax import evaluate
from rotjax import train


@pytest.fixture(scope='module')
def runs(image_folder, tmp_path_factory):
  from conftest import tiny_config
  root = tmp_path_factory.mktemp('eval')
  train.train_and_evaluate(tiny_config('pretext', root / 'pre', image_folder, num_epochs=1))
  train.train_and_evaluate(tiny_config('supervised', root / 'sup', image_folder, num_epochs=1))
  return str(root / 'pre'), str(root / 'sup')


@pytest.mark.slow
def test_cli_probe_and_knn(runs):
  pre, _ = runs
  probe = evaluate.main(['probe', pre, '--layer=layer2', '--steps=50'])
  assert 0 <= probe['test_accuracy'] <= 1 and probe['feature_dim'] == 8
  assert json.load(open(os.path.join(pre, 'eval', 'probe_layer2.json')))['layer'] == 'layer2'
  # Re-estimated BatchNorm statistics: the other figure, in a file of its own.
  again = evaluate.main(['probe', pre, '--layer=layer2', '--steps=50', '--bn=reestimated'])
  assert again['bn'] == 'reestimated' and again['bn_reestimated']['layers'] > 0
  assert again['bn_reestimated']['augmentation'] == 'eval'
  saved = json.load(open(os.path.join(pre, 'eval', 'probe_layer2_bnreestimated.json')))
  assert saved['bn'] == 'reestimated' and probe['bn'] == 'running'
  knn = evaluate.main(['knn', pre, '--layer=pooled', '--k=3', '--max_images=12'])
  assert knn['train_images'] == 12 and 0 <= knn['val_accuracy'] <= 1


def test_cli_confusion_for_classifier_and_pretext(runs, tmp_path):
  pre, sup = runs
  result = evaluate.main(['confusion', sup, f'--out_dir={tmp_path}'])
  assert set(result['per_class_accuracy']) == {'circle', 'square', 'stripes'}
  assert np.sum(result['confusion']) == 24 and os.path.getsize(result['figure']) > 1000
  result = evaluate.main(['confusion', pre, f'--out_dir={tmp_path}', '--split=val'])
  assert set(result['per_class_accuracy']) == {'0deg', '90deg', '180deg', '270deg'}
  assert np.sum(result['confusion']) == 4 * 18
  # The same rotation accuracy the training loop logged on val.
  logged = json.loads(open(os.path.join(pre, 'metrics.jsonl')).readline())['val_accuracy']
  assert result['accuracy'] == pytest.approx(logged, abs=1e-6)


@pytest.mark.slow
def test_cli_reads_a_streamed_split_as_the_one_in_memory(runs, tmp_path):
  """Features and BatchNorm statistics a chunk at a time from a split streamed from its
  files: the same probe as from the split in memory."""
  pre, _ = runs
  args = ['--layer=layer2', '--steps=50', '--bn=reestimated', f'--out_dir={tmp_path}']
  memory = evaluate.main(['probe', pre, *args, '--loader=memory'])
  stream = evaluate.main(['probe', pre, *args, '--loader=stream'])
  for result in (memory, stream):
    result['bn_reestimated'].pop('seconds')
  assert stream == memory


@pytest.mark.slow
def test_cli_tsne_side_by_side(runs, tmp_path):
  pre, sup = runs
  out = str(tmp_path / 'tsne.png')
  result = evaluate.main(['tsne', f'pretext={pre}', f'supervised={sup}', 'random',
                          f'--out={out}', '--layer=layer3'])
  assert result['runs'] == ['pretext', 'supervised', 'random'] and os.path.getsize(out) > 1000
