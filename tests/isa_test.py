"""The CPU's instruction-set class from its flags, and ONEDNN_MAX_CPU_ISA's cap (pure)."""

from rotjax.cpu import isa


def test_isa_classes_and_the_onednn_cap():
  bf16 = frozenset(
    {'avx2', 'fma', 'avx512f', 'avx512bw', 'avx512vl', 'avx512_bf16'}
  )
  assert isa.isa_class(frozenset({'avx2', 'fma'}), cap='') == 'avx2'
  assert (
    isa.isa_class(
      frozenset({'avx2', 'fma', 'avx512f', 'avx512bw', 'avx512vl'}), cap=''
    )
    == 'avx512'
  )
  assert isa.isa_class(bf16, cap='') == 'avx512_bf16'
  assert isa.isa_class(bf16 | {'amx_bf16', 'amx_tile'}, cap='') == 'amx'
  assert isa.isa_class(bf16, cap='AVX2') == 'avx2'
  assert isa.isa_class(bf16, cap='avx512_core') == 'avx512'
  assert (
    isa.isa_class(frozenset({'avx2', 'fma'}), cap='AVX512_CORE_AMX') == 'avx2'
  )
  assert isa.isa_class(frozenset({'sse4_2'}), cap='') == 'older'
