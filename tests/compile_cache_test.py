"""The persistent compilation cache: where it lives, when it is off, and that a second
process loads what the first compiled (stage 3 runs stage 2's programs)."""

import hashlib
import json
import os
import re
import subprocess
import sys

import jax
import pytest

from rotjax import compile_cache
from rotjax import testing
from rotjax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('value', ['0', 'off', '', 'none'])
def test_environment_turns_it_off(monkeypatch, value):
  monkeypatch.setenv(compile_cache.ENV, value)
  assert compile_cache.resolve('auto') is None


def test_auto_lives_under_the_rotjax_cache_keyed_by_machine(
  monkeypatch, tmp_path
):
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  monkeypatch.setenv('ROTJAX_CACHE', str(tmp_path))
  path = compile_cache.resolve('auto')
  assert os.path.dirname(path) == str(tmp_path / 'jit')
  key = os.path.basename(path)
  assert f'jax{jax.__version__}' in key and jax.default_backend() in key
  if jax.default_backend() == 'cpu':
    from rotjax.cpu import isa

    # XLA compiles for the host CPU: another instruction-set class must not share entries.
    assert isa.isa_class() in key
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX2')
    assert compile_cache.resolve('auto') != path or isa.isa_class() == 'avx2'


def test_environment_moves_it_and_wins_over_the_setting(monkeypatch, tmp_path):
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / 'elsewhere'))
  assert compile_cache.resolve('').startswith(str(tmp_path / 'elsewhere'))
  monkeypatch.delenv(compile_cache.ENV)
  assert compile_cache.resolve('') is None
  assert compile_cache.resolve(str(tmp_path / 'mine')).startswith(
    str(tmp_path / 'mine')
  )


def _python(code, env, cwd=ROOT):
  return subprocess.run(
    [sys.executable, '-c', code],
    capture_output=True,
    text=True,
    cwd=cwd,
    env={**os.environ, **env},
    timeout=300,
  )


def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  out = _python(
    'from absl import logging; logging.set_verbosity("info");'
    'from rotjax import compile_cache; import jax.numpy as jnp;'
    'print("path", compile_cache.enable("auto")); print("sum", float(jnp.ones(3).sum()))',
    {compile_cache.ENV: str(blocker / 'jit')},
  )
  assert out.returncode == 0, out.stderr
  assert 'path None' in out.stdout and 'sum 3.0' in out.stdout
  assert 'cannot be written' in out.stderr and str(blocker) in out.stderr


def _stage(workdir, source, cache, **overrides):
  flags = testing.tiny_flags(
    'finetune', workdir, source, num_epochs=1, **overrides
  )
  # Tiny programs compile in well under the cache's 0.5 s floor: store them all here.
  env = {
    **os.environ,
    compile_cache.ENV: str(cache),
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
  }
  out = subprocess.run(
    [sys.executable, '-m', 'rotjax.main', *flags],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return {
    name: source
    for name, source in re.findall(
      r'\] (model init|train step|eval step): (.+?) in [0-9.]+ s', out.stderr
    )
  }


@pytest.mark.slow
@pytest.mark.gpu
def test_stage3_loads_the_programs_stage2_compiled(
  tmp_path, make_config, image_folder
):
  pretext = make_config('pretext', tmp_path / 'pretext', num_epochs=1)
  train.train_and_evaluate(pretext)
  cache = tmp_path / 'jit'
  stage2 = _stage(
    tmp_path / 'stage2', image_folder, cache, init_from=f'{tmp_path}/pretext'
  )
  assert stage2['train step'].startswith('compiled'), stage2
  stage3 = _stage(tmp_path / 'stage3', image_folder, cache)
  # Same model, freeze mask and shapes: the same programs, loaded instead of compiled.
  assert stage3 == {
    'model init': 'loaded from the compilation cache',
    'train step': 'loaded from the compilation cache',
    'eval step': 'loaded from the compilation cache',
  }, stage3
  info = json.load(open(tmp_path / 'stage3' / 'run_info.json'))
  assert info['compile_cache']['path'].startswith(str(cache))


# /proc/cpuinfo excerpts: an x86 core (its `flags`), two aarch64 cores (`Features`), with
# and without SVE (Graviton3 and Graviton2).
X86 = 'processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu sse2 avx2 fma\nvmx flags\t: ept\n'
ARM_SVE = (
  'processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd aes sha2 crc32 atomics '
  'asimddp sve sve2 bf16 i8mm\nCPU implementer\t: 0x41\n'
)
ARM = 'processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd aes sha2 crc32 atomics asimddp\n'


def test_the_cpu_key_reads_x86_flags_and_aarch64_features(
  tmp_path, monkeypatch
):
  files = {}
  for name, text in (
    ('x86', X86),
    ('arm_sve', ARM_SVE),
    ('arm', ARM),
    ('none', 'processor\t: 0\n'),
  ):
    files[name] = tmp_path / name
    files[name].write_text(text)
  read = compile_cache.cpu_features
  assert read(files['x86']) == {'fpu', 'sse2', 'avx2', 'fma'}  # not `vmx flags`
  assert {'sve', 'sve2', 'bf16', 'i8mm'} <= read(files['arm_sve'])
  assert read(files['none']) == read(tmp_path / 'missing') == frozenset()
  if jax.default_backend() != 'cpu':
    return  # the key holds the device kind, not the CPU's features
  from rotjax.cpu import isa

  # This machine's key is what it was before aarch64 counted: its cache stays valid.
  old = hashlib.sha256(' '.join(sorted(isa.cpu_flags())).encode()).hexdigest()[
    :8
  ]
  assert compile_cache.machine_key().endswith(old) or not isa.cpu_flags()
  keys = {}
  for name, path in files.items():
    monkeypatch.setattr(
      compile_cache, 'cpu_features', lambda path=path: read(path)
    )
    keys[name] = compile_cache.machine_key()
  # Each CPU its own folder: an ARM CPU with SVE never shares one with an ARM CPU without.
  assert len(set(keys.values())) == 4, keys
