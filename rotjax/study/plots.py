"""Figures (matplotlib, Agg): a study's, drawn from metrics.jsonl rows and summaries, and
`rotjax.evaluate`'s confusion matrices and t-SNE scatters."""

import math

import matplotlib

matplotlib.use('Agg')  # Files only: no display on the training machines.
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402

CURVES = (('loss', 'loss (cross-entropy)'), ('accuracy', 'accuracy (%)'))


def _by_epoch(histories: list[list[dict]], key: str):
  """(epochs, mean, low, high) over seeds of one metric, on the epochs every seed has."""
  rows = [
    {r['epoch']: r[key] for r in h if r.get(key) is not None} for h in histories
  ]
  epochs = sorted(set.intersection(*(set(r) for r in rows))) if rows else []
  values = np.array([[r[e] for e in epochs] for r in rows], dtype=float)
  if key.endswith('accuracy'):
    values = values * 100
  return epochs, values.mean(0), values.min(0), values.max(0)


def learning_curves(histories: list[list[dict]], title: str, path: str) -> None:
  """Train and val loss and accuracy by epoch: mean over seeds, band from min to max."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, (metric, label) in zip(axes, CURVES):
    for split, color in (('train', 'tab:blue'), ('val', 'tab:orange')):
      epochs, mean, low, high = _by_epoch(histories, f'{split}_{metric}')
      if not epochs:
        continue
      ax.plot(
        epochs,
        mean,
        marker='o',
        color=color,
        label=f'{split} (mean of {len(histories)})',
      )
      if len(histories) > 1:
        ax.fill_between(
          epochs, low, high, color=color, alpha=0.2, label=f'{split} min-max'
        )
    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def stage_bars(cells: dict, stage_labels: dict, title: str, path: str) -> None:
  """Grouped bars: x = stage, one bar per group (e.g. model); cells[group][stage] = (mean, std, n)."""
  groups = list(cells)
  stages = sorted({s for g in groups for s in cells[g]})
  width = 0.8 / max(len(groups), 1)
  fig, ax = plt.subplots(
    figsize=(max(7, 1.6 * len(stages) * max(1, len(groups) / 2)), 4.5)
  )
  for i, group in enumerate(groups):
    x = [
      stages.index(s) + (i - (len(groups) - 1) / 2) * width
      for s in cells[group]
    ]
    means = [cells[group][s][0] * 100 for s in cells[group]]
    stds = [cells[group][s][1] * 100 for s in cells[group]]
    bars = ax.bar(x, means, width, yerr=stds, capsize=4, label=str(group))
    ax.bar_label(bars, fmt='%.1f', fontsize=8, padding=2)
  ax.set_xticks(
    range(len(stages)), [stage_labels[s] for s in stages], fontsize=8
  )
  ax.set_ylabel('test accuracy at best-val epoch (%)')
  ax.set_ylim(0, 105)
  ax.set_title(title)
  ax.legend(title='error bars: std over seeds', fontsize=8)
  ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def crossovers(xs, a, b) -> list[float]:
  """x values where curve a - b changes sign, interpolated linearly in log x (ties alone are none)."""
  d = np.asarray(a, float) - np.asarray(b, float)
  nonzero = [i for i in range(len(d)) if d[i] != 0]
  found = []
  for j, k in zip(nonzero, nonzero[1:]):
    if d[j] * d[k] > 0:
      continue
    if k > j + 1:  # Equal at the points between: the curves meet there.
      found.append(float(xs[j + 1]))
      continue
    t = d[j] / (d[j] - d[k])
    found.append(
      float(math.exp(math.log(xs[j]) + t * (math.log(xs[k]) - math.log(xs[j]))))
    )
  return found


def samples_per_class(curves: dict, title: str, path: str) -> dict:
  """Best val accuracy and min val loss against labels per class (log x); returns crossovers."""
  # curves[label] = {'x', 'xlabels', 'acc': (means, stds), 'loss': (means, stds)}, all on one x;
  # the first two curves are compared.
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  found = {}
  for ax, key, ylabel in (
    (axes[0], 'acc', 'best validation accuracy (%)'),
    (axes[1], 'loss', 'minimum validation loss'),
  ):
    scale = 100 if key == 'acc' else 1
    for label, c in curves.items():
      mean, std = (np.asarray(v, float) * scale for v in c[key])
      ax.errorbar(c['x'], mean, yerr=std, marker='o', capsize=3, label=label)
    pair = list(curves.values())[:2]
    found[key] = (
      crossovers(pair[0]['x'], pair[0][key][0], pair[1][key][0])
      if len(pair) == 2
      else []
    )
    for x in found[key]:
      ax.axvline(x, color='gray', linestyle='--')
      ax.annotate(
        f'crossover ~{x:.0f}/class',
        (x, 0.5),
        xycoords=('data', 'axes fraction'),
        rotation=90,
        ha='right',
        va='center',
        fontsize=8,
      )
    if len(pair) == 2 and not found[key]:
      ax.text(
        0.5,
        0.02,
        'no crossover in this range',
        transform=ax.transAxes,
        ha='center',
        fontsize=8,
      )
    ax.set_xscale('log')
    first = next(iter(curves.values()))
    ax.set_xticks(first['x'], first['xlabels'])
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel('labelled training images per class (log scale)')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return found


def plot_confusion(counts, class_names, title, path):
  """Row-normalised confusion matrix with counts written in each cell."""
  n = len(class_names)
  rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
  size = max(4.5, 0.55 * n + 2.5)
  fig, ax = plt.subplots(figsize=(size, size * 0.9))
  im = ax.imshow(rates, cmap='Blues', vmin=0, vmax=1)
  ax.set_xticks(range(n), class_names, rotation=45, ha='right')
  ax.set_yticks(range(n), class_names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  for i in range(n):
    for j in range(n):
      ax.text(
        j,
        i,
        str(counts[i, j]),
        ha='center',
        va='center',
        fontsize=8,
        color='white' if rates[i, j] > 0.5 else 'black',
      )
  fig.colorbar(im, ax=ax, fraction=0.046, label='fraction of the true class')
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def plot_tsne(embeddings, labels, class_names, titles, path, suptitle=''):
  """One scatter per run, side by side, coloured by class, with one shared legend."""
  n = len(embeddings)
  fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 1.6, 4.4), squeeze=False)
  cmap = plt.get_cmap('tab10' if len(class_names) <= 10 else 'tab20')
  for ax, emb, title in zip(axes[0], embeddings, titles):
    for c, name in enumerate(class_names):
      sel = labels == c
      ax.scatter(
        emb[sel, 0],
        emb[sel, 1],
        s=6,
        alpha=0.75,
        color=cmap(c % cmap.N),
        label=name,
      )
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
  handles, names = axes[0][0].get_legend_handles_labels()
  fig.legend(
    handles, names, loc='center right', markerscale=3, fontsize=9, frameon=False
  )
  if suptitle:
    fig.suptitle(suptitle, fontsize=11)
  fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
  fig.savefig(path, dpi=130)
  plt.close(fig)
