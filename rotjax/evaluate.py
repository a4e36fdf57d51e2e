r"""Evaluation tools for trained runs: linear probe, k-NN, per-class accuracy, t-SNE.

  python -m rotjax.evaluate probe runs/pretext --layer=layer3
  python -m rotjax.evaluate probe runs/pretext --layer=layer3 --bn=reestimated
  python -m rotjax.evaluate knn runs/pretext --layer=pooled --k=20
  python -m rotjax.evaluate confusion runs/finetune            # per-class acc + PNG
  python -m rotjax.evaluate tsne pretext=runs/pretext finetune=runs/finetune random \
      --layer=pooled --max_images=1000 --out=figures/tsne.png

Each command reads the run's own config.json for the data (`input_pipeline.load_dataset`),
with overrides: --data_source, --max_images (caps train, val and test), --cache_dir.
Results are printed as JSON and written to --out_dir (default RUN/eval/).
Features are frozen: extracted once in eval mode, then the probe is trained on them.
"""
import argparse
import copy
import functools
import json
import os
import sys

import numpy as np

PROBE_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


# ---------------------------------------------------------------- runs and data

def load_run(spec: str, reference=None):
  """'PATH', 'NAME=PATH' or 'random' -> (name, RotjaxModel); 'random' copies `reference`'s model."""
  from rotjax import api
  name, _, path = spec.rpartition('=')
  if spec == 'random':
    if reference is None:
      raise ValueError("'random' needs a trained run before it in the list (for the architecture)")
    return 'random', api.random_init(reference.config, reference.num_classes,
                                     seed=reference.config.seed + 1000)
  model = api.load(path)
  return name or os.path.basename(os.path.normpath(path)), model


def data_config(config, source='', max_images=0, cache_dir=None):
  """The run's data config with command-line overrides."""
  data = copy.deepcopy(config.data)
  with data.unlocked():
    if source:
      data.source = source
    if max_images:
      data.max_train_images = max_images
      data.max_eval_images = max_images
    if cache_dir is not None:
      data.cache_dir = cache_dir
  return data


def load_data(config, **overrides):
  from rotjax import input_pipeline
  return input_pipeline.load_dataset(data_config(config, **overrides))


# ---------------------------------------------------------------- linear probe / k-NN

def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, num_classes, *,
                 steps=500, learning_rate=1e-2, weight_decays=PROBE_WEIGHT_DECAYS, seed=0):
  """Multinomial logistic regression on frozen features, full-batch Adam in JAX.

  One probe per weight decay (vmapped); the one best on val is reported on test.
  Features are standardised with the train split's mean and std.
  """
  import jax
  import jax.numpy as jnp
  import optax
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  norm = lambda x: jnp.asarray((x - mean) / std, jnp.float32)
  train_x, val_x, test_x = norm(train_x), norm(val_x), norm(test_x)
  tx = optax.adam(learning_rate)

  def fit(weight_decay):
    params = {'w': jnp.zeros((train_x.shape[1], num_classes)), 'b': jnp.zeros(num_classes)}

    def loss_fn(params):
      logits = train_x @ params['w'] + params['b']
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, train_y).mean()
      return ce + weight_decay * jnp.sum(params['w'] ** 2)

    def step(carry, _):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    acc = lambda x, y: jnp.mean(jnp.argmax(x @ params['w'] + params['b'], -1) == y)
    return acc(train_x, train_y), acc(val_x, val_y), acc(test_x, test_y)

  wds = jnp.asarray(weight_decays, jnp.float32)
  train_acc, val_acc, test_acc = jax.device_get(jax.jit(jax.vmap(fit))(wds))
  best = int(np.argmax(val_acc))  # first of the ties: the least regularised
  return {'train_accuracy': float(train_acc[best]), 'val_accuracy': float(val_acc[best]),
          'test_accuracy': float(test_acc[best]), 'weight_decay': float(weight_decays[best]),
          'val_accuracy_per_weight_decay': dict(zip(map(str, weight_decays), val_acc.tolist()))}


def knn_accuracy(train_x, train_y, query_x, query_y, num_classes, k=20, chunk=1024):
  """Accuracy of a k-nearest-neighbour vote by cosine similarity (ties: summed similarity)."""
  import jax
  import jax.numpy as jnp
  k = min(k, len(train_x))
  unit = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
  bank = jnp.asarray(unit(train_x), jnp.float32)
  bank_y = jnp.asarray(train_y)

  @jax.jit
  def predict(q):
    sims, idx = jax.lax.top_k(q @ bank.T, k)
    votes = jax.nn.one_hot(bank_y[idx], num_classes).sum(1)
    votes += 1e-3 * (jax.nn.one_hot(bank_y[idx], num_classes) * sims[..., None]).sum(1)
    return jnp.argmax(votes, -1)
  query = unit(query_x).astype(np.float32)
  preds = np.concatenate([np.asarray(predict(query[i:i + chunk]))
                          for i in range(0, len(query), chunk)])
  return float(np.mean(preds == query_y))


# ---------------------------------------------------------------- per-class / confusion

def predictions(model, images):
  """(predicted, true) labels for a split's images: classes, or rotations for a pretext run."""
  if model.config.stage != 'pretext':
    return model.predict(images).argmax(-1), None
  import jax
  from rotjax import train
  prepare = train.make_prepare_fn(model.config, train=False)

  @jax.jit
  def rotated(variables, batch, index):
    # The loop's eval pipeline and keys (index: each image's place in the split): the
    # very images its val/test accuracy scored.
    x, labels, _ = prepare({'image': batch, 'index': index}, train.eval_key(model.config.seed))
    logits, _ = model.module.apply(variables, x, train=False)
    return logits.argmax(-1), labels
  outs = [jax.device_get(rotated(model.variables, images[i:i + 128],
                                 np.arange(i, min(i + 128, len(images)), dtype=np.int32)))
          for i in range(0, len(images), 128)]
  return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def confusion_matrix(true, pred, num_classes) -> np.ndarray:
  """counts[true, predicted]."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (true, pred), 1)
  return counts


def plot_confusion(counts, class_names, title, path):
  """Row-normalised confusion matrix with counts written in each cell."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
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
      ax.text(j, i, str(counts[i, j]), ha='center', va='center', fontsize=8,
              color='white' if rates[i, j] > 0.5 else 'black')
  fig.colorbar(im, ax=ax, fraction=0.046, label='fraction of the true class')
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


# ---------------------------------------------------------------- t-SNE

def tsne_embed(features, seed=0, perplexity=30.0):
  """2-D t-SNE of features (PCA to 50 dimensions first, as is usual)."""
  from sklearn.decomposition import PCA
  from sklearn.manifold import TSNE
  x = (features - features.mean(0)) / (features.std(0) + 1e-6)
  if x.shape[1] > 50 and len(x) > 50:
    x = PCA(50, random_state=seed).fit_transform(x)
  perplexity = min(perplexity, (len(x) - 1) / 3)
  return TSNE(2, perplexity=perplexity, init='pca', random_state=seed).fit_transform(x)


def plot_tsne(embeddings, labels, class_names, titles, path, suptitle=''):
  """One scatter per run, side by side, coloured by class, with one shared legend."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  n = len(embeddings)
  fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 1.6, 4.4), squeeze=False)
  cmap = plt.get_cmap('tab10' if len(class_names) <= 10 else 'tab20')
  for ax, emb, title in zip(axes[0], embeddings, titles):
    for c, name in enumerate(class_names):
      sel = labels == c
      ax.scatter(emb[sel, 0], emb[sel, 1], s=6, alpha=0.75, color=cmap(c % cmap.N), label=name)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
  handles, names = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, names, loc='center right', markerscale=3, fontsize=9, frameon=False)
  if suptitle:
    fig.suptitle(suptitle, fontsize=11)
  fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
  fig.savefig(path, dpi=130)
  plt.close(fig)


# ---------------------------------------------------------------- commands

def reestimate_bn(model, images, batch_size: int = 128) -> dict:
  """Every BatchNorm of `model` given the running statistics of `images` (its .variables
  replaced; bn_stats), prepared as the features are (eval preprocessing, no augmentation):
  the probe then normalises the task's images with their own statistics, not the pretext's.
  Full batches of `batch_size` only (one batch of all when there are fewer); returns the record."""
  import jax
  from rotjax import bn_stats
  from rotjax import preprocess
  images = model.prepare_images(images)
  config = model.config

  def prepare(batch, _):
    return preprocess.preprocess(batch['image'], jax.random.key(0), train=False,
                                 style=config.data.preprocess, image_size=config.data.image_size)
  devices = jax.local_devices()[:1]
  p_moments = jax.pmap(functools.partial(bn_stats.moments_step, module=model.module,
                                         prepare_fn=prepare), axis_name='batch', devices=devices)
  size = min(batch_size, len(images))
  batches = ({'image': images[i:i + size][None]}
             for i in range(0, len(images) - size + 1, size))
  stats, record = bn_stats.reestimate(p_moments, model.variables, batches, lambda _: True,
                                      devices)
  model.variables = {**model.variables, 'batch_stats': stats}
  return {**record, 'images': record['batches'] * size, 'augmentation': 'eval'}


def cmd_probe(args):
  name, model = load_run(args.runs[0])
  dataset = load_data(model.config, **_data_overrides(args))
  bn = {'bn': args.bn}
  if args.bn == 'reestimated':
    bn['bn_reestimated'] = reestimate_bn(model, dataset.train.images, model.config.batch_size)
  feats = {s: model.features(getattr(dataset, s).images, layer=args.layer)
           for s in ('train', 'val', 'test')}
  result = linear_probe(feats['train'], dataset.train.labels, feats['val'], dataset.val.labels,
                        feats['test'], dataset.test.labels, dataset.num_classes, steps=args.steps,
                        learning_rate=args.learning_rate)
  return {'run': name, 'layer': args.layer, 'feature_dim': int(feats['train'].shape[1]),
          'train_images': len(dataset.train), **bn, **result}


def cmd_knn(args):
  name, model = load_run(args.runs[0])
  dataset = load_data(model.config, **_data_overrides(args))
  feats = {s: model.features(getattr(dataset, s).images, layer=args.layer)
           for s in ('train', 'val', 'test')}
  result = {'run': name, 'layer': args.layer, 'k': args.k, 'train_images': len(dataset.train)}
  for split in ('val', 'test'):
    result[f'{split}_accuracy'] = knn_accuracy(
        feats['train'], dataset.train.labels, feats[split], getattr(dataset, split).labels,
        dataset.num_classes, k=args.k)
  return result


def cmd_confusion(args):
  name, model = load_run(args.runs[0])
  dataset = load_data(model.config, **_data_overrides(args))
  split = getattr(dataset, args.split)
  pred, true = predictions(model, split.images)
  true = split.labels if true is None else true
  names = model.class_names or tuple(str(i) for i in range(model.num_classes))
  counts = confusion_matrix(true, pred, len(names))
  per_class = (np.diag(counts) / np.maximum(counts.sum(1), 1)).tolist()
  accuracy = float(np.trace(counts) / max(counts.sum(), 1))
  path = args.out or os.path.join(_out_dir(args), f'confusion_{args.split}.png')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  what = 'rotation' if model.config.stage == 'pretext' else 'class'
  plot_confusion(counts, names, f'{name} ({model.config.stage}): {what} accuracy on '
                 f'{args.split} {accuracy:.3f}, n={counts.sum()}', path)
  return {'run': name, 'split': args.split, 'accuracy': accuracy,
          'per_class_accuracy': dict(zip(names, per_class)), 'confusion': counts.tolist(),
          'figure': path}


def cmd_tsne(args):
  runs, reference = [], None
  for spec in args.runs:
    name, model = load_run(spec, reference)
    reference = reference or model
    runs.append((name, model))
  dataset = load_data(reference.config, **_data_overrides(args))
  split = getattr(dataset, args.split)
  embeddings, titles = [], []
  for name, model in runs:
    embeddings.append(tsne_embed(model.features(split.images, layer=args.layer),
                                 perplexity=args.perplexity))
    titles.append(f'{name} ({model.config.stage if name != "random" else "random init"})')
  path = args.out or os.path.join(_out_dir(args), f'tsne_{args.layer}.png')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  plot_tsne(embeddings, split.labels, dataset.class_names, titles, path,
            suptitle=f't-SNE of {args.layer} features, {len(split)} {args.split} images')
  return {'runs': [n for n, _ in runs], 'layer': args.layer, 'images': len(split), 'figure': path}


COMMANDS = {'probe': cmd_probe, 'knn': cmd_knn, 'confusion': cmd_confusion, 'tsne': cmd_tsne}


def _data_overrides(args):
  return {'source': args.data_source, 'max_images': args.max_images, 'cache_dir': args.cache_dir}


def _out_dir(args):
  if args.out_dir:
    return args.out_dir
  first = args.runs[0].rpartition('=')[2]
  from rotjax import api
  return os.path.join(api.resolve_checkpoint(first)[0], 'eval')


def parse_args(argv):
  from rotjax import models
  parser = argparse.ArgumentParser(prog='python -m rotjax.evaluate', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  for command in COMMANDS:
    p = sub.add_parser(command)
    p.add_argument('runs', nargs='+' if command == 'tsne' else 1,
                   help="run workdir(s) or checkpoint step dir(s); tsne also takes "
                        "NAME=PATH and 'random' (the first run's model, freshly initialised)")
    p.add_argument('--data_source', default='', help='override data.source (tfds:NAME | folder:PATH)')
    p.add_argument('--max_images', type=int, default=0, help='cap on train/val/test images (0 = the run\'s own)')
    p.add_argument('--cache_dir', default=None, help='override data.cache_dir')
    p.add_argument('--out_dir', default='', help='where the JSON/PNG go (default RUN/eval)')
    if command in ('probe', 'knn', 'tsne'):
      p.add_argument('--layer', default='pooled' if command == 'tsne' else 'layer3',
                     choices=models.LAYER_NAMES)
    if command == 'probe':
      p.add_argument('--steps', type=int, default=500)
      p.add_argument('--learning_rate', type=float, default=1e-2)
      p.add_argument('--bn', default='running', choices=('running', 'reestimated'),
                     help="BatchNorm statistics: the checkpoint's running ones, or re-estimated "
                          "on the training images first (one no-gradient pass)")
    if command == 'knn':
      p.add_argument('--k', type=int, default=20)
    if command in ('confusion', 'tsne'):
      p.add_argument('--split', default='test', choices=('train', 'val', 'test'))
      p.add_argument('--out', default='', help='PNG path')
    if command == 'tsne':
      p.add_argument('--perplexity', type=float, default=30.0)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  result = COMMANDS[args.command](args)
  out_dir = _out_dir(args)
  os.makedirs(out_dir, exist_ok=True)
  tag = args.layer if hasattr(args, 'layer') and args.command != 'tsne' else getattr(args, 'split', '')
  if getattr(args, 'bn', 'running') != 'running':
    tag = f'{tag}_bn{args.bn}'
  path = os.path.join(out_dir, f'{args.command}_{tag}.json')
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
  print(json.dumps({k: v for k, v in result.items() if k != 'confusion'}, indent=2))
  return result


if __name__ == '__main__':
  from rotjax import platform
  platform.configure()
  main()
