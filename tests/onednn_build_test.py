"""Finding, building and loading oneDNN: which one each CPU class tries first, what counts
as an installation, and every way a build can fail turning into a fallback with a reason."""

import os
import subprocess
import sys

import pytest

from rotjax.cpu import onednn_build

pytestmark = pytest.mark.cpu_only('oneDNN, a CPU-only library')

PROGRAMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'programs')
_HEADERS = bool(onednn_build.installations())
# .ci/run installs oneDNN and sets ROTJAX_REQUIRE_ONEDNN=1, so there these tests never skip.
needs_onednn = pytest.mark.skipif(
  (not _HEADERS or onednn_build.disabled())
  and os.environ.get('ROTJAX_REQUIRE_ONEDNN') != '1',
  reason='no oneDNN installed (pip install onednn-devel-cpu-gomp) or ROTJAX_ONEDNN=0',
)
_BOTH = {i.source for i in onednn_build.installations()} >= {'pip', 'system'}


@needs_onednn
def test_kernels_build_and_load():
  assert onednn_build.load(), onednn_build.unavailable_reason()


def test_without_a_compiler_auto_falls_back_and_onednn_says_why(tmp_path):
  env = dict(
    os.environ,
    CXX=str(tmp_path / 'no-such-compiler'),
    ROTJAX_CACHE=str(tmp_path),
  )
  out = subprocess.run(
    [sys.executable, os.path.join(PROGRAMS, 'no_compiler.py')],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  assert (
    'model.conv=onednn, but the oneDNN kernels are unavailable' in out.stdout
  )


@pytest.mark.parametrize(
  'isa_class, first',
  [
    ('older', 'pip'),
    ('avx2', 'pip'),
    ('avx512', 'system'),
    ('avx512_bf16', 'system'),
    ('amx', 'pip'),
  ],
)
def test_which_onednn_each_cpu_class_tries_first(isa_class, first):
  """The measured fastest first: 3.2 without AVX-512 and on AMX, Debian's 2.6 with AVX-512."""
  inst = lambda source, version: onednn_build.Installation(
    source, '/x', None, version
  )
  system, pip = inst('system', '2.6.3'), inst('pip', '3.2.0')
  expected = [pip, system] if first == 'pip' else [system, pip]
  assert onednn_build.preferred([system, pip], isa_class) == expected
  assert onednn_build.preferred([pip, system], isa_class) == expected
  assert onednn_build.preferred([pip], isa_class) == [pip]
  assert onednn_build.preferred([], isa_class) == []


def test_every_cpu_class_has_a_measured_choice():
  from rotjax.cpu import isa

  assert set(onednn_build.FASTEST) == {name for name, _ in isa.ISA_CLASSES}


def test_found_installations_are_real(tmp_path):
  """Only directories holding dnnl_version.h count; ROTJAX_ONEDNN_ROOT replaces the search."""
  root = tmp_path / 'onednn'
  (root / 'include' / 'oneapi' / 'dnnl').mkdir(parents=True)
  (root / 'include' / 'oneapi' / 'dnnl' / 'dnnl_version.h').write_text(
    '#define DNNL_VERSION_MAJOR 3\n#define DNNL_VERSION_MINOR 9\n#define DNNL_VERSION_PATCH 1\n'
  )
  program = os.path.join(PROGRAMS, 'onednn_installations.py')
  run = lambda **env: subprocess.run(
    [sys.executable, program],
    capture_output=True,
    text=True,
    check=True,
    env=dict(os.environ, **env),
  ).stdout.strip()
  assert (
    run(ROTJAX_ONEDNN_ROOT=str(root)) == "[('ROTJAX_ONEDNN_ROOT', '3.9.1')]"
  )
  assert run(ROTJAX_ONEDNN_ROOT=str(tmp_path / 'empty')) == '[]'


@pytest.mark.slow
@pytest.mark.skipif(
  not _BOTH or onednn_build.disabled(),
  reason='needs the pip and the system oneDNN',
)
def test_headers_of_one_onednn_with_the_library_of_another_are_refused(
  tmp_path,
):
  """A build whose headers and library differ never loads; load() goes on to the next."""
  out = subprocess.run(
    [sys.executable, os.path.join(PROGRAMS, 'mixed_onednn.py')],
    capture_output=True,
    text=True,
    env=dict(os.environ, ROTJAX_CACHE=str(tmp_path)),
  )
  assert out.returncode == 0, out.stderr[-2000:]  # an error, never a crash
  lines = out.stdout.splitlines()
  assert len(lines) == 2 and all(l.startswith('REFUSED') for l in lines), lines
