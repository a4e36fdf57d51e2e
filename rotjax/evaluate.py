r"""Command line of the evaluation tools (probes.py): linear probe, k-NN, per-class accuracy, t-SNE.

  python -m rotjax.evaluate probe runs/pretext --layer=layer3
  python -m rotjax.evaluate probe runs/pretext --layer=layer3 --bn=reestimated
  python -m rotjax.evaluate knn runs/pretext --layer=pooled --k=20
  python -m rotjax.evaluate confusion runs/finetune            # per-class acc + PNG
  python -m rotjax.evaluate tsne pretext=runs/pretext finetune=runs/finetune random \
      --layer=pooled --max_images=1000 --out=figures/tsne.png

The command, then the run(s): a run's workdir or checkpoint step dir; tsne also takes
NAME=PATH and 'random' (the first run's model, freshly initialised).
Each command reads the run's own config.json for the data (`input_pipeline.load_dataset`),
with overrides: --data_source, --loader, --max_images (caps train, val and test), --cache_dir.
Results are printed as JSON and written to --out_dir (default RUN/eval/).
Features are frozen: extracted once in eval mode, then the probe is trained on them.
"""

import copy
import itertools
import json
import os
import types

import numpy as np
from absl import app
from absl import flags

from rotjax import batch_plans
from rotjax import input_pipeline
from rotjax import probes
from rotjax import rundir
from rotjax.cpu import platform
from rotjax.study import plots

FLAGS = flags.FLAGS
# Every command: where the data and the results come from and go.
flags.DEFINE_string(
  'data_source', '', 'override data.source (tfds:NAME | folder:PATH)'
)
flags.DEFINE_enum(
  'loader',
  None,
  ('auto', 'memory', 'stream'),
  "override data.loader (default: the run's own)",
)
flags.DEFINE_integer(
  'max_images', 0, "cap on train/val/test images (0 = the run's own)"
)
flags.DEFINE_string('cache_dir', None, 'override data.cache_dir')
flags.DEFINE_string('out_dir', '', 'where the JSON/PNG go (default RUN/eval)')
# One command's or a few commands' own (OPTIONS).
flags.DEFINE_string(
  'layer',
  None,
  'probe, knn, tsne: the features of this layer: stem, '
  'layer1..layer4 or pooled (default: layer3; tsne: pooled)',
)
flags.DEFINE_integer('steps', 500, 'probe: training steps')
flags.DEFINE_float('learning_rate', 1e-2, 'probe: learning rate')
flags.DEFINE_enum(
  'bn',
  'running',
  ('running', 'reestimated'),
  "probe: BatchNorm statistics: the checkpoint's running ones, or re-estimated "
  'on the training images first (one no-gradient pass)',
)
flags.DEFINE_integer('k', 20, 'knn: neighbours')
flags.DEFINE_enum(
  'split', 'test', ('train', 'val', 'test'), 'confusion, tsne: the split'
)
flags.DEFINE_string('out', '', 'confusion, tsne: PNG path')
flags.DEFINE_float('perplexity', 30.0, 'tsne: perplexity')

DATA_FLAGS = ('data_source', 'loader', 'max_images', 'cache_dir', 'out_dir')
# Each command's own flags; another command's flag is an error, not silently ignored.
OPTIONS = {
  'probe': ('layer', 'steps', 'learning_rate', 'bn'),
  'knn': ('layer', 'k'),
  'confusion': ('split', 'out'),
  'tsne': ('layer', 'split', 'out', 'perplexity'),
}
# tsne shows the pooled features.
DEFAULT_LAYER = {'probe': 'layer3', 'knn': 'layer3', 'tsne': 'pooled'}


# ---------------------------------------------------------------- runs and data


def load_run(spec: str, reference=None):
  """'PATH', 'NAME=PATH' or 'random' -> (name, RotjaxModel); 'random' copies `reference`'s model."""
  from rotjax import api

  name, _, path = spec.rpartition('=')
  if spec == 'random':
    if reference is None:
      raise ValueError(
        "'random' needs a trained run before it in the list (for the architecture)"
      )
    return 'random', api.random_init(
      reference.config, reference.num_classes, seed=reference.config.seed + 1000
    )
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
      model,
      batch_plans.images_of(dataset.train, model.config.batch_size),
      model.config.batch_size,
    )
  return name, model, dataset, probes.split_features(model, dataset, args.layer)


def cmd_probe(args):
  bn = {'bn': args.bn}
  name, _, dataset, feats = _run_and_features(args, bn)
  result = probes.linear_probe(
    feats['train'],
    dataset.train.labels,
    feats['val'],
    dataset.val.labels,
    feats['test'],
    dataset.test.labels,
    dataset.num_classes,
    steps=args.steps,
    learning_rate=args.learning_rate,
  )
  return {
    'run': name,
    'layer': args.layer,
    'feature_dim': int(feats['train'].shape[1]),
    'train_images': len(dataset.train),
    **bn,
    **result,
  }


def cmd_knn(args):
  name, _, dataset, feats = _run_and_features(args)
  result = {
    'run': name,
    'layer': args.layer,
    'k': args.k,
    'train_images': len(dataset.train),
  }
  for split in ('val', 'test'):
    result[f'{split}_accuracy'] = probes.knn_accuracy(
      feats['train'],
      dataset.train.labels,
      feats[split],
      getattr(dataset, split).labels,
      dataset.num_classes,
      k=args.k,
    )
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
  plots.plot_confusion(
    counts,
    names,
    f'{name} ({model.config.stage}): {what} accuracy on '
    f'{args.split} {accuracy:.3f}, n={counts.sum()}',
    path,
  )
  return {
    'run': name,
    'split': args.split,
    'accuracy': accuracy,
    'per_class_accuracy': dict(zip(names, per_class)),
    'confusion': counts.tolist(),
    'figure': path,
  }


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
    features = np.concatenate(
      [
        model.features(chunk, layer=args.layer)
        for chunk in batch_plans.images_of(split)
      ]
    )
    embeddings.append(probes.tsne_embed(features, perplexity=args.perplexity))
    titles.append(
      f'{name} ({model.config.stage if name != "random" else "random init"})'
    )
  path = args.out or os.path.join(_out_dir(args), f'tsne_{args.layer}.png')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  plots.plot_tsne(
    embeddings,
    split.labels,
    dataset.class_names,
    titles,
    path,
    suptitle=f't-SNE of {args.layer} features, {len(split)} {args.split} images',
  )
  return {
    'runs': [n for n, _ in runs],
    'layer': args.layer,
    'images': len(split),
    'figure': path,
  }


COMMANDS = {
  'probe': cmd_probe,
  'knn': cmd_knn,
  'confusion': cmd_confusion,
  'tsne': cmd_tsne,
}


def _data_overrides(args):
  return {
    'source': args.data_source,
    'max_images': args.max_images,
    'cache_dir': args.cache_dir,
    'loader': args.loader,
  }


def _out_dir(args):
  if args.out_dir:
    return args.out_dir
  first = args.runs[0].rpartition('=')[2]
  return os.path.join(rundir.find_checkpoint(first)[0], 'eval')


def parse_command(argv) -> types.SimpleNamespace:
  """The command, its run(s) and its flags' values, from what absl leaves of the command
  line (argv[0] the program, then the positional arguments) and FLAGS."""
  from rotjax import models

  usage = f'usage: python -m rotjax.evaluate {{{",".join(COMMANDS)}}} RUN... [--flags]'
  if len(argv) < 3 or argv[1] not in COMMANDS:
    raise app.UsageError(usage)
  command, runs = argv[1], argv[2:]
  if len(runs) > 1 and command != 'tsne':
    raise app.UsageError(f'{command} takes one run, not {len(runs)}: {runs}')
  others = set(itertools.chain(*OPTIONS.values())) - set(OPTIONS[command])
  foreign = [name for name in sorted(others) if FLAGS[name].present]
  if foreign:
    raise app.UsageError(
      f'{command} takes no --{", --".join(foreign)}; its flags: '
      f'--{", --".join(OPTIONS[command] + DATA_FLAGS)}'
    )
  args = types.SimpleNamespace(
    command=command,
    runs=runs,
    **{name: FLAGS[name].value for name in DATA_FLAGS + OPTIONS[command]},
  )
  if 'layer' in OPTIONS[command]:
    args.layer = args.layer or DEFAULT_LAYER[command]
    if args.layer not in models.LAYER_NAMES:
      raise app.UsageError(
        f'--layer={args.layer} is unknown; allowed: {models.LAYER_NAMES}'
      )
  return args


def run(argv) -> dict:
  """Runs the command of a parsed command line (parse_command); writes and prints its result."""
  args = parse_command(argv)
  result = COMMANDS[args.command](args)
  out_dir = _out_dir(args)
  os.makedirs(out_dir, exist_ok=True)
  tag = (
    args.layer
    if hasattr(args, 'layer') and args.command != 'tsne'
    else getattr(args, 'split', '')
  )
  if getattr(args, 'bn', 'running') != 'running':
    tag = f'{tag}_bn{args.bn}'
  path = os.path.join(out_dir, f'{args.command}_{tag}.json')
  rundir.write_json(path, result)
  print(
    json.dumps({k: v for k, v in result.items() if k != 'confusion'}, indent=2)
  )
  return result


def main(argv):
  run(argv)  # app.run exits with main's return value: the result stays here


if __name__ == '__main__':
  platform.configure()
  app.run(main)
