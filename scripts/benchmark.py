r"""Side-by-side training speed: rotjax against PyTorch, in one run.

  python scripts/benchmark.py                 # ResNet18 (CIFAR stem), batch 128, Adam
  python scripts/benchmark.py --quick         # fewer configurations and repeats
  python scripts/benchmark.py --json out.json

Every configuration runs in its own child process (XLA flags are fixed when a
process starts), on the same random in-memory data, once per round; rounds
interleave the configurations so that a slow spell of the shared machine hits
them alike. The table shows the median images/s with min and max over all
repeats, and the ratio to the PyTorch eager channels_last row taken within each
round (median over rounds). Rows for PyTorch appear when torch is installed
(`pip install -e '.[bench]'`); rotjax never needs it.
"""
import argparse
import json
import os
import platform
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
  return {'median': float(np.median(rates)), 'min': float(min(rates)), 'max': float(max(rates)),
          'rates': [float(r) for r in rates]}


def rotjax_worker(opts):
  sys.path.insert(0, ROOT)
  from rotjax import platform as rj_platform
  rj_platform.configure()   # what a CLI run gets (XLA flags come in through the environment)
  import functools
  import jax
  from configs import supervised
  from rotjax import input_pipeline, parallel, train

  config = supervised.get_config()
  config.model.width, config.model.dtype = opts['width'], opts['dtype']
  config.model.conv = opts.get('conv', 'auto')
  config.batch_size, config.eval_batch_size = opts['batch'], opts['eval_batch']
  devices = jax.local_devices()
  state, mask, _, _ = train.create_train_state(config, 10, steps_per_epoch=100)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (opts['batch'], 32, 32, 3), dtype=np.uint8),
           'label': rng.integers(0, 10, opts['batch']).astype(np.int32)}
  sharded = jax.device_put(input_pipeline.shard(batch, len(devices)))
  p_step = jax.pmap(functools.partial(train.train_step, prepare_fn=train.make_prepare_fn(config, train=True),
                                      mask=mask, smoothing=0.1),
                    axis_name='batch', donate_argnums=(0,), devices=devices)
  holder = {'state': parallel.replicate(state, devices)}
  keys = parallel.replicate(jax.random.key(0), devices)

  def step():
    holder['state'], metrics = p_step(holder['state'], sharded, keys)
    jax.block_until_ready(metrics)

  start = time.perf_counter()
  step()
  first_call = time.perf_counter() - start
  step()  # one more warm-up
  result = {'train': _timed(step, opts['steps'], opts['repeats'], opts['batch'])}
  result['compile_s'] = first_call - opts['batch'] / result['train']['median']

  eval_batch = {'image': rng.integers(0, 256, (opts['eval_batch'], 32, 32, 3), dtype=np.uint8),
                'label': np.zeros(opts['eval_batch'], np.int32),
                'mask': np.ones(opts['eval_batch'], np.float32)}
  eval_sharded = jax.device_put(input_pipeline.shard(eval_batch, len(devices)))
  p_eval = jax.pmap(functools.partial(train.eval_step, prepare_fn=train.make_prepare_fn(config, train=False),
                                      smoothing=0.1), axis_name='batch', devices=devices)
  evaluate = lambda: jax.block_until_ready(p_eval(holder['state'], eval_sharded, keys))
  evaluate()
  result['eval'] = _timed(evaluate, max(1, opts['steps'] // 2), opts['repeats'], opts['eval_batch'])

  if not opts.get('extras', True):
    return result
  # XLA counts nothing inside the oneDNN custom calls: FLOPs come from rows on XLA's convolutions.
  if opts.get('conv') == 'xla':
    result.update(_xla_flops(p_step, (holder['state'], sharded, keys), len(devices)))
  if opts.get('loop'):
    result['loop'] = _real_loop(opts, config)
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
  from rotjax import input_pipeline, train
  rng = np.random.default_rng(1)
  n = opts['batch'] * opts['loop_steps']
  split = lambda k: input_pipeline.Split(rng.integers(0, 256, (k, 32, 32, 3), dtype=np.uint8),
                                         rng.integers(0, 10, k).astype(np.int32))
  dataset = input_pipeline.Dataset(split(n), split(opts['eval_batch']), split(opts['eval_batch']),
                                   tuple(str(i) for i in range(10)))
  with tempfile.TemporaryDirectory() as workdir:
    config.workdir = workdir
    config.num_epochs = 2
    config.progress = False
    config.log_every_steps = opts['loop_steps']
    train.train_and_evaluate(config, dataset=dataset)
    from rotjax import metrics
    rows = metrics.read_metrics(workdir)
  return rows[-1]['images_per_second']


def torch_worker(opts):
  import torch
  import torch.nn as tnn
  import torch.nn.functional as F

  class Block(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(cout)
      self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(cout)
      self.down = None
      if stride != 1 or cin != cout:
        self.down = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout))

    def forward(self, x):
      y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
      return F.relu(y + (x if self.down is None else self.down(x)))

  class ResNet18(tnn.Module):
    def __init__(self, width=64, classes=10):
      super().__init__()
      self.conv1 = tnn.Conv2d(3, width, 3, 1, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(width)
      layers, cin = [], width
      for i in range(4):
        cout = width * 2 ** i
        layers.append(tnn.Sequential(Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)))
        cin = cout
      self.layers = tnn.Sequential(*layers)
      self.fc = tnn.Linear(cin, classes)

    def forward(self, x):
      x = self.layers(F.relu(self.bn1(self.conv1(x))))
      return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

  torch.manual_seed(0)
  model = ResNet18(opts['width'])
  memory = torch.channels_last if opts['channels_last'] else torch.contiguous_format
  model = model.to(memory_format=memory)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  x = torch.randn(opts['batch'], 3, 32, 32).to(memory_format=memory)
  y = torch.randint(0, 10, (opts['batch'],))
  autocast = lambda: torch.autocast('cpu', dtype=torch.bfloat16, enabled=opts['dtype'] == 'bfloat16')

  def step():
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    loss.backward()
    optimizer.step()

  step()
  step()
  result = {'train': _timed(step, opts['steps'], opts['repeats'], opts['batch'])}
  xe = torch.randn(opts['eval_batch'], 3, 32, 32).to(memory_format=memory)

  def evaluate():
    model.eval()
    with torch.no_grad(), autocast():
      model(xe)
  evaluate()
  result['eval'] = _timed(evaluate, max(1, opts['steps'] // 2), opts['repeats'], opts['eval_batch'])
  result['torch'] = torch.__version__
  result['threads'] = torch.get_num_threads()
  return result


# ---------------------------------------------------------------- orchestration

def configurations(quick: bool, has_torch: bool):
  """(name, worker, options, extra environment) for each row of the table."""
  sys.path.insert(0, ROOT)
  from rotjax import platform as rj_platform
  rows = [
      ('rotjax fp32, XLA defaults', 'rotjax', {'dtype': 'float32', 'conv': 'xla'},
       {'ROTJAX_DEFAULT_FLAGS': '0'}),
      ('rotjax fp32 (CPU defaults)', 'rotjax', {'dtype': 'float32'}, {}),
      ('rotjax bf16 (CPU defaults)', 'rotjax', {'dtype': 'bfloat16', 'loop': True}, {}),
      ('rotjax bf16, XLA convolutions', 'rotjax', {'dtype': 'bfloat16', 'conv': 'xla'}, {}),
  ]
  if not quick:
    rows += [
        ('rotjax fp32, XLA convolutions', 'rotjax', {'dtype': 'float32', 'conv': 'xla'}, {}),
        ('rotjax bf16, glibc malloc defaults', 'rotjax', {'dtype': 'bfloat16'},
         {'ROTJAX_MALLOC_TUNING': '0'}),
        ('rotjax bf16, 2 host devices', 'rotjax', {'dtype': 'bfloat16', 'loop': True},
         {'XLA_FLAGS': f'{YNN_FLAG} --xla_force_host_platform_device_count=2'}),
    ]
  if has_torch:
    rows += [
        ('PyTorch eager fp32', 'torch', {'dtype': 'float32', 'channels_last': False}, {}),
        ('PyTorch eager channels_last fp32', 'torch', {'dtype': 'float32', 'channels_last': True}, {}),
    ]
    if not quick:
      rows += [
          ('PyTorch eager channels_last bf16', 'torch', {'dtype': 'bfloat16', 'channels_last': True}, {}),
          # What rotjax's platform.keep_large_buffers_in_heap does, through glibc's
          # environment variables: does PyTorch gain from it too?
          ('PyTorch eager CL bf16, rotjax malloc', 'torch', {'dtype': 'bfloat16', 'channels_last': True},
           rj_platform.malloc_environment()),
      ]
  return rows


def run_child(worker, opts, env_extra):
  env = dict(os.environ, **env_extra)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if worker == 'rotjax' and 'XLA_FLAGS' not in env_extra and env_extra.get('ROTJAX_DEFAULT_FLAGS') != '0':
    sys.path.insert(0, ROOT)
    from rotjax import platform as rj_platform  # the flags a CLI run gets
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + rj_platform.cpu_xla_flags()).strip()
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', worker, '--opts', json.dumps(opts)]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if out.returncode != 0:
    return {'error': out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'failed'}
  return json.loads(out.stdout.strip().splitlines()[-1])


def peak_flops(backend_devices) -> tuple[dict | None, str]:
  """The machine's peak FLOP/s per compute dtype, where public specs give it, and how."""
  name = ' '.join(backend_devices or [])
  gpus = {'H100': (495e12, 989e12), 'H200': (495e12, 989e12), 'A100': (156e12, 312e12)}
  for key, (tf32, bf16) in gpus.items():   # dense tensor-core peaks
    if key in name:
      return {'float32': tf32, 'bfloat16': bf16}, f'{key} dense TF32 / bf16 spec'
  try:
    info = open('/proc/cpuinfo').read()
    mhz = max(float(l.split(':')[1]) for l in info.splitlines() if l.startswith('cpu MHz'))
    cores = os.cpu_count()
    field = lambda key: next((l.split(':')[1].strip() for l in info.splitlines()
                              if l.startswith(key)), '')
    flags = set(field('flags').split())
    # Zen 4 (AMD family 25) runs AVX-512 on 256-bit pipes; Zen 5 and Intel's AVX-512
    # server cores have two 512-bit FMA pipes.
    zen4 = field('vendor_id') == 'AuthenticAMD' and field('cpu family') == '25'
    lanes = 16 if 'avx512f' in flags and not zen4 else 8
    # fp32 flops per cycle per core: 2 FMA pipes x lanes x 2 flops. bf16: AVX512-BF16's
    # dot product does two per fp32 lane; AMX's tile unit 1024 per cycle (Intel's figure).
    fp32 = 2 * lanes * 2
    bf16 = 1024 if 'amx_bf16' in flags else 2 * fp32 if 'avx512_bf16' in flags else fp32
    # cpuinfo's MHz is the base clock and turbo can exceed it: an estimate, not a bound.
    hz = cores * mhz * 1e6
    return {'float32': hz * fp32, 'bfloat16': hz * bf16}, (
        f"{cores} cores x {mhz:.0f} MHz (cpuinfo base clock) x {fp32} fp32 / {bf16} bf16 "
        f"flops/cycle ({'2 x 512' if lanes == 16 else '2 x 256'}-bit FMA pipes"
        f"{', AMX' if 'amx_bf16' in flags else ', AVX512-BF16' if 'avx512_bf16' in flags else ''})")
  except Exception:
    return None, 'unknown'


REFERENCE = 'PyTorch eager channels_last fp32'


def combine(name, worker, opts, per_round):
  """One table row from a configuration's rounds: pooled rates, ratios taken within rounds."""
  ok = [r for r in per_round if 'error' not in r]
  if not ok:
    return {'name': name, 'worker': worker, **opts, **per_round[0]}
  row = {'name': name, 'worker': worker, **opts, **ok[0]}
  for key in ('train', 'eval'):
    row[key] = stats([rate for r in ok for rate in r[key]['rates']])
  return row


def add_ratios(results, rounds):
  """ratio_train / ratio_eval: per round, this row's median over the reference's; median of those."""
  for row in results:
    for key in ('train', 'eval'):
      ratios = [r[row['name']][key]['median'] / r[REFERENCE][key]['median'] for r in rounds
                if key in r.get(row['name'], {}) and key in r.get(REFERENCE, {})]
      row['ratio_' + key] = float(np.median(ratios)) if ratios else None


def fmt(stats):
  return f'{stats["median"]:7.1f} [{stats["min"]:.1f}-{stats["max"]:.1f}]'


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  parser.add_argument('--opts', help=argparse.SUPPRESS)
  parser.add_argument('--quick', action='store_true', help='fewer configurations and repeats')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--eval_batch', type=int, default=256)
  parser.add_argument('--width', type=int, default=64)
  parser.add_argument('--steps', type=int, default=2, help='timed steps per repeat')
  parser.add_argument('--repeats', type=int, default=3, help='timed repeats per round')
  parser.add_argument('--rounds', type=int, default=2,
                      help='times every configuration is measured, interleaved')
  parser.add_argument('--loop_steps', type=int, default=20,
                      help='steps per epoch of the real loop (a CIFAR-10 epoch at batch 128 is 390)')
  parser.add_argument('--json', default='benchmark.json')
  args = parser.parse_args()
  if args.worker:
    opts = json.loads(args.opts)
    print(json.dumps((rotjax_worker if args.worker == 'rotjax' else torch_worker)(opts)))
    return

  try:
    import torch  # noqa: F401
    has_torch = True
  except ImportError:
    has_torch = False
    print('torch is not installed: PyTorch rows skipped (pip install -e ".[bench]")')
  if args.quick:
    args.repeats, args.steps, args.rounds = min(args.repeats, 3), min(args.steps, 2), 1
  base = {'batch': args.batch, 'eval_batch': args.eval_batch, 'width': args.width,
          'steps': args.steps, 'repeats': args.repeats, 'loop_steps': args.loop_steps}
  rows = configurations(args.quick, has_torch)
  # Rounds: every configuration once per round, so that a slow spell of the machine
  # hits all of them alike; a ratio is taken within each round, then the median.
  rounds = []
  for round_index in range(args.rounds):
    measured = {}
    for name, worker, opts, env in rows:
      print(f'round {round_index + 1}/{args.rounds}: {name} ...', flush=True)
      # The real loop and XLA's FLOP count once, in the first round.
      extras = round_index == 0
      child_opts = {**base, **opts, 'extras': extras, 'loop': opts.get('loop', False) and extras}
      measured[name] = run_child(worker, child_opts, env)
    rounds.append(measured)
  results = [combine(name, worker, opts, [r[name] for r in rounds]) for name, worker, opts, _ in rows]

  add_ratios(results, rounds)
  rj_devices = next((r.get('devices') for r in results if r['worker'] == 'rotjax' and 'devices' in r), [])
  peak, peak_how = peak_flops(rj_devices)
  # Every row trains the same network on the same batch: one FLOP count (from a row on
  # XLA's convolutions) serves all, PyTorch's and the oneDNN rows included.
  flops_per_step = next((r['flops_per_step'] for r in results if r.get('flops_per_step')), None)
  header = (f'{"configuration":36s} {"train img/s [min-max]":>24s} {"x torch CL":>10s} '
            f'{"eval img/s [min-max]":>24s} {"x torch CL":>10s} {"compile s":>9s} '
            f'{"loop/step":>9s} {"% peak":>7s}')
  print()
  print(f'ResNet18 CIFAR stem, width {args.width}, batch {args.batch} (eval {args.eval_batch}), '
        f'Adam, {args.rounds} rounds x {args.repeats} repeats x {args.steps} steps; '
        f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores')
  print(header)
  print('-' * len(header))
  for r in results:
    if 'error' in r:
      print(f'{r["name"]:36s} error: {r["error"]}')
      continue
    ratio = lambda key: (f'{r["ratio_" + key]:9.2f}x' if r.get('ratio_' + key) else '       n/a')
    loop = f'{r["loop"] / r["train"]["median"]:8.0%}' if r.get('loop') else '        -'
    compile_s = f'{r["compile_s"]:9.1f}' if 'compile_s' in r else '        -'
    frac = '      -'
    if flops_per_step and peak:
      achieved = flops_per_step * r['train']['median'] / args.batch
      r['achieved_flops'] = achieved
      frac = f'{achieved / peak[r["dtype"]]:6.1%}'
    print(f'{r["name"]:36s} {fmt(r["train"]):>24s} {ratio("train"):>10s} {fmt(r["eval"]):>24s} '
          f'{ratio("eval"):>10s} {compile_s} {loop} {frac:>7s}')
  print(f'\nimages/s: median [min-max] over all repeats of all rounds; x torch CL: median over '
        f'rounds of the ratio within a round.\npeak used for % peak: '
        + (f'{peak["float32"] / 1e9:.0f} GFLOP/s fp32, {peak["bfloat16"] / 1e9:.0f} bf16'
           if peak else 'unknown') + f' ({peak_how}); '
        + (f'{flops_per_step / 1e9:.0f} GFLOP per train step (XLA\'s count)\n'
           if flops_per_step else '\n')
        + 'loop/step = images/s of train_and_evaluate over epoch 2 / bare step')
  with open(args.json, 'w') as f:
    json.dump({'args': vars(args), 'peak_flops': peak, 'peak_how': peak_how, 'results': results,
               'rounds': rounds}, f, indent=2)
  print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
