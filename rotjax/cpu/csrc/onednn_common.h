// What rotjax's oneDNN kernels (onednn_conv.cc, onednn_batchnorm.cc) share: one engine,
// one scratchpad, one lock around every call, and the plain-C string copy.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"

namespace rotjax_onednn {

inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Every primitive gets its scratchpad from us (scratchpad_mode::user). With oneDNN's default
// ("library") the scratchpad of gemm-based convolutions lives in the creating thread's
// thread-local storage; XLA runs custom calls on whichever pool thread is free, so a
// primitive created on one thread and run on another read freed memory: the segmentation
// fault of the fp32 backward-weights convolution under ONEDNN_MAX_CPU_ISA=AVX2.
inline dnnl::primitive_attr Attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// One oneDNN call at a time: XLA runs independent thunks (and the devices of a multi-device
// CPU client) on several threads, and concurrent OpenMP teams from those threads deadlocked
// GNU libgomp in a 2-device pmap. Each call still uses every core through its own OpenMP team.
inline std::mutex& RunMutex() {
  static std::mutex mu;
  return mu;
}

// One scratchpad for every call, grown to the largest asked for: the calls are serialized
// (RunMutex), so they can share it. Page-aligned, as oneDNN's own scratchpads are (its
// kernels may use aligned loads).
inline void* Scratch(size_t bytes) {
  static std::unique_ptr<void, decltype(&std::free)> buffer(nullptr, &std::free);
  static size_t capacity = 0;
  if (bytes > capacity) {
    size_t grown = (bytes + 4095) / 4096 * 4096;
    void* p = std::aligned_alloc(4096, grown);
    if (p == nullptr) throw std::bad_alloc();
    buffer.reset(p);
    capacity = grown;
  }
  return buffer.get();
}

inline dnnl::memory ScratchMemory(const dnnl::memory::desc& md) {
  return dnnl::memory(md, Engine(), Scratch(md.get_size()));
}

// Which dtype code (0: float32, 1: bfloat16) is which oneDNN type.
inline bool DataType(int64_t code, dnnl::memory::data_type* dt) {
  if (code == 0) *dt = dnnl::memory::data_type::f32;
  else if (code == 1) *dt = dnnl::memory::data_type::bf16;
  else return false;
  return true;
}

inline void Copy(const std::string& text, char* out, int64_t size) {
  if (out == nullptr || size <= 0) return;
  std::strncpy(out, text.c_str(), size - 1);
  out[size - 1] = 0;
}

}  // namespace rotjax_onednn
