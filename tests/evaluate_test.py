import json
import os

# Grain defines absl flags of its own when first imported, and reads them later: imported
# here, before any flagsaver context (which would take back flags defined inside it).
import grain  # noqa: F401
import numpy as np
import pytest
from absl import app
from absl import flags
from absl.testing import flagsaver

from rotjax import evaluate
from rotjax import train


def _evaluate(argv):
  """`python -m rotjax.evaluate ARGV` in this process: absl parses the flags as app.run
  does, then the command runs; the flags go back to their values afterwards."""
  with flagsaver.flagsaver():
    return evaluate.run(flags.FLAGS(['rotjax.evaluate', *argv]))


def _parse(*argv):
  with flagsaver.flagsaver():
    return evaluate.parse_command(flags.FLAGS(['rotjax.evaluate', *argv]))


def test_each_command_takes_its_own_flags_with_its_own_defaults():
  probe = _parse('probe', 'runs/pretext', '--bn=reestimated', '--cache_dir=')
  assert (probe.runs, probe.layer, probe.steps, probe.bn) == (
    ['runs/pretext'],
    'layer3',
    500,
    'reestimated',
  )
  assert (
    probe.cache_dir == '' and probe.loader is None and not hasattr(probe, 'k')
  )
  assert _parse('knn', 'runs/pretext').layer == 'layer3'
  tsne = _parse(
    'tsne',
    'pretext=runs/pretext',
    'finetune=runs/finetune',
    'random',
    '--max_images=1000',
    '--out',
    'figures/tsne.png',
  )
  assert tsne.runs == [
    'pretext=runs/pretext',
    'finetune=runs/finetune',
    'random',
  ]
  assert (tsne.layer, tsne.split, tsne.max_images, tsne.out) == (
    'pooled',
    'test',
    1000,
    'figures/tsne.png',
  )
  assert _parse('confusion', 'runs/finetune').cache_dir is None
  with pytest.raises(app.UsageError, match='knn takes no --steps'):
    _parse('knn', 'runs/pretext', '--steps=5')
  with pytest.raises(app.UsageError, match='probe takes one run'):
    _parse('probe', 'runs/a', 'runs/b')
  with pytest.raises(app.UsageError, match='--layer=layer9 is unknown'):
    _parse('probe', 'runs/a', '--layer=layer9')
  with pytest.raises(app.UsageError, match='usage: python -m rotjax.evaluate'):
    _parse('probes', 'runs/a')


@pytest.fixture(scope='module')
def runs(image_folder, tmp_path_factory):
  from conftest import tiny_config

  root = tmp_path_factory.mktemp('eval')
  train.train_and_evaluate(
    tiny_config('pretext', root / 'pre', image_folder, num_epochs=1)
  )
  train.train_and_evaluate(
    tiny_config('supervised', root / 'sup', image_folder, num_epochs=1)
  )
  return str(root / 'pre'), str(root / 'sup')


@pytest.mark.slow
def test_cli_probe_and_knn(runs):
  pre, _ = runs
  probe = _evaluate(['probe', pre, '--layer=layer2', '--steps=50'])
  assert 0 <= probe['test_accuracy'] <= 1 and probe['feature_dim'] == 8
  assert (
    json.load(open(os.path.join(pre, 'eval', 'probe_layer2.json')))['layer']
    == 'layer2'
  )
  # Re-estimated BatchNorm statistics: the other figure, in a file of its own.
  again = _evaluate(
    ['probe', pre, '--layer=layer2', '--steps=50', '--bn=reestimated']
  )
  assert again['bn'] == 'reestimated' and again['bn_reestimated']['layers'] > 0
  assert again['bn_reestimated']['augmentation'] == 'eval'
  saved = json.load(
    open(os.path.join(pre, 'eval', 'probe_layer2_bnreestimated.json'))
  )
  assert saved['bn'] == 'reestimated' and probe['bn'] == 'running'
  knn = _evaluate(['knn', pre, '--layer=pooled', '--k=3', '--max_images=12'])
  assert knn['train_images'] == 12 and 0 <= knn['val_accuracy'] <= 1


def test_cli_confusion_for_classifier_and_pretext(runs, tmp_path):
  pre, sup = runs
  result = _evaluate(['confusion', sup, f'--out_dir={tmp_path}'])
  assert set(result['per_class_accuracy']) == {'circle', 'square', 'stripes'}
  assert (
    np.sum(result['confusion']) == 24
    and os.path.getsize(result['figure']) > 1000
  )
  result = _evaluate(['confusion', pre, f'--out_dir={tmp_path}', '--split=val'])
  assert set(result['per_class_accuracy']) == {
    '0deg',
    '90deg',
    '180deg',
    '270deg',
  }
  assert np.sum(result['confusion']) == 4 * 18
  # The same rotation accuracy the training loop logged on val.
  logged = json.loads(open(os.path.join(pre, 'metrics.jsonl')).readline())[
    'val_accuracy'
  ]
  assert result['accuracy'] == pytest.approx(logged, abs=1e-6)


@pytest.mark.slow
def test_cli_reads_a_streamed_split_as_the_one_in_memory(runs, tmp_path):
  """Features and BatchNorm statistics a chunk at a time from a split streamed from its
  files: the same probe as from the split in memory."""
  pre, _ = runs
  args = [
    '--layer=layer2',
    '--steps=50',
    '--bn=reestimated',
    f'--out_dir={tmp_path}',
  ]
  memory = _evaluate(['probe', pre, *args, '--loader=memory'])
  stream = _evaluate(['probe', pre, *args, '--loader=stream'])
  for result in (memory, stream):
    result['bn_reestimated'].pop('seconds')
  assert stream == memory


@pytest.mark.slow
def test_cli_tsne_side_by_side(runs, tmp_path):
  pre, sup = runs
  out = str(tmp_path / 'tsne.png')
  result = _evaluate(
    [
      'tsne',
      f'pretext={pre}',
      f'supervised={sup}',
      'random',
      f'--out={out}',
      '--layer=layer3',
    ]
  )
  assert (
    result['runs'] == ['pretext', 'supervised', 'random']
    and os.path.getsize(out) > 1000
  )
