"""oneDNN for the CPU convolutions and BatchNorms: find it, compile rotjax's C++ side against it, load it.

The C++ side (csrc/onednn_conv.cc, csrc/onednn_batchnorm.cc) is compiled on first use into
~/.cache/rotjax/onednn/ (about 10 s), which needs a C++ compiler and oneDNN's headers
and library: pip's oneDNN 3.2 (pyproject.toml) or the system's (Debian: `apt-get
install libdnnl-dev`), in the order `preferred` gives for this CPU's class. Where none
builds, `load` says why and the callers (onednn_conv.uses_onednn) fall back to XLA.

What oneDNN can do depends on the CPU: bfloat16 kernels exist only with AVX512-BF16
or AMX, and `ONEDNN_MAX_CPU_ISA` lowers what it uses. So nothing is assumed: each
convolution is prepared once (`prepare`), which builds its three primitives and says
how (`Status`), and each dtype is probed on a small one (`supported_dtypes`); each
BatchNorm likewise (`prepare_batchnorm`).
`ROTJAX_ONEDNN=0` turns oneDNN off.
"""

import ctypes
import dataclasses
import enum
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax

from rotjax.cpu import isa

CSRC = Path(__file__).parent / 'csrc'
SOURCES = (CSRC / 'onednn_conv.cc', CSRC / 'onednn_batchnorm.cc')
HEADERS = (CSRC / 'onednn_common.h',)
MIN_VERSION = (2, 0)  # the C++ side speaks the 2.x and 3.x APIs
TARGETS = {
  'forward': 'RotjaxConvForward',
  'backward_data': 'RotjaxConvBackwardData',
  'backward_weights': 'RotjaxConvBackwardWeights',
  'batchnorm_forward': 'RotjaxBatchNormForward',
  'batchnorm_backward': 'RotjaxBatchNormBackward',
}
DTYPE_CODES = {'float32': 0, 'bfloat16': 1}
# The probe convolution: a ResNet 3x3 layer, small enough to build in milliseconds.
_PROBE = dict(n=4, h=8, w=8, c=16, o=16, kernel=3, stride=1, pad=1)


class Status(enum.IntEnum):
  """What RotjaxConvPrepare (csrc/onednn_conv.cc) says of one convolution's primitives."""

  OPTIMIZED = (
    0  # forward, backward-data and backward-weights on optimized kernels
  )
  REFERENCE_ONLY = 1  # some only on oneDNN's slow scalar reference kernels
  UNAVAILABLE = 2  # oneDNN cannot create them (the info says why)
  NO_WEIGHT_GRADIENT = (
    3  # optimized, but no backward-weights kernel: XLA computes that one
  )


_lock = threading.Lock()
_state = {}  # 'ok': bool, 'error': str, 'lib', 'version', once the library was built or failed to
_prepared = {}  # (geometry, dtype) -> (Status, info) from RotjaxConvPrepare
_prepared_norms = {}  # (shape, dtype, relu, epsilon) -> (Status, info, workspace bytes)


def cache_dir() -> Path:
  root = os.environ.get(
    'ROTJAX_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'rotjax')
  )
  return Path(root) / 'onednn'


@dataclasses.dataclass(frozen=True)
class Installation:
  """One oneDNN to build against: where its headers and library are, and its version."""

  source: str  # 'ROTJAX_ONEDNN_ROOT', 'pip' (the onednn-*-cpu-gomp wheels) or 'system'
  include: str
  lib_dir: str | None  # None: the linker's default paths (the system library)
  version: str  # from its dnnl_version.h


def _header_version(include: str) -> str:
  header = Path(include) / 'oneapi' / 'dnnl' / 'dnnl_version.h'
  if not header.exists():
    return ''
  text = header.read_text()
  parts = [
    re.search(rf'#define DNNL_VERSION_{k}\s+(\d+)', text)
    for k in ('MAJOR', 'MINOR', 'PATCH')
  ]
  return '.'.join(m.group(1) for m in parts) if all(parts) else ''


def installations() -> list:
  """Every oneDNN found: ROTJAX_ONEDNN_ROOT alone when set, else the pip wheels'
  (pyproject.toml's onednn-devel-cpu-gomp, installed under sys.prefix) and the system's
  (Debian's libdnnl-dev)."""
  root = os.environ.get('ROTJAX_ONEDNN_ROOT')
  if root:
    places = [('ROTJAX_ONEDNN_ROOT', f'{root}/include', f'{root}/lib')]
  else:
    places = [
      ('pip', f'{sys.prefix}/include', f'{sys.prefix}/lib'),
      ('system', '/usr/include', None),
      ('system', '/usr/local/include', None),
    ]
  found, seen = [], set()
  for source, include, lib_dir in places:
    version = _header_version(include)
    if version and os.path.realpath(include) not in seen:
      seen.add(os.path.realpath(include))
      found.append(Installation(source, include, lib_dir, version))
  return found


def _version_key(inst: Installation) -> tuple:
  return tuple(int(v) for v in inst.version.split('.'))


# Which oneDNN runs a CPU class's training step fastest, from scripts/benchmark.py
# (docs/cpu-kernels.md: the class x oneDNN table). 'newest': the newest found first;
# 'system': the system's (Debian's 2.6) first, then the oldest.
#  - avx2 (and older): 3.x has brgemm convolution kernels for AVX2, 2.x only its older
#    jit ones (fp32 step, Zen 5 under ONEDNN_MAX_CPU_ISA=AVX2: 64 img/s with 3.2, 55 with 2.6).
#  - avx512_bf16: both have brgemm kernels; Debian's 2.6 ran the bf16 step 7% faster than
#    3.2 on a Zen 5 (198 vs 183 img/s, interleaved); with training BatchNorm on oneDNN too
#    (the same kernels in both) 1-2% (211 vs 209, 2026-11-30). avx512 without bf16 follows
#    it, not compared.
#  - amx: 3.2's AMX kernels beat 2.6's: bf16 step 88.9 img/s with pip's 3.2 against 73.1
#    with Debian's 2.6.3 on a 2-core Xeon with AMX (2026-11-29, main at 93aba00).
FASTEST = {
  'older': 'newest',
  'avx2': 'newest',
  'avx512': 'system',
  'avx512_bf16': 'system',
  'amx': 'newest',
}


def preferred(found: list, isa_class: str) -> list:
  """The installations in the order to try them on a CPU of `isa_class` (isa.isa_class),
  fastest first by FASTEST; an unknown class takes the newest."""
  if FASTEST.get(isa_class, 'newest') == 'newest':
    return sorted(found, key=_version_key, reverse=True)
  return sorted(
    found, key=lambda inst: (inst.source != 'system', _version_key(inst))
  )


def _library_path(inst: Installation) -> Path:
  # Keyed on everything the binary depends on: our source, the FFI headers' jaxlib, and
  # the oneDNN it is built against (an upgraded libdnnl-dev gets a fresh build).
  key = hashlib.sha256(
    b''.join(f.read_bytes() for f in SOURCES + HEADERS)
    + importlib.metadata.version('jaxlib').encode()
    + f'{inst.source}:{inst.include}:{inst.version}'.encode()
  )
  return cache_dir() / f'librotjax_onednn_{key.hexdigest()[:16]}.so'


def _compile(target: Path, inst: Installation) -> None:
  cxx = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
  if not cxx:
    raise RuntimeError('no C++ compiler found (set CXX or install g++)')
  target.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target and rename: another process may be loading it.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
  os.close(fd)
  cmd = [
    cxx,
    '-O2',
    '-std=c++17',
    '-shared',
    '-fPIC',
    '-w',
    f'-I{inst.include}',
    f'-I{jax.ffi.include_dir()}',
    *map(str, SOURCES),
    '-o',
    tmp,
  ]
  if inst.lib_dir:  # its own library, found again at run time through the rpath
    cmd += [f'-L{inst.lib_dir}', f'-Wl,-rpath,{inst.lib_dir}']
  cmd += ['-ldnnl']
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode != 0:
    os.unlink(tmp)
    detail = result.stderr.strip().splitlines()
    raise RuntimeError(
      f'compiling {" ".join(f.name for f in SOURCES)} against oneDNN {inst.version} ({inst.source}) '
      f'failed ({" ".join(cmd[:1])}): ' + ' | '.join(detail[:3])
    )
  os.replace(tmp, target)


def disabled() -> bool:
  """ROTJAX_ONEDNN=0: never build or load oneDNN (as on a machine without it)."""
  return os.environ.get('ROTJAX_ONEDNN', '1') == '0'


def _open(path: Path):
  lib = ctypes.cdll.LoadLibrary(str(path))
  lib.RotjaxConvPrepare.argtypes = [
    ctypes.POINTER(ctypes.c_int64),
    ctypes.c_int64,
    ctypes.c_char_p,
    ctypes.c_int64,
  ]
  lib.RotjaxConvPrepare.restype = ctypes.c_int
  lib.RotjaxBatchNormPrepare.argtypes = [
    ctypes.POINTER(ctypes.c_int64),
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_float,
    ctypes.POINTER(ctypes.c_int64),
    ctypes.c_char_p,
    ctypes.c_int64,
  ]
  lib.RotjaxBatchNormPrepare.restype = ctypes.c_int

  def text(fn):
    fn.argtypes = [ctypes.c_char_p, ctypes.c_int64]
    out = ctypes.create_string_buffer(64)
    fn(out, len(out))
    return out.value.decode()

  version, headers = (
    text(lib.RotjaxOneDNNVersion),
    text(lib.RotjaxOneDNNHeaderVersion),
  )
  if version.split('.')[:2] != headers.split('.')[:2]:
    raise RuntimeError(
      f'built against oneDNN {headers} headers but runs with the {version} '
      'library'
    )
  if tuple(int(v) for v in version.split('.')[:2]) < MIN_VERSION:
    raise RuntimeError(
      f'oneDNN {version} is too old (rotjax needs >= '
      f'{".".join(map(str, MIN_VERSION))})'
    )
  return lib, version


def build_and_open(inst: Installation):
  """Compiles (once per machine) and opens the library built against `inst`."""
  path = _library_path(inst)
  if not path.exists():
    logging.info(
      'Compiling the oneDNN %s (%s) kernels into %s',
      inst.version,
      inst.source,
      path,
    )
    _compile(path, inst)
  return _open(path)


# What building or loading the library can raise (a missing compiler or header, a failed
# link or dlopen, a missing symbol, a bad version string): each means "not this oneDNN".
_LOAD_ERRORS = (OSError, RuntimeError, AttributeError, ValueError)


def load() -> bool:
  """Builds (once per machine) and registers the oneDNN kernels; False if they can't be."""
  with _lock:
    if 'ok' not in _state:
      try:
        if disabled():
          raise RuntimeError('turned off by ROTJAX_ONEDNN=0')
        found = preferred(installations(), isa.isa_class())
        if not found:
          raise RuntimeError(
            'no oneDNN headers found (pip install onednn-devel-cpu-gomp, '
            'or apt-get install libdnnl-dev)'
          )
        errors = []
        for inst in found:  # the first that builds and loads
          try:
            lib, version = build_and_open(inst)
            break
          except _LOAD_ERRORS as e:
            errors.append(f'{inst.source} oneDNN {inst.version}: {e}')
        else:
          raise RuntimeError('; '.join(errors))
        for name in TARGETS.values():
          jax.ffi.register_ffi_target(
            name, jax.ffi.pycapsule(getattr(lib, name)), platform='cpu'
          )
        _state.update(
          ok=True, error='', lib=lib, version=version, installation=inst
        )
      except _LOAD_ERRORS as e:
        _state.update(
          ok=False, error=str(e), lib=None, version='', installation=None
        )
        logging.warning("oneDNN convolutions unavailable, using XLA's: %s", e)
  return _state['ok']


def attempted() -> bool:
  """Whether this process has tried to build or load oneDNN (model.conv=xla never does)."""
  return 'ok' in _state


def unavailable_reason() -> str:
  load()
  return _state['error']


def version() -> str:
  """The oneDNN runtime's version ('' when it is not loaded)."""
  return _state.get('version', '') if load() else ''


def source() -> str:
  """Which oneDNN is loaded: 'pip', 'system' or 'ROTJAX_ONEDNN_ROOT' ('' when none)."""
  return _state['installation'].source if load() else ''


def prepare(geometry: tuple, dtype: str) -> tuple[Status, str]:
  """(Status, info) of one convolution (`geometry` from `geometry`), built once per process.

  Builds and caches its three oneDNN primitives, so a failure shows up here, while
  the model is traced, not inside a running step.
  """
  key = (geometry, dtype)
  if key not in _prepared:
    out = ctypes.create_string_buffer(1024)
    status = _state['lib'].RotjaxConvPrepare(
      (ctypes.c_int64 * 15)(*geometry), DTYPE_CODES[dtype], out, len(out)
    )
    _prepared[key] = (Status(status), out.value.decode(errors='replace'))
  return _prepared[key]


def prepare_batchnorm(
  shape, dtype: str, relu: bool, epsilon: float
) -> tuple[Status, str, int]:
  """(Status, info, workspace bytes) of one training-mode BatchNorm (+ ReLU) over an NHWC
  `shape`, its forward and backward primitives built once per process (while tracing).
  Status is OPTIMIZED, REFERENCE_ONLY or UNAVAILABLE; the workspace holds the ReLU's mask."""
  key = (tuple(shape), dtype, bool(relu), float(epsilon))
  if key not in _prepared_norms:
    out = ctypes.create_string_buffer(1024)
    workspace = ctypes.c_int64(0)
    status = _state['lib'].RotjaxBatchNormPrepare(
      (ctypes.c_int64 * 4)(*shape),
      DTYPE_CODES[dtype],
      int(relu),
      epsilon,
      ctypes.byref(workspace),
      out,
      len(out),
    )
    _prepared_norms[key] = (
      Status(status),
      out.value.decode(errors='replace'),
      workspace.value,
    )
  return _prepared_norms[key]


def declined(status: Status, info: str) -> str:
  """Why oneDNN does not take a convolution or BatchNorm of this `status` (its `info`)."""
  return (
    'oneDNN has only its slow reference kernels for it: '
    if status == Status.REFERENCE_ONLY
    else 'oneDNN cannot create it: '
  ) + info


def out_hw(x_shape, w_shape, strides, padding) -> list:
  """Output height and width of an NHWC x HWIO convolution."""
  return [
    (x_shape[1 + i] + sum(padding[i]) - w_shape[i]) // strides[i] + 1
    for i in range(2)
  ]


def geometry(x_shape, w_shape, strides, padding) -> tuple:
  out_hw_ = out_hw(x_shape, w_shape, strides, padding)
  (pt, pb), (pl, pr) = padding
  return (
    *x_shape,
    w_shape[0],
    w_shape[1],
    w_shape[3],
    *out_hw_,
    *strides,
    pt,
    pb,
    pl,
    pr,
  )


def probe(dtype: str):
  """(Status, info) of a small ResNet convolution in `dtype`: what oneDNN can do here."""
  if not load():
    return Status.UNAVAILABLE, _state['error']
  g = _PROBE
  return prepare(
    geometry(
      (g['n'], g['h'], g['w'], g['c']),
      (g['kernel'], g['kernel'], g['c'], g['o']),
      (g['stride'],) * 2,
      ((g['pad'],) * 2,) * 2,
    ),
    dtype,
  )


def supported_dtypes() -> tuple:
  """The dtypes oneDNN has optimized convolution kernels for on this CPU."""
  return tuple(d for d in DTYPE_CODES if probe(d)[0] == Status.OPTIMIZED)
