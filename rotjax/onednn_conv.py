"""Convolutions on the CPU through oneDNN, as XLA FFI custom calls with a custom VJP.

Why: XLA's CPU backend runs a bfloat16 convolution as a float32 Eigen convolution
with converts around it, so bf16 gives the convolutions (nearly all of a ResNet's
FLOPs) nothing on CPU. oneDNN has native bf16 kernels (AVX512-BF16, AMX) and is
what PyTorch's CPU convolutions run on. `conv_general_dilated` below is a drop-in
for `lax.conv_general_dilated` that Flax's `nn.Conv` takes as an argument; it
sends the plain 2-D NHWC/HWIO case to oneDNN and everything else to XLA.

The C++ side (csrc/onednn_conv.cc) is compiled on first use into
~/.cache/rotjax/onednn/ (about 10 s), which needs a C++ compiler and oneDNN's
headers and library: pip's oneDNN 3.2 (pyproject.toml) or the system's
(Debian: `apt-get install libdnnl-dev`), whichever `preferred` puts first for
this CPU. Where that fails, 'auto' falls back to XLA's convolution and says why
once in the log.

What oneDNN can do depends on the CPU: bfloat16 kernels exist only with
AVX512-BF16 or AMX, and `ONEDNN_MAX_CPU_ISA` lowers what it uses. So nothing is
assumed: each dtype is probed once (`supported_dtypes`), and every convolution
is prepared when the model is traced (`_prepare`); one oneDNN cannot take, or
takes only with its slow reference kernels, goes to XLA under 'auto' and is an
`OneDNNConvError` under 'onednn'. `ROTJAX_ONEDNN=0` turns oneDNN off.
"""
import contextlib
import ctypes
import dataclasses
import functools
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
import numpy as np
from jax import lax

IMPLS = ('auto', 'xla', 'onednn')
SOURCE = Path(__file__).parent / 'csrc' / 'onednn_conv.cc'
MIN_VERSION = (2, 0)   # the C++ side speaks the 2.x and 3.x APIs
HINT = 'set model.conv=xla to use XLA\'s convolutions instead'
_TARGETS = {'forward': 'RotjaxConvForward', 'backward_data': 'RotjaxConvBackwardData',
            'backward_weights': 'RotjaxConvBackwardWeights'}
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
_DTYPE_CODES = {'float32': 0, 'bfloat16': 1}
# The probe convolution: a ResNet 3x3 layer, small enough to build in milliseconds.
_PROBE = dict(n=4, h=8, w=8, c=16, o=16, kernel=3, stride=1, pad=1)

_lock = threading.Lock()
_state = {}   # 'ok': bool, 'error': str, 'lib', 'version', once the library was built or failed to
_prepared = {}   # (geometry, dtype) -> (status, info) from RotjaxConvPrepare
_fallbacks_logged = set()


class OneDNNConvError(RuntimeError):
  """A convolution oneDNN could not create or run; the message names its shape and dtype."""


def cache_dir() -> Path:
  root = os.environ.get('ROTJAX_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'rotjax'))
  return Path(root) / 'onednn'


@dataclasses.dataclass(frozen=True)
class Installation:
  """One oneDNN to build against: where its headers and library are, and its version."""
  source: str          # 'ROTJAX_ONEDNN_ROOT', 'pip' (the onednn-*-cpu-gomp wheels) or 'system'
  include: str
  lib_dir: str | None  # None: the linker's default paths (the system library)
  version: str         # from its dnnl_version.h


def _header_version(include: str) -> str:
  header = Path(include) / 'oneapi' / 'dnnl' / 'dnnl_version.h'
  if not header.exists():
    return ''
  text = header.read_text()
  parts = [re.search(rf'#define DNNL_VERSION_{k}\s+(\d+)', text) for k in ('MAJOR', 'MINOR', 'PATCH')]
  return '.'.join(m.group(1) for m in parts) if all(parts) else ''


def installations() -> list:
  """Every oneDNN found: ROTJAX_ONEDNN_ROOT alone when set, else the pip wheels'
  (pyproject.toml's onednn-devel-cpu-gomp, installed under sys.prefix) and the system's
  (Debian's libdnnl-dev)."""
  root = os.environ.get('ROTJAX_ONEDNN_ROOT')
  if root:
    places = [('ROTJAX_ONEDNN_ROOT', f'{root}/include', f'{root}/lib')]
  else:
    places = [('pip', f'{sys.prefix}/include', f'{sys.prefix}/lib'),
              ('system', '/usr/include', None), ('system', '/usr/local/include', None)]
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
# (README, Performance: the class x oneDNN table). 'newest': the newest found first;
# 'system': the system's (Debian's 2.6) first, then the oldest.
#  - avx2 (and older): 3.x has brgemm convolution kernels for AVX2, 2.x only its older
#    jit ones (fp32 step, Zen 5 under ONEDNN_MAX_CPU_ISA=AVX2: 64 img/s with 3.2, 55 with 2.6).
#  - avx512_bf16: both have brgemm kernels; Debian's 2.6 ran the bf16 step 7% faster than
#    3.2 on a Zen 5 (198 vs 183 img/s, interleaved). avx512 without bf16 follows it,
#    unmeasured.
#  - amx: 3.2's AMX kernels beat 2.6's: bf16 step 88.9 img/s with pip's 3.2 against 73.1
#    with Debian's 2.6.3 on a 2-core Xeon with AMX (issue 25, 2026-11-29, main at 93aba00).
FASTEST = {'older': 'newest', 'avx2': 'newest', 'avx512': 'system', 'avx512_bf16': 'system',
           'amx': 'newest'}


def preferred(found: list, isa_class: str) -> list:
  """The installations in the order to try them on a CPU of `isa_class` (hardware.isa_class),
  fastest first by FASTEST; an unknown class takes the newest."""
  if FASTEST.get(isa_class, 'newest') == 'newest':
    return sorted(found, key=_version_key, reverse=True)
  return sorted(found, key=lambda inst: (inst.source != 'system', _version_key(inst)))


def _library_path(inst: Installation) -> Path:
  # Keyed on everything the binary depends on: our source, the FFI headers' jaxlib, and
  # the oneDNN it is built against (an upgraded libdnnl-dev gets a fresh build).
  key = hashlib.sha256(SOURCE.read_bytes() + importlib.metadata.version('jaxlib').encode()
                       + f'{inst.source}:{inst.include}:{inst.version}'.encode())
  return cache_dir() / f'librotjax_onednn_{key.hexdigest()[:16]}.so'


def _compile(target: Path, inst: Installation) -> None:
  cxx = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
  if not cxx:
    raise RuntimeError('no C++ compiler found (set CXX or install g++)')
  target.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target and rename: another process may be loading it.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
  os.close(fd)
  cmd = [cxx, '-O2', '-std=c++17', '-shared', '-fPIC', '-w', f'-I{inst.include}',
         f'-I{jax.ffi.include_dir()}', str(SOURCE), '-o', tmp]
  if inst.lib_dir:   # its own library, found again at run time through the rpath
    cmd += [f'-L{inst.lib_dir}', f'-Wl,-rpath,{inst.lib_dir}']
  cmd += ['-ldnnl']
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode != 0:
    os.unlink(tmp)
    detail = result.stderr.strip().splitlines()
    raise RuntimeError(f'compiling {SOURCE.name} against oneDNN {inst.version} ({inst.source}) '
                       f'failed ({" ".join(cmd[:1])}): ' + ' | '.join(detail[:3]))
  os.replace(tmp, target)


def disabled() -> bool:
  """ROTJAX_ONEDNN=0: never build or load oneDNN (as on a machine without it)."""
  return os.environ.get('ROTJAX_ONEDNN', '1') == '0'


def _open(path: Path):
  lib = ctypes.cdll.LoadLibrary(str(path))
  lib.RotjaxConvPrepare.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64,
                                    ctypes.c_char_p, ctypes.c_int64]
  lib.RotjaxConvPrepare.restype = ctypes.c_int

  def text(fn):
    fn.argtypes = [ctypes.c_char_p, ctypes.c_int64]
    out = ctypes.create_string_buffer(64)
    fn(out, len(out))
    return out.value.decode()
  version, headers = text(lib.RotjaxOneDNNVersion), text(lib.RotjaxOneDNNHeaderVersion)
  if version.split('.')[:2] != headers.split('.')[:2]:
    raise RuntimeError(f'built against oneDNN {headers} headers but runs with the {version} '
                       'library')
  if tuple(int(v) for v in version.split('.')[:2]) < MIN_VERSION:
    raise RuntimeError(f'oneDNN {version} is too old (rotjax needs >= '
                       f'{".".join(map(str, MIN_VERSION))})')
  return lib, version


def _build_and_open(inst: Installation):
  path = _library_path(inst)
  if not path.exists():
    logging.info('Compiling the oneDNN %s (%s) convolution kernels into %s', inst.version,
                 inst.source, path)
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
        from rotjax import hardware   # here: hardware imports this module
        found = preferred(installations(), hardware.isa_class())
        if not found:
          raise RuntimeError('no oneDNN headers found (pip install onednn-devel-cpu-gomp, '
                             'or apt-get install libdnnl-dev)')
        errors = []
        for inst in found:   # the first that builds and loads
          try:
            lib, version = _build_and_open(inst)
            break
          except _LOAD_ERRORS as e:
            errors.append(f'{inst.source} oneDNN {inst.version}: {e}')
        else:
          raise RuntimeError('; '.join(errors))
        for name in _TARGETS.values():
          jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform='cpu')
        _state.update(ok=True, error='', lib=lib, version=version, installation=inst)
      except _LOAD_ERRORS as e:
        _state.update(ok=False, error=str(e), lib=None, version='', installation=None)
        logging.warning('oneDNN convolutions unavailable, using XLA\'s: %s', e)
  return _state['ok']


def unavailable_reason() -> str:
  load()
  return _state['error']


def version() -> str:
  """The oneDNN runtime's version ('' when it is not loaded)."""
  return _state.get('version', '') if load() else ''


def source() -> str:
  """Which oneDNN is loaded: 'pip', 'system' or 'ROTJAX_ONEDNN_ROOT' ('' when none)."""
  return _state['installation'].source if load() else ''


def _prepare(geometry: tuple, dtype: str):
  """(status, info) for one convolution: 0 optimized kernels, 1 reference only, 2 none,
  3 optimized but for the weight gradient (which XLA then computes).

  Builds and caches its three oneDNN primitives, so a failure shows up here, while
  the model is traced, not inside a running step.
  """
  key = (geometry, dtype)
  if key not in _prepared:
    out = ctypes.create_string_buffer(1024)
    status = _state['lib'].RotjaxConvPrepare((ctypes.c_int64 * 15)(*geometry),
                                             _DTYPE_CODES[dtype], out, len(out))
    _prepared[key] = (status, out.value.decode(errors='replace'))
  return _prepared[key]


def _out_hw(x_shape, w_shape, strides, padding) -> list:
  """Output height and width of an NHWC x HWIO convolution."""
  return [(x_shape[1 + i] + sum(padding[i]) - w_shape[i]) // strides[i] + 1 for i in range(2)]


def _geometry(x_shape, w_shape, strides, padding) -> tuple:
  out_hw = _out_hw(x_shape, w_shape, strides, padding)
  (pt, pb), (pl, pr) = padding
  return (*x_shape, w_shape[0], w_shape[1], w_shape[3], *out_hw, *strides, pt, pb, pl, pr)


def probe(dtype: str):
  """(status, info) of a small ResNet convolution in `dtype`: what oneDNN can do here."""
  if not load():
    return 2, _state['error']
  g = _PROBE
  return _prepare(_geometry((g['n'], g['h'], g['w'], g['c']), (g['kernel'], g['kernel'], g['c'], g['o']),
                            (g['stride'],) * 2, ((g['pad'],) * 2,) * 2), dtype)


def supported_dtypes() -> tuple:
  """The dtypes oneDNN has optimized convolution kernels for on this CPU."""
  return tuple(d for d in _DTYPE_CODES if probe(d)[0] == 0)


@contextlib.contextmanager
def named_errors():
  """Re-raises a oneDNN failure inside a compiled step as OneDNNConvError (also a decorator)."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if 'rotjax oneDNN conv' in str(e):
      raise OneDNNConvError(str(e)) from e
    raise


def _attrs(strides, padding):
  (pt, pb), (pl, pr) = padding
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]), pad_top=np.int64(pt),
              pad_bottom=np.int64(pb), pad_left=np.int64(pl), pad_right=np.int64(pr))


def _call(kind, out_shape, out_dtype, a, b, strides, padding):
  return jax.ffi.ffi_call(_TARGETS[kind], jax.ShapeDtypeStruct(out_shape, out_dtype))(
      a, b, **_attrs(strides, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x, w, strides, padding, xla_dw=False):
  """NHWC x HWIO -> NHWC, no dilation or groups; strides (h, w), padding ((t, b), (l, r)).

  xla_dw: the weight gradient by XLA's convolution, for shapes whose oneDNN
  backward-weights kernel is passed over (status 3 of `_prepare`).
  """
  out_hw = _out_hw(x.shape, w.shape, strides, padding)
  return _call('forward', (x.shape[0], *out_hw, w.shape[3]), x.dtype, x, w, strides, padding)


def _conv2d_fwd(x, w, strides, padding, xla_dw):
  return conv2d(x, w, strides, padding, xla_dw), (x, w)


def _conv2d_bwd(strides, padding, xla_dw, residuals, dy):
  x, w = residuals
  dy = dy.astype(x.dtype)
  dx = _call('backward_data', x.shape, x.dtype, dy, w, strides, padding)
  if xla_dw:
    _, pullback = jax.vjp(lambda w_: lax.conv_general_dilated(x, w_, strides, padding,
                                                              dimension_numbers=_NHWC), w)
    dw, = pullback(dy)
  else:
    dw = _call('backward_weights', w.shape, w.dtype, x, dy, strides, padding)
  return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _supported(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count) -> bool:
  plain = lambda d: d is None or all(v == 1 for v in d)
  return (lhs.ndim == 4 and lhs.dtype == rhs.dtype and lhs.dtype.name in ('float32', 'bfloat16')
          and not isinstance(padding, str) and plain(lhs_dilation) and plain(rhs_dilation)
          and feature_group_count == 1
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC)


def _takes(lhs, rhs, strides, padding, strict: bool) -> int | None:
  """Whether oneDNN runs this convolution (the `_prepare` status 0 or 3), else XLA's
  (under model.conv=onednn, `strict`, that is an error naming the convolution)."""
  dtype = lhs.dtype.name
  status, info = _prepare(_geometry(lhs.shape, rhs.shape, strides, padding), dtype)
  if status in (0, 3):
    return status
  why = ('oneDNN has only its slow reference kernels for it: ' if status == 1
         else 'oneDNN cannot create it: ') + info
  if strict:
    raise OneDNNConvError(f'model.conv=onednn: a {dtype} convolution of input {tuple(lhs.shape)} '
                          f'and kernel {tuple(rhs.shape)}: {why}; {HINT}')
  if (dtype, status) not in _fallbacks_logged:
    _fallbacks_logged.add((dtype, status))
    logging.warning('A %s convolution (input %s, kernel %s) runs on XLA: %s', dtype,
                    tuple(lhs.shape), tuple(rhs.shape), why)
  return None


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None,
                         strict=False, **kwargs):
  """`lax.conv_general_dilated` with the plain 2-D NHWC case on oneDNN (see module doc)."""
  if (not kwargs and load() and _supported(lhs, rhs, padding, lhs_dilation, rhs_dilation,
                                dimension_numbers, feature_group_count)):
    strides, pads = tuple(window_strides), tuple(tuple(p) for p in padding)
    status = _takes(lhs, rhs, strides, pads, strict)
    if status is not None:
      return conv2d(lhs, rhs, strides, pads, status == 3)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, precision=precision,
                                  **kwargs)


conv_general_dilated_strict = functools.partial(conv_general_dilated, strict=True)


def check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f'model.conv={impl!r} is unknown; allowed: {IMPLS}')


def uses_onednn(impl: str, dtype) -> tuple:
  """(whether `model.conv=impl` runs `dtype` convolutions on oneDNN here, why).

  'auto': oneDNN when JAX's default backend is the CPU, the kernels load, and oneDNN has
  optimized kernels for the dtype on this CPU; 'onednn' insists (OneDNNConvError says why
  it can't); 'xla' never loads them.
  """
  check_impl(impl)
  dtype = np.dtype(dtype).name
  backend = jax.default_backend()
  if impl == 'xla':
    return False, 'model.conv=xla'
  if backend != 'cpu':
    if impl == 'onednn':
      raise OneDNNConvError(f'model.conv=onednn runs only on the CPU; this run\'s backend is '
                            f'{backend}: use model.conv=auto or xla')
    return False, f'XLA\'s convolutions on {backend}'
  if not load():
    if impl == 'onednn':
      raise OneDNNConvError(f'model.conv=onednn, but the oneDNN kernels are unavailable: '
                            f'{_state["error"]}; {HINT}')
    return False, f'oneDNN unavailable ({_state["error"]})'
  status, info = probe(dtype)
  if status != 0:
    if impl == 'onednn':
      raise OneDNNConvError(f'model.conv=onednn, but oneDNN {version()} has no optimized {dtype} '
                            f'convolution on this CPU ({info}); {HINT} or another model.dtype')
    return False, f'oneDNN {version()} has no optimized {dtype} convolution on this CPU ({info})'
  return True, f'oneDNN {version()} {dtype} kernels ({info})'


def resolve(impl: str, dtype='float32'):
  """The convolution function for `model.conv` and the compute dtype: None means XLA's own."""
  use, _ = uses_onednn(impl, dtype)
  if not use:
    return None
  return conv_general_dilated_strict if impl == 'onednn' else conv_general_dilated
