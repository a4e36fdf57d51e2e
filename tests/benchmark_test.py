"""scripts/benchmark.py's arithmetic: per-round ratios, the faster PyTorch, disagreement.

Pure functions on made-up round results; nothing here is timed.
"""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).parent.parent / 'scripts' / 'benchmark.py'
_spec = importlib.util.spec_from_file_location('benchmark', _PATH)
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)

ROW = benchmark.DEFAULT
EAGER, COMPILED = benchmark.REFERENCE_BF16, benchmark.COMPILED_BF16


def _result(train, loop=None, dtype='bfloat16'):
  result = {
    'train': {'median': train},
    'eval': {'median': 2 * train},
    'dtype': dtype,
  }
  if loop is not None:
    result['loop'] = loop
  return result


def test_each_round_is_against_the_faster_pytorch_of_that_round():
  rounds = [
    {ROW: _result(100.0), EAGER: _result(80.0), COMPILED: _result(125.0)},
    {ROW: _result(90.0), EAGER: _result(100.0), COMPILED: _result(75.0)},
  ]
  assert benchmark.round_ratios(
    rounds, ROW, (EAGER, COMPILED)
  ) == pytest.approx([0.8, 0.9])


def test_a_failed_reference_leaves_the_other_and_a_failed_row_leaves_no_ratio():
  rounds = [
    {
      ROW: _result(100.0),
      EAGER: _result(80.0),
      COMPILED: {'error': 'no compiler'},
    },
    {ROW: {'error': 'boom'}, EAGER: _result(80.0), COMPILED: _result(90.0)},
    {ROW: _result(100.0), EAGER: {'error': 'x'}},
  ]
  assert benchmark.round_ratios(
    rounds, ROW, (EAGER, COMPILED)
  ) == pytest.approx([1.25])


def test_the_loop_is_compared_with_pytorchs_step():
  rounds = [
    {
      ROW: _result(100.0, loop=95.0),
      EAGER: _result(100.0),
      COMPILED: _result(50.0),
    }
  ]
  assert benchmark.round_ratios(rounds, ROW, (EAGER, COMPILED), key='loop') == [
    0.95
  ]
  assert (
    benchmark.round_ratios(
      [{ROW: _result(100.0), EAGER: _result(100.0)}], ROW, (EAGER,), key='loop'
    )
    == []
  )


@pytest.mark.parametrize(
  'ratios, flagged',
  [
    ([1.10, 0.75], True),
    ([1.00, 1.10], False),
    ([1.00, 1.11], True),
    ([0.9], False),
    ([], False),
    ([1.0, 1.02, 1.12], True),
  ],
)
def test_rounds_disagree_beyond_ten_percent(ratios, flagged):
  assert benchmark.disagree(ratios) is flagged


def test_ratios_are_shown_with_every_round_and_a_mark_when_they_disagree():
  assert benchmark.fmt_ratios([1.02, 1.03]) == '1.02 (1.02 1.03)'
  assert benchmark.fmt_ratios([1.10, 0.75]) == '0.93 (1.10 0.75)!'
  assert benchmark.fmt_ratios([0.9]) == '0.90'
  assert benchmark.fmt_ratios([], 5) == '  n/a'


def test_add_ratios_picks_the_pytorch_rows_of_the_rows_dtype():
  fp32_eager, fp32_compiled = benchmark.REFERENCE, benchmark.COMPILED
  rounds = [
    {
      ROW: _result(100.0, loop=90.0),
      'fp32 row': _result(60.0, dtype='float32'),
      EAGER: _result(80.0),
      COMPILED: _result(125.0),
      fp32_eager: _result(50.0, dtype='float32'),
      fp32_compiled: _result(40.0, dtype='float32'),
    },
    {
      ROW: _result(120.0, loop=110.0),
      'fp32 row': _result(60.0, dtype='float32'),
      EAGER: _result(100.0),
      COMPILED: _result(100.0),
      fp32_eager: _result(50.0, dtype='float32'),
      fp32_compiled: _result(60.0, dtype='float32'),
    },
  ]
  results = [
    {'name': ROW, 'dtype': 'bfloat16'},
    {'name': 'fp32 row', 'dtype': 'float32'},
  ]
  benchmark.add_ratios(results, rounds)
  bf16, fp32 = results
  assert bf16['rounds_same'] == pytest.approx([0.8, 1.2])
  assert bf16['ratio_same'] == pytest.approx(1.0)
  assert bf16['rounds_train'] == pytest.approx(
    [2.0, 2.4]
  )  # against eager fp32, as before
  assert bf16['rounds_loop_same'] == pytest.approx([0.72, 1.1])
  assert set(bf16['disagree']) == {'train', 'same', 'loop_same'}
  assert fp32['rounds_same'] == pytest.approx([1.2, 1.0])
  assert fp32['rounds_loop_same'] == [] and fp32['disagree'] == ['same']


def test_combine_pools_repeats_and_keeps_each_rounds_loop():
  per_round = [
    {'train': {'rates': [1.0, 3.0]}, 'eval': {'rates': [2.0]}, 'loop': 5.0},
    {'error': 'late failure'},
    {'train': {'rates': [2.0]}, 'eval': {'rates': [4.0]}, 'loop': 7.0},
  ]
  row = benchmark.combine('r', 'rotjax', {}, per_round)
  assert row['train']['median'] == 2.0 and row['train']['min'] == 1.0
  assert row['loop'] == 6.0 and row['loop_rounds'] == [5.0, 7.0]
  assert 'error' in benchmark.combine('r', 'rotjax', {}, [{'error': 'x'}])


def test_quick_still_runs_two_rounds_of_six_steps():
  assert benchmark.MIN_STEPS >= 6
