import json
import os

import numpy as np
import pytest

from rotjax import evaluate
from rotjax import train


def _clusters(n, num_classes, dim, seed, spread=0.3):
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(99).normal(size=(num_classes, dim))
  labels = rng.integers(0, num_classes, n)
  return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


def test_linear_probe_separates_clusters_and_picks_weight_decay_on_val():
  (tx, ty), (vx, vy), (sx, sy) = (_clusters(n, 3, 8, s) for n, s in ((90, 0), (30, 1), (30, 2)))
  result = evaluate.linear_probe(tx, ty, vx, vy, sx, sy, 3, steps=200)
  assert result['test_accuracy'] == 1.0 and result['val_accuracy'] == 1.0
  assert result['weight_decay'] in evaluate.PROBE_WEIGHT_DECAYS


def test_knn_matches_brute_force_cosine_vote():
  (tx, ty), (qx, qy) = _clusters(60, 3, 5, 0, spread=1.5), _clusters(40, 3, 5, 1, spread=1.5)
  k = 5
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  sims = unit(qx) @ unit(tx).T
  preds = []
  for row in sims:
    idx = np.argsort(-row)[:k]
    votes = np.bincount(ty[idx], minlength=3) + 1e-3 * np.bincount(ty[idx], row[idx], minlength=3)
    preds.append(np.argmax(votes))
  expected = np.mean(np.asarray(preds) == qy)
  assert evaluate.knn_accuracy(tx, ty, qx, qy, 3, k=k) == pytest.approx(expected)


def test_confusion_matrix_counts():
  counts = evaluate.confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
  assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


@pytest.fixture(scope='module')
def runs(image_folder, tmp_path_factory):
  from conftest import tiny_config
  root = tmp_path_factory.mktemp('eval')
  train.train_and_evaluate(tiny_config('pretext', root / 'pre', image_folder, num_epochs=1))
  train.train_and_evaluate(tiny_config('supervised', root / 'sup', image_folder, num_epochs=1))
  return str(root / 'pre'), str(root / 'sup')


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


def test_cli_tsne_side_by_side(runs, tmp_path):
  pre, sup = runs
  out = str(tmp_path / 'tsne.png')
  result = evaluate.main(['tsne', f'pretext={pre}', f'supervised={sup}', 'random',
                          f'--out={out}', '--layer=layer3'])
  assert result['runs'] == ['pretext', 'supervised', 'random'] and os.path.getsize(out) > 1000
