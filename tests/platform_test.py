"""Process settings: the malloc tuning keeps large buffers in the heap, and stays off when asked."""

import subprocess
import sys

import pytest

from rotjax import testing

# Prints whether the tuning applied and how many bytes glibc holds in separate mmap'ed
# blocks while a 64 MB buffer is live (mallinfo2().hblkhd); then, after a second
# thread has allocated, glibc's malloc_stats() lists its arenas on stderr (by default
# that thread gets an arena of its own).
PROBE = """
import ctypes
import threading
from rotjax.cpu import platform
print(platform.keep_large_buffers_in_heap())
class MallInfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ('arena ordblks smblks hblks hblkhd usmblks '
                                             'fsmblks uordblks fordblks keepcost').split()]
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.mallinfo2.restype = MallInfo2
block = libc.malloc(64 << 20)
print(libc.mallinfo2().hblkhd)
thread = threading.Thread(target=lambda: libc.malloc(100 << 10))
thread.start()
thread.join()
libc.malloc_stats()
"""


# Frees a 2.2 GB block at the top of the heap (over glibc's largest positive trim
# threshold, 2**31 - 1) and prints whether the heap's end moved back (a trim).
TRIM_PROBE = """
import ctypes
from rotjax.cpu import platform
platform.keep_large_buffers_in_heap()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
block = libc.malloc(2_200_000_000)
assert block, 'malloc failed'
end = libc.sbrk(0)
libc.free(block)
print(libc.sbrk(0) < end)
"""


def _probe(**env):
  out = subprocess.run(
    [sys.executable, '-c', PROBE],
    capture_output=True,
    text=True,
    check=True,
    env=testing.child_env(**env),
  )
  tuned, mmapped = out.stdout.split()
  arenas = sum(line.startswith('Arena ') for line in out.stderr.splitlines())
  return tuned == 'True', int(mmapped), arenas


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_large_buffers_stay_in_the_one_heap():
  tuned, mmapped, arenas = _probe()
  assert tuned and mmapped < 64 << 20  # the 64 MB buffer came from the heap
  assert arenas == 1  # and the other thread's buffer from the same one
  tuned, mmapped, arenas = _probe(ROTJAX_MALLOC_TUNING='0')
  assert (
    not tuned and mmapped >= 64 << 20
  )  # glibc's default: a fresh mmap per large buffer
  assert arenas >= 2  # and an arena per thread


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_freed_memory_is_never_given_back():
  trimmed = lambda **env: subprocess.run(
    [sys.executable, '-c', TRIM_PROBE],
    capture_output=True,
    text=True,
    check=True,
    env=testing.child_env(**env),
  ).stdout.strip()
  assert trimmed() == 'False'  # tuned: the heap keeps its pages
  # glibc's default threshold gives them back (mmap off, so that the block is in the heap).
  assert trimmed(ROTJAX_MALLOC_TUNING='0', MALLOC_MMAP_MAX_='0') == 'True'
