"""The evaluation tools on arrays: linear probe, k-NN vote, confusion counts."""

import numpy as np
import pytest

from rotjax import probes


def _clusters(n, num_classes, dim, seed, spread=0.3):
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(99).normal(size=(num_classes, dim))
  labels = rng.integers(0, num_classes, n)
  return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(
    np.float32
  ), labels


def test_linear_probe_separates_clusters_and_picks_weight_decay_on_val():
  (tx, ty), (vx, vy), (sx, sy) = (
    _clusters(n, 3, 8, s) for n, s in ((90, 0), (30, 1), (30, 2))
  )
  result = probes.linear_probe(tx, ty, vx, vy, sx, sy, 3, steps=200)
  assert result['test_accuracy'] == 1.0 and result['val_accuracy'] == 1.0
  assert result['weight_decay'] in probes.PROBE_WEIGHT_DECAYS


def test_knn_matches_brute_force_cosine_vote():
  (tx, ty), (qx, qy) = (
    _clusters(60, 3, 5, 0, spread=1.5),
    _clusters(40, 3, 5, 1, spread=1.5),
  )
  k = 5
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  sims = unit(qx) @ unit(tx).T
  preds = []
  for row in sims:
    idx = np.argsort(-row)[:k]
    votes = np.bincount(ty[idx], minlength=3) + 1e-3 * np.bincount(
      ty[idx], row[idx], minlength=3
    )
    preds.append(np.argmax(votes))
  expected = np.mean(np.asarray(preds) == qy)
  assert probes.knn_accuracy(tx, ty, qx, qy, 3, k=k) == pytest.approx(expected)


def test_confusion_matrix_counts():
  counts = probes.confusion_matrix(
    np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3
  )
  assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
