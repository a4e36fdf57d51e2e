"""Every command line and import path a user types still works: each entry point's --help
(or usage) in a fresh interpreter, every config file and preset, and `rotjax.load`."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  out = subprocess.run(
    [sys.executable, *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  return out.returncode, out.stdout + out.stderr


@pytest.mark.parametrize(
  'module, expected',
  [
    ('rotjax.main', 'Stage config file'),
    ('rotjax.study', 'Study config file'),
    ('rotjax.evaluate', 'linear probe'),
  ],
)
def test_help(module, expected):
  code, out = _run('-m', module, '--help')
  # absl's --help exits with 1 after printing, argparse's with 0.
  assert code in (0, 1) and expected in out and 'Traceback' not in out, out[
    -2000:
  ]


def test_report_names_its_usage():
  code, out = _run('-m', 'rotjax.report')
  assert code != 0 and 'usage: python -m rotjax.report STUDY_DIR' in out, out[
    -2000:
  ]


@pytest.mark.parametrize(
  'path, presets',
  [
    ('configs/pretext.py', (None, 'smoke', 'cpu')),
    ('configs/finetune.py', (None, 'smoke', 'cpu')),
    ('configs/supervised.py', (None, 'smoke', 'cpu')),
    (
      'configs/imagenette.py',
      ('pretext', 'finetune', 'supervised', 'pretext,cpu'),
    ),
    (
      'configs/imagenet.py',
      (
        'pretext',
        'finetune',
        'supervised',
        'supervised,resnet50,in100',
        'pretext,smoke',
        'study',
        'study,smoke',
        'study,in100',
      ),
    ),
    (
      'configs/study.py',
      (
        None,
        'smoke',
        'cpu',
        'gpu',
        'gpu_labels',
        'gpu_rotations',
        'gpu_smoothing',
        'gpu_models',
      ),
    ),
  ],
)
def test_every_config_and_preset_builds(path, presets):
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    'config_under_test', os.path.join(ROOT, path)
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for preset in presets:
    config = module.get_config(preset)
    assert config.to_dict(), (path, preset)


def test_the_package_imports_light_and_loads_lazily():
  code, out = _run(
    '-c',
    'import sys, rotjax; light = "jax" not in sys.modules; '
    'print(light, callable(rotjax.load))',
  )
  assert code == 0 and out.split()[-2:] == ['True', 'True'], out[-2000:]


@pytest.mark.slow
def test_the_wheel_holds_every_package_and_the_cpp_source(tmp_path):
  """A non-editable install gets every sub-package (each needs its __init__.py) and the
  C++ source that onednn_build compiles on first use."""
  import glob
  import zipfile

  code, out = _run(
    '-m',
    'pip',
    'wheel',
    '--no-deps',
    '--no-build-isolation',
    '-q',
    ROOT,
    '-w',
    str(tmp_path),
  )
  assert code == 0, out[-2000:]
  names = set(zipfile.ZipFile(glob.glob(str(tmp_path / '*.whl'))[0]).namelist())
  packages = {
    os.path.relpath(d, ROOT)
    for d, _, files in os.walk(os.path.join(ROOT, 'rotjax'))
    if any(f.endswith('.py') for f in files)
  }
  for package in packages:
    assert f'{package}/__init__.py' in names, package
  from rotjax.cpu import onednn_build

  for source in onednn_build.SOURCES + onednn_build.HEADERS:
    assert os.path.relpath(source, ROOT) in names, source
  assert 'configs/study.py' in names
