"""The machine's facts for a run's compute record: backend and device; the CPU's class."""

import jax

from rotjax.cpu import hardware, isa


def test_facts_name_the_backend_and_on_the_cpu_its_class():
  facts = hardware.facts(onednn=False)
  assert facts['backend'] == jax.default_backend() and facts['device_kind']
  if facts['backend'] == 'cpu':
    assert facts['cpu_isa_class'] == isa.isa_class() and facts['cpu']
  # oneDNN's facts only where the run may use it: model.conv=xla never loads it.
  assert not any(
    key.startswith('onednn_') and key != 'onednn_max_cpu_isa' for key in facts
  )
