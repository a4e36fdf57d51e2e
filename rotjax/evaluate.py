r"""Command line of the evaluation tools (probes.py): linear probe, k-NN, per-class accuracy, t-SNE.

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
import json
import os
import sys

import numpy as np

from rotjax import batch_plans
from rotjax import input_pipeline
from rotjax import probes
from rotjax import rundir
from rotjax.study import plots



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


def data_config(config, source='', max_images=0, cache_dir=None, loader=''):
  """The run's data config with command-line overrides."""
  data = copy.deepcopy(config.data)
  with data.unlocked():
    if source:
      data.source = source
    if loader:
      data.loader = loader
    if max_images:
      data.max_train_images = max_images
      data.max_eval_images = max_images
    if cache_dir is not None:
      data.cache_dir = cache_dir
  return data


def load_data(config, **overrides):
  return input_pipeline.load_dataset(data_config(config, **overrides))


# ---------------------------------------------------------------- commands

def _run_and_features(args, bn: dict | None = None):
  """(name, model, dataset, {split: features}) of the one run a probe or k-NN command names;
  with --bn=reestimated its BatchNorm statistics first re-estimated (recorded in `bn`)."""
  name, model = load_run(args.runs[0])
  dataset = load_data(model.config, **_data_overrides(args))
  if getattr(args, 'bn', 'running') == 'reestimated':
    bn['bn_reestimated'] = probes.reestimate_bn(
        model, batch_plans.images_of(dataset.train, model.config.batch_size),
        model.config.batch_size)
  return name, model, dataset, probes.split_features(model, dataset, args.layer)


def cmd_probe(args):
  bn = {'bn': args.bn}
  name, _, dataset, feats = _run_and_features(args, bn)
  result = probes.linear_probe(feats['train'], dataset.train.labels, feats['val'],
                               dataset.val.labels, feats['test'], dataset.test.labels,
                               dataset.num_classes, steps=args.steps,
                               learning_rate=args.learning_rate)
  return {'run': name, 'layer': args.layer, 'feature_dim': int(feats['train'].shape[1]),
          'train_images': len(dataset.train), **bn, **result}


def cmd_knn(args):
  name, _, dataset, feats = _run_and_features(args)
  result = {'run': name, 'layer': args.layer, 'k': args.k, 'train_images': len(dataset.train)}
  for split in ('val', 'test'):
    result[f'{split}_accuracy'] = probes.knn_accuracy(
        feats['train'], dataset.train.labels, feats[split], getattr(dataset, split).labels,
        dataset.num_classes, k=args.k)
  return result


def cmd_confusion(args):
  name, model = load_run(args.runs[0])
  dataset = load_data(model.config, **_data_overrides(args))
  split = getattr(dataset, args.split)
  pred, true = probes.split_predictions(model, split)
  true = split.labels if true is None else true
  names = model.class_names or tuple(str(i) for i in range(model.num_classes))
  counts = probes.confusion_matrix(true, pred, len(names))
  per_class = (np.diag(counts) / np.maximum(counts.sum(1), 1)).tolist()
  accuracy = float(np.trace(counts) / max(counts.sum(), 1))
  path = args.out or os.path.join(_out_dir(args), f'confusion_{args.split}.png')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  what = 'rotation' if model.config.stage == 'pretext' else 'class'
  plots.plot_confusion(counts, names, f'{name} ({model.config.stage}): {what} accuracy on '
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
    features = np.concatenate([model.features(chunk, layer=args.layer)
                               for chunk in batch_plans.images_of(split)])
    embeddings.append(probes.tsne_embed(features,
                                 perplexity=args.perplexity))
    titles.append(f'{name} ({model.config.stage if name != "random" else "random init"})')
  path = args.out or os.path.join(_out_dir(args), f'tsne_{args.layer}.png')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  plots.plot_tsne(embeddings, split.labels, dataset.class_names, titles, path,
            suptitle=f't-SNE of {args.layer} features, {len(split)} {args.split} images')
  return {'runs': [n for n, _ in runs], 'layer': args.layer, 'images': len(split), 'figure': path}


COMMANDS = {'probe': cmd_probe, 'knn': cmd_knn, 'confusion': cmd_confusion, 'tsne': cmd_tsne}


def _data_overrides(args):
  return {'source': args.data_source, 'max_images': args.max_images, 'cache_dir': args.cache_dir,
          'loader': args.loader}


def _out_dir(args):
  if args.out_dir:
    return args.out_dir
  first = args.runs[0].rpartition('=')[2]
  return os.path.join(rundir.find_checkpoint(first)[0], 'eval')


# Each command's own options: (flags, argparse keywords); every command also takes the
# run(s) and the data overrides. The layer default: tsne shows the pooled features.
OPTIONS = {
    'probe': ((('--layer',), dict(default='layer3')), (('--steps',), dict(type=int, default=500)),
              (('--learning_rate',), dict(type=float, default=1e-2)),
              (('--bn',), dict(default='running', choices=('running', 'reestimated'),
                               help="BatchNorm statistics: the checkpoint's running ones, or "
                                    're-estimated on the training images first (one '
                                    'no-gradient pass)'))),
    'knn': ((('--layer',), dict(default='layer3')), (('--k',), dict(type=int, default=20))),
    'confusion': ((('--split',), dict(default='test', choices=('train', 'val', 'test'))),
                  (('--out',), dict(default='', help='PNG path'))),
    'tsne': ((('--layer',), dict(default='pooled')),
             (('--split',), dict(default='test', choices=('train', 'val', 'test'))),
             (('--out',), dict(default='', help='PNG path')),
             (('--perplexity',), dict(type=float, default=30.0))),
}


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
    p.add_argument('--loader', default='', choices=('', 'auto', 'memory', 'stream'),
                   help="override data.loader (default: the run's own)")
    p.add_argument('--max_images', type=int, default=0, help='cap on train/val/test images (0 = the run\'s own)')
    p.add_argument('--cache_dir', default=None, help='override data.cache_dir')
    p.add_argument('--out_dir', default='', help='where the JSON/PNG go (default RUN/eval)')
    for flags, kwargs in OPTIONS[command]:
      if flags == ('--layer',):
        kwargs = {**kwargs, 'choices': models.LAYER_NAMES}
      p.add_argument(*flags, **kwargs)
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
  rundir.write_json(path, result)
  print(json.dumps({k: v for k, v in result.items() if k != 'confusion'}, indent=2))
  return result


if __name__ == '__main__':
  from rotjax.cpu import platform
  platform.configure()
  main()
