r"""Side-by-side training speed: rotjax against PyTorch, in one run.

  python scripts/benchmark.py                 # ResNet18 (CIFAR stem), batch 128, Adam
  python scripts/benchmark.py --quick         # fewer configurations (still 2 rounds x 6 steps)
  python scripts/benchmark.py --cpu avx2      # every row as on an AVX2-only CPU (emulated)
  python scripts/benchmark.py --cpu avx512    # ... as on AVX-512 without bf16 (emulated)
  python scripts/benchmark.py --json out.json
  python scripts/benchmark.py --data          # the input pipeline: scripts/data_benchmark.py

Both convolution paths (oneDNN, XLA) run in both dtypes, plus the default
(`model.dtype=auto`, `model.conv=auto`, `model.norm=auto`: what this machine chooses,
rotjax/compute.py) and the default with XLA's BatchNorm, so the table shows whether `auto`
picked the fastest path here. The header names the
CPU, its ISA class (avx2 / avx512 / avx512_bf16 / amx) and oneDNN's version.

Every configuration runs in its own child process (XLA flags are fixed when a
process starts), on the same random in-memory data, once per round; rounds
interleave the configurations so that a slow spell of the shared machine hits
them alike. The table shows the median images/s with min and max over all
repeats, and ratios to PyTorch taken within each round: their median and every
round's own, flagged where the rounds disagree by more than 10% (one round's
answer is then not the other's). "x same" compares at equal precision with the
faster of PyTorch eager and torch.compile (inductor) in the row's dtype. Rows
for PyTorch appear when torch is installed (`pip install -e '.[bench]'`); rotjax
never needs it. A row whose child fails (a torch.compile that cannot build, say)
is a row with its error.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'


# ---------------------------------------------------------------- workers (child processes)


def _timed(fn, steps, repeats, images_per_step):
  """images/s of `fn` (which must block): every repeat of `steps` calls, and their median/min/max."""
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      fn()
    rates.append(steps * images_per_step / (time.perf_counter() - start))
  return stats(rates)


def stats(rates):
  return {
    'median': float(np.median(rates)),
    'min': float(min(rates)),
    'max': float(max(rates)),
    'rates': [float(r) for r in rates],
  }


def rotjax_worker(opts):
  sys.path.insert(0, ROOT)
  from rotjax.cpu import platform as rj_platform

  rj_platform.configure()  # what a CLI run gets (XLA flags come in through the environment)
  import jax
  from configs import supervised
  from rotjax import compute as compute_lib
  from rotjax import data_parallel, steps
  from rotjax import run_state

  config = supervised.get_config()
  config.model.width, config.model.dtype = (
    opts['width'],
    opts.get('dtype', 'auto'),
  )
  config.model.conv = opts.get('conv', 'auto')
  config.model.norm = opts.get('norm', 'auto')
  resolved = compute_lib.resolve(config.model, jax.local_device_count())
  compute = resolved.record()
  config.batch_size, config.eval_batch_size = opts['batch'], opts['eval_batch']
  config.parallel = opts.get('parallel', 'auto')
  devices = jax.local_devices()
  dp = data_parallel.DataParallel(config.parallel, devices)
  state, mask, _, _ = run_state.create_train_state(
    config, 10, steps_per_epoch=100, compute=resolved
  )
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.integers(0, 256, (opts['batch'], 32, 32, 3), dtype=np.uint8),
    'label': rng.integers(0, 10, opts['batch']).astype(np.int32),
  }
  sharded = dp.put_batch(batch)
  p_step = steps.compiled_train_step(config, mask, dp, smoothing=0.1)
  holder = {'state': dp.put(state)}
  keys = dp.put(jax.random.key(0))

  def step():
    holder['state'], metrics = p_step(holder['state'], sharded, keys)
    jax.block_until_ready(metrics)

  start = time.perf_counter()
  step()
  first_call = time.perf_counter() - start
  step()  # one more warm-up
  result = {
    'train': _timed(step, opts['steps'], opts['repeats'], opts['batch'])
  }
  result['compile_s'] = first_call - opts['batch'] / result['train']['median']
  result['compute'] = compute
  result['dtype'] = compute['dtype']
  result['parallel'] = dp.mode

  eval_batch = {
    'image': rng.integers(
      0, 256, (opts['eval_batch'], 32, 32, 3), dtype=np.uint8
    ),
    'label': np.zeros(opts['eval_batch'], np.int32),
    'mask': np.ones(opts['eval_batch'], np.float32),
  }
  eval_sharded = dp.put_batch(eval_batch)
  p_eval = steps.compiled_eval_step(config, dp, smoothing=0.1)
  evaluate = lambda: jax.block_until_ready(
    p_eval(holder['state'], eval_sharded, keys)
  )
  evaluate()
  result['eval'] = _timed(
    evaluate, max(1, opts['steps'] // 2), opts['repeats'], opts['eval_batch']
  )

  # The real loop in every round: its ratio to PyTorch is judged per round like the step's.
  if opts.get('loop'):
    result['loop'] = _real_loop(opts, config)
  if not opts.get('extras', True):
    return result
  # XLA counts nothing inside the oneDNN custom calls: FLOPs come from rows on XLA's convolutions.
  if opts.get('conv') == 'xla':
    result.update(
      _xla_flops(p_step, (holder['state'], sharded, keys), len(devices))
    )
  result['devices'] = [str(d) for d in devices]
  result['backend'] = jax.default_backend()
  return result


def _xla_flops(p_step, args, num_devices) -> dict:
  """FLOPs of one train step as XLA counts them (one device's share times devices)."""
  try:
    cost = p_step.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {'flops_per_step': float(cost.get('flops', 0.0)) * num_devices}
  except Exception as e:  # cost analysis is best-effort across backends
    return {'flops_per_step': None, 'flops_error': str(e)[:200]}


def _real_loop(opts, config):
  """images/s of train_and_evaluate over a whole epoch (input pipeline included), epoch 2."""
  import tempfile
  from rotjax import input_pipeline, memory_loader, train

  rng = np.random.default_rng(1)
  n = opts['batch'] * opts['loop_steps']
  split = lambda k: memory_loader.Split(
    rng.integers(0, 256, (k, 32, 32, 3), dtype=np.uint8),
    rng.integers(0, 10, k).astype(np.int32),
  )
  dataset = input_pipeline.Dataset(
    split(n),
    split(opts['eval_batch']),
    split(opts['eval_batch']),
    tuple(str(i) for i in range(10)),
  )
  with tempfile.TemporaryDirectory() as workdir:
    config.workdir = workdir
    config.num_epochs = 2
    config.progress = False
    config.log_every_steps = opts['loop_steps']
    train.train_and_evaluate(config, dataset=dataset)
    from rotjax import metrics

    rows = metrics.read_metrics(workdir)
  return rows[-1]['images_per_second']


def machine_worker(opts):
  """What `auto` picks here, and why (compute.resolve), as a rotjax run would see it."""
  sys.path.insert(0, ROOT)
  from rotjax.cpu import platform as rj_platform

  rj_platform.configure()
  from configs import common
  from rotjax import compute as compute_lib

  return compute_lib.resolve(common.get_config().model).record()


def torch_worker(opts):
  import torch
  import torch.nn.functional as F
  from torch_resnet import ResNet18  # scripts/torch_resnet.py, beside this file

  torch.manual_seed(0)
  model = ResNet18(opts['width'])
  memory = (
    torch.channels_last if opts['channels_last'] else torch.contiguous_format
  )
  model = model.to(memory_format=memory)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  if opts.get('compile'):
    # Inductor on CPU: forward and backward as generated C++ (gcc), oneDNN convolutions;
    # the first call compiles (cached in inductor's default cache for later rounds).
    model = torch.compile(model)
  x = torch.randn(opts['batch'], 3, 32, 32).to(memory_format=memory)
  y = torch.randint(0, 10, (opts['batch'],))
  autocast = lambda: torch.autocast(
    'cpu', dtype=torch.bfloat16, enabled=opts['dtype'] == 'bfloat16'
  )

  def step():
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    loss.backward()
    optimizer.step()

  start = time.perf_counter()
  step()
  first_call = time.perf_counter() - start
  step()
  result = {
    'train': _timed(step, opts['steps'], opts['repeats'], opts['batch'])
  }
  if opts.get('compile'):  # eager has nothing to compile
    result['compile_s'] = first_call - opts['batch'] / result['train']['median']
  xe = torch.randn(opts['eval_batch'], 3, 32, 32).to(memory_format=memory)

  def evaluate():
    model.eval()
    with torch.no_grad(), autocast():
      model(xe)

  evaluate()
  result['eval'] = _timed(
    evaluate, max(1, opts['steps'] // 2), opts['repeats'], opts['eval_batch']
  )
  result['torch'] = torch.__version__
  result['threads'] = torch.get_num_threads()
  return result


WORKERS = {
  'rotjax': rotjax_worker,
  'torch': torch_worker,
  'machine': machine_worker,
}


# ---------------------------------------------------------------- orchestration


def mode_ratios(rounds) -> list[str]:
  """Lines comparing jit with pmap per pair: train, eval and loop images/s and the first
  call (compile), each as the jit row over the pmap row within each round."""
  lines = []
  for jit_row, pmap_row in MODE_PAIRS:
    if not all(jit_row in r and pmap_row in r for r in rounds):
      continue
    cells = []
    for key in ('train', 'eval', 'loop', 'compile_s'):
      ratios = []
      for r in rounds:
        a, b = r[jit_row], r[pmap_row]
        if 'error' in a or 'error' in b or not a.get(key) or not b.get(key):
          continue
        value = lambda x: (
          x[key]['median'] if isinstance(x[key], dict) else x[key]
        )
        ratios.append(value(a) / value(b))
      if ratios:
        label = 'compile s' if key == 'compile_s' else key + ' img/s'
        cells.append(f'{label} {fmt_ratios(ratios)}')
    lines.append(f'{jit_row} / {pmap_row}: ' + '; '.join(cells))
  return lines


def configurations(quick: bool, has_torch: bool):
  """(name, worker, options, extra environment) for each row of the table."""
  sys.path.insert(0, ROOT)
  from rotjax.cpu import platform as rj_platform

  rows = [
    # The default: model.dtype=auto, model.conv=auto, as a CLI run on this machine.
    (DEFAULT, 'rotjax', {'dtype': 'auto', 'conv': 'auto', 'loop': True}, {}),
    # Each convolution path in each dtype: the choices `auto` picks among.
    (
      'rotjax fp32, oneDNN convolutions',
      'rotjax',
      {'dtype': 'float32', 'conv': 'onednn'},
      {},
    ),
    (
      'rotjax fp32, XLA convolutions',
      'rotjax',
      {'dtype': 'float32', 'conv': 'xla'},
      {},
    ),
    (
      'rotjax bf16, oneDNN convolutions',
      'rotjax',
      {'dtype': 'bfloat16', 'conv': 'onednn'},
      {},
    ),
    (
      'rotjax bf16, XLA convolutions',
      'rotjax',
      {'dtype': 'bfloat16', 'conv': 'xla'},
      {},
    ),
    # The default with training BatchNorm(+ReLU) on XLA instead of oneDNN (model.norm).
    (
      'rotjax default, XLA BatchNorm',
      'rotjax',
      {'dtype': 'auto', 'conv': 'auto', 'norm': 'xla'},
      {},
    ),
    # The default (parallel=auto: jit over a device mesh) against pmap mode, on one device
    # and on 2 host devices (MODE_PAIRS: their per-round ratios under the table).
    (
      PMAP,
      'rotjax',
      {'dtype': 'auto', 'conv': 'auto', 'parallel': 'pmap', 'loop': True},
      {},
    ),
    (
      TWO_DEVICES,
      'rotjax',
      {'dtype': 'auto', 'loop': True},
      {'XLA_FLAGS': f'{YNN_FLAG} --xla_force_host_platform_device_count=2'},
    ),
    (
      TWO_DEVICES_PMAP,
      'rotjax',
      {'dtype': 'auto', 'parallel': 'pmap', 'loop': True},
      {'XLA_FLAGS': f'{YNN_FLAG} --xla_force_host_platform_device_count=2'},
    ),
  ]
  if not quick:
    rows += [
      (
        'rotjax fp32, XLA defaults',
        'rotjax',
        {'dtype': 'float32', 'conv': 'xla'},
        {'ROTJAX_DEFAULT_FLAGS': '0'},
      ),
      (
        'rotjax default, glibc malloc defaults',
        'rotjax',
        {'dtype': 'auto'},
        {'ROTJAX_MALLOC_TUNING': '0'},
      ),
    ]
  if has_torch:
    rows += [
      (REFERENCE, 'torch', {'dtype': 'float32', 'channels_last': True}, {}),
      (
        REFERENCE_BF16,
        'torch',
        {'dtype': 'bfloat16', 'channels_last': True},
        {},
      ),
      # PyTorch's fastest CPU path, beside eager: each rotjax row is judged against the
      # faster of the two in its dtype.
      (
        COMPILED,
        'torch',
        {'dtype': 'float32', 'channels_last': True, 'compile': True},
        {},
      ),
      (
        COMPILED_BF16,
        'torch',
        {'dtype': 'bfloat16', 'channels_last': True, 'compile': True},
        {},
      ),
    ]
    if not quick:
      rows += [
        (
          'PyTorch eager fp32',
          'torch',
          {'dtype': 'float32', 'channels_last': False},
          {},
        ),
        # What rotjax's platform.keep_large_buffers_in_heap does, through glibc's
        # environment variables: does PyTorch gain from it too?
        (
          'PyTorch eager CL bf16, rotjax malloc',
          'torch',
          {'dtype': 'bfloat16', 'channels_last': True},
          rj_platform.malloc_environment(),
        ),
      ]
  return rows


# Older CPU classes, emulated on a newer CPU: oneDNN (rotjax's and PyTorch's) and rotjax's
# own choice through ONEDNN_MAX_CPU_ISA, PyTorch's other kernels through
# ATEN_CPU_CAPABILITY, XLA's code generation through --xla_cpu_max_isa. 'avx512' is
# AVX-512 without bf16 (Skylake-X/Cascade Lake): float32 is `auto`'s choice there.
EMULATED_CPUS = {
  'avx2': (
    {'ONEDNN_MAX_CPU_ISA': 'AVX2', 'ATEN_CPU_CAPABILITY': 'avx2'},
    '--xla_cpu_max_isa=AVX2',
  ),
  'avx512': (
    {'ONEDNN_MAX_CPU_ISA': 'AVX512_CORE', 'ATEN_CPU_CAPABILITY': 'avx512'},
    '--xla_cpu_max_isa=AVX512',
  ),
}


# A row that takes longer is reported as an error row, not waited for (torch.compile's
# first build is the slowest child: minutes on 2 busy cores).
CHILD_TIMEOUT_S = 1800


def child_environment(worker, env_extra=None, cpu=None) -> dict:
  """The one environment every child process gets: this checkout on PYTHONPATH, the row's
  extra variables, the XLA flags a CLI run of rotjax gets, and an emulated CPU's switches."""
  env_extra = env_extra or {}
  env = dict(os.environ, **env_extra)
  env['PYTHONPATH'] = os.pathsep.join(
    p for p in (ROOT, env.get('PYTHONPATH', '')) if p
  )
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if (
    worker != 'torch'
    and 'XLA_FLAGS' not in env_extra
    and env_extra.get('ROTJAX_DEFAULT_FLAGS') != '0'
  ):
    sys.path.insert(0, ROOT)
    from rotjax.cpu import platform as rj_platform  # the flags a CLI run gets

    env['XLA_FLAGS'] = (
      env.get('XLA_FLAGS', '') + ' ' + rj_platform.cpu_xla_flags()
    ).strip()
  if cpu:
    cpu_env, xla_flag = EMULATED_CPUS[cpu]
    env.update(cpu_env)
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + xla_flag).strip()
  return env


def run_child(worker, opts, env_extra, cpu=None):
  env = child_environment(worker, env_extra, cpu)
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    '--worker',
    worker,
    '--opts',
    json.dumps(opts),
  ]
  try:
    out = subprocess.run(
      cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
    )
  except subprocess.TimeoutExpired:
    return {'error': f'no result within {CHILD_TIMEOUT_S} s (a hung compile?)'}
  if out.returncode != 0:
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    named = [
      l for l in lines if 'Error' in l.split(':')[0]
    ]  # the exception line
    return {'error': (named or lines or ['failed'])[-1][:300]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def machine_header(cpu=None) -> str:
  """CPU model, ISA class and flags, oneDNN's version and what `auto` picks, from a child
  process with the same environment as the rows (so an emulated CPU shows as such)."""
  info = run_child('machine', {}, {}, cpu)
  if 'error' in info:
    return f'machine: unknown ({info["error"]})'
  isa = info.get('cpu_isa_class', info['backend'])
  flags = ' '.join(
    f
    for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16')
    if f in info.get('cpu_flags', [])
  )
  emulated = (
    f' [emulated: {cpu}-only CPU via ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY, --xla_cpu_max_isa]'
    if cpu
    else ''
  )
  return (
    f'machine: {info.get("cpu", info["device_kind"])}, {os.cpu_count()} cores, ISA class {isa} '
    f'(flags: {flags or "none"}){emulated}; oneDNN {info.get("onednn_version") or "unavailable"}'
    f' (optimized dtypes: {", ".join(info.get("onednn_dtypes", [])) or "none"})\n'
    f'default (auto): dtype {info["dtype"]} [{info["dtype_reason"]}], convolutions on '
    f'{info["conv"]}'
  )


def peak_flops(backend_devices, cpu=None) -> tuple[dict | None, str]:
  """The machine's peak FLOP/s per compute dtype, where public specs give it, and how."""
  name = ' '.join(backend_devices or [])
  gpus = {
    'H100': (495e12, 989e12),
    'H200': (495e12, 989e12),
    'A100': (156e12, 312e12),
  }
  for key, (tf32, bf16) in gpus.items():  # dense tensor-core peaks
    if key in name:
      return {
        'float32': tf32,
        'bfloat16': bf16,
      }, f'{key} dense TF32 / bf16 spec'
  try:
    info = open('/proc/cpuinfo').read()
    mhz = max(
      float(l.split(':')[1])
      for l in info.splitlines()
      if l.startswith('cpu MHz')
    )
    cores = os.cpu_count()
    field = lambda key: next(
      (l.split(':')[1].strip() for l in info.splitlines() if l.startswith(key)),
      '',
    )
    flags = set(field('flags').split())
    if (
      cpu == 'avx2'
    ):  # emulated: as if the AVX-512 and AMX units were not there
      flags = {f for f in flags if not f.startswith(('avx512', 'amx'))}
    elif (
      cpu == 'avx512'
    ):  # emulated: AVX-512 without its bf16 dot products or AMX
      flags = {
        f for f in flags if f != 'avx512_bf16' and not f.startswith('amx')
      }
    # Zen 4 (AMD family 25) runs AVX-512 on 256-bit pipes; Zen 5 and Intel's AVX-512
    # server cores have two 512-bit FMA pipes.
    zen4 = field('vendor_id') == 'AuthenticAMD' and field('cpu family') == '25'
    lanes = 16 if 'avx512f' in flags and not zen4 else 8
    # fp32 flops per cycle per core: 2 FMA pipes x lanes x 2 flops. bf16: AVX512-BF16's
    # dot product does two per fp32 lane; AMX's tile unit 1024 per cycle (Intel's figure).
    fp32 = 2 * lanes * 2
    bf16 = (
      1024
      if 'amx_bf16' in flags
      else 2 * fp32
      if 'avx512_bf16' in flags
      else fp32
    )
    # cpuinfo's MHz is the base clock and turbo can exceed it: an estimate, not a bound.
    hz = cores * mhz * 1e6
    return {'float32': hz * fp32, 'bfloat16': hz * bf16}, (
      f'{cores} cores x {mhz:.0f} MHz (cpuinfo base clock) x {fp32} fp32 / {bf16} bf16 '
      f'flops/cycle ({"2 x 512" if lanes == 16 else "2 x 256"}-bit FMA pipes'
      f'{", AMX" if "amx_bf16" in flags else ", AVX512-BF16" if "avx512_bf16" in flags else ""})'
    )
  except Exception:
    return None, 'unknown'


DEFAULT = 'rotjax default (auto)'
PMAP = 'rotjax default, pmap'
TWO_DEVICES = 'rotjax default, 2 host devices'
TWO_DEVICES_PMAP = 'rotjax default, 2 host devices, pmap'
# (jit row, pmap row): the same step under parallel=jit (the default) and parallel=pmap.
MODE_PAIRS = ((DEFAULT, PMAP), (TWO_DEVICES, TWO_DEVICES_PMAP))
# Timed steps per repeat by default and at least under --quick: a 2-step repeat (under
# 1.5 s for the bf16 step) is shorter than the shared machine's slow spells.
MIN_STEPS = 6
REFERENCE = 'PyTorch eager channels_last fp32'
REFERENCE_BF16 = 'PyTorch eager channels_last bf16'
COMPILED = 'PyTorch compile channels_last fp32'
COMPILED_BF16 = 'PyTorch compile channels_last bf16'
# Equal precision: a row is compared with the faster of PyTorch's eager and torch.compile
# steps in its own dtype, round by round (users choosing a framework take its fastest).
SAME_DTYPE = {
  'float32': (REFERENCE, COMPILED),
  'bfloat16': (REFERENCE_BF16, COMPILED_BF16),
}
# Per-round ratios further apart than this (max / min - 1) are flagged: one round's
# answer would have been another's, so the median alone would overstate what is known.
DISAGREEMENT = 0.10


def combine(name, worker, opts, per_round):
  """One table row from a configuration's rounds: pooled rates, ratios taken within rounds."""
  ok = [r for r in per_round if 'error' not in r]
  if not ok:
    return {'name': name, 'worker': worker, **opts, **per_round[0]}
  row = {'name': name, 'worker': worker, **opts, **ok[0]}
  for key in ('train', 'eval'):
    row[key] = stats([rate for r in ok for rate in r[key]['rates']])
  loops = [r['loop'] for r in ok if r.get('loop')]
  if loops:
    row['loop'], row['loop_rounds'] = float(np.median(loops)), loops
  return row


def _median_rate(result, key):
  """A round's images/s for `key`: 'train'/'eval' (median of its repeats) or 'loop'."""
  value = (result or {}).get(key)
  return value['median'] if isinstance(value, dict) else value


def round_ratios(rounds, name, references, key='train', reference_key='train'):
  """Per round, `name`'s images/s over the fastest of `references` measured in that round.

  A round where the row or every reference is missing (an error) gives no ratio.
  """
  ratios = []
  for measured in rounds:
    mine = _median_rate(measured.get(name), key)
    theirs = [
      _median_rate(measured.get(ref), reference_key) for ref in references
    ]
    theirs = [t for t in theirs if t]
    if mine and theirs:
      ratios.append(mine / max(theirs))
  return ratios


def disagree(ratios, tolerance=DISAGREEMENT) -> bool:
  """Whether the rounds' ratios spread by more than `tolerance` (max over min)."""
  # Rounded so that exactly 10% apart (1.00 and 1.10, as printed) is not flagged.
  return len(ratios) > 1 and round(max(ratios) / min(ratios) - 1, 6) > tolerance


def fmt_ratios(ratios, width=0) -> str:
  """'1.02 (1.02 1.03)': the median, then each round's ratio; '!' when they disagree."""
  if not ratios:
    return f'{"n/a":>{width}s}'
  text = f'{np.median(ratios):.2f}'
  if len(ratios) > 1:
    text += (
      ' ('
      + ' '.join(f'{r:.2f}' for r in ratios)
      + ')'
      + ('!' if disagree(ratios) else '')
    )
  return f'{text:>{width}s}'


def add_ratios(results, rounds):
  """Each row's per-round ratios to PyTorch and their medians.

  ratio_train / ratio_eval: against PyTorch eager channels_last fp32. ratio_same: train,
  against the faster of PyTorch's eager and compiled channels_last steps in the row's own
  compute dtype (equal precision); loop_same: the row's real loop against the same.
  """
  for row in results:
    for key in ('train', 'eval'):
      row['rounds_' + key] = round_ratios(
        rounds, row['name'], (REFERENCE,), key, key
      )
    same = SAME_DTYPE.get(row.get('dtype'), (REFERENCE,))
    row['rounds_same'] = round_ratios(rounds, row['name'], same)
    row['rounds_loop_same'] = round_ratios(
      rounds, row['name'], same, key='loop'
    )
    for key in ('train', 'eval', 'same', 'loop_same'):
      ratios = row['rounds_' + key]
      row['ratio_' + key] = float(np.median(ratios)) if ratios else None
    row['disagree'] = [
      key
      for key in ('train', 'same', 'loop_same')
      if disagree(row['rounds_' + key])
    ]


def fmt(stats):
  return f'{stats["median"]:7.1f} [{stats["min"]:.1f}-{stats["max"]:.1f}]'


COLUMNS = (
  'configuration',
  'dtype',
  'train img/s [min-max]',
  'x torch CL',
  'x same',
  'eval img/s [min-max]',
  'x torch CL (eval)',
  'compile s',
  'loop/step',
  'loop x same',
  '% peak',
)


def table_cells(results, flops_per_step, peak, batch) -> list:
  """Each result row as the strings of COLUMNS (an error row: its name, dtype and error)."""
  lines = []
  for r in results:
    if 'error' in r:
      lines.append([r['name'], r.get('dtype', ''), 'error: ' + r['error']])
      continue
    frac = '-'
    if flops_per_step and peak:
      r['achieved_flops'] = flops_per_step * r['train']['median'] / batch
      frac = f'{r["achieved_flops"] / peak[r["dtype"]]:.1%}'
    lines.append(
      [
        r['name'],
        r['dtype'],
        fmt(r['train']).strip(),
        fmt_ratios(r['rounds_train']),
        fmt_ratios(r['rounds_same']),
        fmt(r['eval']).strip(),
        fmt_ratios(r['rounds_eval']),
        f'{r["compile_s"]:.1f}' if 'compile_s' in r else '-',
        f'{r["loop"] / r["train"]["median"]:.0%}' if r.get('loop') else '-',
        fmt_ratios(r['rounds_loop_same']) if r.get('loop') else '-',
        frac,
      ]
    )
  return lines


def print_table(results, lines):
  """COLUMNS left-aligned (names) and right-aligned (figures), each as wide as it needs."""
  full = [l for l in lines if len(l) == len(COLUMNS)]
  widths = [
    max([len(c)] + [len(l[i]) for l in full]) for i, c in enumerate(COLUMNS)
  ]
  row = lambda cells: ' '.join(
    c.ljust(w) if i == 0 else c.rjust(w)
    for i, (c, w) in enumerate(zip(cells, widths))
  )
  print(row(COLUMNS))
  print('-' * len(row(COLUMNS)))
  for line in lines:
    print(
      row(line)
      if len(line) == len(COLUMNS)
      else f'{line[0].ljust(widths[0])} {line[1].rjust(widths[1])} {line[2]}'
    )


def main():
  if '--data' in sys.argv[1:]:
    # The input pipeline's benchmark (loaders alone, loop vs bare step): its own script.
    import data_benchmark

    return data_benchmark.main([a for a in sys.argv[1:] if a != '--data'])
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  parser.add_argument('--opts', help=argparse.SUPPRESS)
  parser.add_argument(
    '--quick', action='store_true', help='fewer configurations and repeats'
  )
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--eval_batch', type=int, default=256)
  parser.add_argument('--width', type=int, default=64)
  parser.add_argument(
    '--steps', type=int, default=MIN_STEPS, help='timed steps per repeat'
  )
  parser.add_argument(
    '--repeats', type=int, default=3, help='timed repeats per round'
  )
  parser.add_argument(
    '--rounds',
    type=int,
    default=2,
    help='times every configuration is measured, interleaved',
  )
  parser.add_argument(
    '--loop_steps',
    type=int,
    default=20,
    help='steps per epoch of the real loop (a CIFAR-10 epoch at batch 128 is 390)',
  )
  parser.add_argument('--json', default='benchmark.json')
  parser.add_argument(
    '--only',
    metavar='REGEX',
    help='run only the rows whose name matches (the PyTorch fp32 reference always runs)',
  )
  parser.add_argument(
    '--cpu',
    choices=sorted(EMULATED_CPUS),
    help='emulate an older CPU class for every row (see EMULATED_CPUS)',
  )
  args = parser.parse_args()
  if args.worker:
    opts = json.loads(args.opts)
    print(json.dumps(WORKERS[args.worker](opts)))
    return

  try:
    import torch  # noqa: F401

    has_torch = True
  except ImportError:
    has_torch = False
    print(
      'torch is not installed: PyTorch rows skipped (pip install -e ".[bench]")'
    )
  if args.quick:
    # Fewer rows, not fewer rounds: one round of 2-step repeats flipped its answer with a
    # shared machine's noise, so even --quick interleaves 2 rounds of >= 6 steps.
    args.repeats = min(args.repeats, 3)
    args.steps, args.rounds = max(args.steps, MIN_STEPS), max(args.rounds, 2)
  base = {
    'batch': args.batch,
    'eval_batch': args.eval_batch,
    'width': args.width,
    'steps': args.steps,
    'repeats': args.repeats,
    'loop_steps': args.loop_steps,
  }
  rows = configurations(args.quick, has_torch)
  if args.only:
    rows = [
      row for row in rows if re.search(args.only, row[0]) or row[0] == REFERENCE
    ]
  # Rounds: every configuration once per round, so that a slow spell of the machine
  # hits all of them alike; a ratio is taken within each round, then the median.
  rounds = []
  for round_index in range(args.rounds):
    measured = {}
    # Each round starts at a different row: the first process of a round tends to run
    # on a machine still busy from the previous one, and no row should always pay for it.
    shift = round_index % len(rows)
    for name, worker, opts, env in rows[shift:] + rows[:shift]:
      print(f'round {round_index + 1}/{args.rounds}: {name} ...', flush=True)
      # XLA's FLOP count once, in the first round (the real loop runs in every round).
      extras = round_index == 0
      child_opts = {**base, **opts, 'extras': extras}
      measured[name] = run_child(worker, child_opts, env, args.cpu)
    rounds.append(measured)
  results = [
    combine(name, worker, opts, [r[name] for r in rounds])
    for name, worker, opts, _ in rows
  ]

  add_ratios(results, rounds)
  rj_devices = next(
    (
      r.get('devices')
      for r in results
      if r['worker'] == 'rotjax' and 'devices' in r
    ),
    [],
  )
  peak, peak_how = peak_flops(rj_devices, args.cpu)
  # Every row trains the same network on the same batch: one FLOP count (from a row on
  # XLA's convolutions) serves all, PyTorch's and the oneDNN rows included.
  flops_per_step = next(
    (r['flops_per_step'] for r in results if r.get('flops_per_step')), None
  )
  print()
  print(
    f'ResNet18 CIFAR stem, width {args.width}, batch {args.batch} (eval {args.eval_batch}), '
    f'Adam, {args.rounds} rounds x {args.repeats} repeats x {args.steps} steps'
  )
  print(machine_header(args.cpu))
  print_table(results, table_cells(results, flops_per_step, peak, args.batch))
  print(
    f'\nimages/s: median [min-max] over all repeats of all rounds. Ratios: the median over '
    f'rounds of the ratio within a round, then (in brackets) each round\'s; "!" where the '
    f'rounds disagree by more than {DISAGREEMENT:.0%}.\nx torch CL: against PyTorch eager '
    f'channels_last fp32; x same: against the faster of PyTorch eager and torch.compile '
    f"channels_last in the row's dtype (equal precision); loop x same: the real loop "
    f'(train_and_evaluate, epoch 2) against the same.\npeak used for % peak: '
    + (
      f'{peak["float32"] / 1e9:.0f} GFLOP/s fp32, {peak["bfloat16"] / 1e9:.0f} bf16'
      if peak
      else 'unknown'
    )
    + f' ({peak_how}); '
    + (
      f"{flops_per_step / 1e9:.0f} GFLOP per train step (XLA's count)\n"
      if flops_per_step
      else '\n'
    )
    + 'loop/step = images/s of train_and_evaluate over epoch 2 / bare step'
  )
  pairs = mode_ratios(rounds)
  if pairs:
    print(
      '\njit (parallel=auto) against pmap: ratios jit / pmap, median over rounds '
      "(each round's in brackets); > 1 is jit faster, except compile s (< 1: jit "
      'compiles faster)'
    )
    print('\n'.join(pairs))
  disagreeing = [r['name'] for r in results if r.get('disagree')]
  if disagreeing:
    print(
      f'rounds disagree by more than {DISAGREEMENT:.0%} on: {", ".join(disagreeing)} '
      f'(a noisy machine: rerun with more --rounds before drawing a conclusion)'
    )
  with open(args.json, 'w') as f:
    json.dump(
      {
        'args': vars(args),
        'peak_flops': peak,
        'peak_how': peak_how,
        'results': results,
        'rounds': rounds,
      },
      f,
      indent=2,
    )
  print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
