"""Sparse projections on the CPU: read only the kept rows of ``W^T``.

Two implementations, one contract (``reference.sparse_linear_fused`` and
``reference.sparse_gate_up_act``):

* ``native``: a small C++ kernel (below, compiled on first use with the system's C++
  compiler into the user's cache, loaded with ctypes; no torch headers, so it builds in
  a few seconds), with AVX-512 or AVX2 loops as torch finds this CPU to have
  (``isa()``; ``TEAL_CPU_ISA=avx2`` or ``generic`` asks for less).  One call per
  projection does everything: it scores the input, lists the kept channels of each
  output segment, and accumulates the kept rows in
  fp32, with the output columns split evenly across the threads torch uses (OpenMP, the
  same runtime as torch's, so the two never fight over the cores).  Each thread reads a
  contiguous stretch of every kept row and prefetches rows ahead, which is what a
  memory-bound GEMV needs.  For ``gate|up`` it applies the activation too and returns
  ``act(gate) * up``, so the MLP middle costs no extra pass.  fp32, bf16 and fp16
  weights; accumulation always in fp32.
* ``embedding_bag``: pure torch, used where no C++ compiler is found (or when asked for
  with ``TEAL_CPU_KERNEL=embedding_bag``).  ``embedding_bag`` with per-sample weights is
  a gather-and-accumulate over rows; it parallelises over bags only, so ``W^T`` is
  viewed as ``[K * S, N / S]`` (S column chunks per row) and each chunk is a bag,
  which also gives every segment its own kept list in the same single call.

Why a compiled kernel at all: a decode step of the default model is ~30 layers x 4
projections, each a few hundred microseconds of memory traffic, and each extra torch op
costs a few microseconds of dispatch.  The pure-torch path needs about ten ops per
projection to build its index lists; the native path needs one call, which is what lets
sparsity show up in tokens per second.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from teal.errors import SettingError
from teal.kernels import reference
from teal.kernels.dispatch import register_backend, register_quant_backend
from teal.model.quant import QuantWeight

IMPLEMENTATIONS = ("native", "embedding_bag")
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ACT_CODE = {"silu": 0, "relu": 1, "relu2": 2, "gelu": 3, "drelu": 4}

_SOURCE = r"""
// teal CPU sparse GEMV.  y[b, n] = sum over kept i of x[b, i] * W^T[i, n], where channel i
// is kept for output segment p when |x[b, i]| * scale[i] > thr[p].
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

struct f16 { uint16_t bits; };  // IEEE half: F16C where built with it, else in software
struct b16 { uint16_t bits; };  // bfloat16

inline float load(const float* p) { return *p; }
inline float load(const b16* p) {
  uint32_t u = uint32_t(p->bits) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline float load(const f16* p) {
#ifdef __F16C__
  return _cvtsh_ss(p->bits);  // the same value in one instruction
#else
  const uint32_t h = p->bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu, u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half: renormalise
    int e = -1;
    do { ++e; man <<= 1; } while (!(man & 0x400u));
    u = sign | (uint32_t(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}

inline float load(const int8_t* p) { return float(*p); }  // int8 weight codes

inline void store(float v, float* o) { *o = v; }
inline void store(float v, b16* o) {  // round to nearest even, as torch does
  uint32_t u; std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) { o->bits = uint16_t((u >> 16) | 0x40u); return; }
  u += 0x7fffu + ((u >> 16) & 1u);
  o->bits = uint16_t(u >> 16);
}
inline void store(float v, f16* o) {  // round to nearest even
#ifdef __F16C__
  o->bits = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t u; std::memcpy(&u, &v, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  uint16_t h;
  if (a > 0x7f800000u) {
    h = uint16_t(sign | 0x7e00u);
  } else if (a >= 0x477ff000u) {  // rounds to >= 65520: infinity
    h = uint16_t(sign | 0x7c00u);
  } else if (a < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    float fa; std::memcpy(&fa, &a, 4);
    h = uint16_t(sign | uint32_t(std::nearbyint(fa * 16777216.0f)));
  } else {
    uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15
    r += 0xfffu + ((r >> 13) & 1u);
    h = uint16_t(sign | (r >> 13));
  }
  o->bits = h;
#endif
}

// exp for the activations, branch-free so the compiler vectorises the loop: range
// reduction by powers of two and a degree-6 polynomial on [-ln2/2, ln2/2] (about 1 ulp).
inline float vexp(float x) {
  x = std::fmin(std::fmax(x, -87.0f), 88.0f);
  const float k = std::floor(x * 1.44269504f + 0.5f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = uint32_t(int32_t(k) + 127) << 23;
  float scale; std::memcpy(&scale, &bits, 4);
  return p * scale;
}

inline float act(float g, int kind) {
  switch (kind) {
    case 0: return g / (1.0f + vexp(-g));                       // silu
    case 1: return g > 0.0f ? g : 0.0f;                          // relu
    case 2: { const float r = g > 0.0f ? g : 0.0f; return r * r; }  // relu^2
    case 4: return g > 0.0f ? g : 0.0f;                          // drelu's gate
    default: {                                                    // gelu, tanh form
      const float y = 0.7978845608f * (g + 0.044715f * g * g * g);
      const float t = 1.0f - 2.0f / (vexp(2.0f * y) + 1.0f);
      return 0.5f * g * (1.0f + t);
    }
  }
}

#ifdef __AVX2__
// vexp on eight lanes, operation for operation (no fused multiply-adds): equal bits.
inline __m256 vexp8(__m256 x) {
  const auto c = [](float v) { return _mm256_set1_ps(v); };
  x = _mm256_min_ps(_mm256_max_ps(x, c(-87.0f)), c(88.0f));
  const __m256 k = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, c(1.44269504f)), c(0.5f)));
  const __m256 r = _mm256_add_ps(_mm256_sub_ps(x, _mm256_mul_ps(k, c(0.693359375f))),
                                 _mm256_mul_ps(k, c(2.12194440e-4f)));
  __m256 p = c(1.9875691500e-4f);
  p = _mm256_add_ps(_mm256_mul_ps(p, r), c(1.3981999507e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), c(8.3334519073e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), c(4.1665795894e-2f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), c(1.6666665459e-1f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), c(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), c(1.0f));
  const __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(k), _mm256_set1_epi32(127));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
}
#endif

// g[0:n] = act(g[0:n]) with the activation chosen once, not per column; SiLU eight
// columns at a time (scalar, the gate|up epilogue was a tenth of an all-dropped block).
inline void act_chunk(float* g, int64_t n, int kind) {
  int64_t j = 0;
  switch (kind) {
    case 0:
#ifdef __AVX2__
      for (; j + 8 <= n; j += 8) {
        const __m256 x = _mm256_loadu_ps(g + j);
        const __m256 e = vexp8(_mm256_xor_ps(x, _mm256_set1_ps(-0.0f)));  // -x
        _mm256_storeu_ps(g + j, _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
      }
#endif
      for (; j < n; ++j) g[j] = g[j] / (1.0f + vexp(-g[j]));
      break;
    case 1:
    case 4: for (int64_t j = 0; j < n; ++j) g[j] = g[j] > 0.0f ? g[j] : 0.0f; break;
    case 2:
      for (int64_t j = 0; j < n; ++j) { const float r = g[j] > 0.0f ? g[j] : 0.0f; g[j] = r * r; }
      break;
    default: for (int64_t j = 0; j < n; ++j) g[j] = act(g[j], kind);
  }
}

constexpr int64_t ALIGN = 16;   // column split points fall on 64-byte lines for fp32
// Software prefetch of the kept rows ahead of the one being added: whole rows, AHEAD
// rows ahead, for float and int8 weights; the first Q4_LINES lines of int4 rows, Q4_AHEAD
// ahead (measured on the AMD EPYC, 2026-12-07: whole float rows 8 ahead cut a dense
// gate|up call by 11-16 % against 8 lines 16 ahead; whole int4 rows were no faster).
constexpr int AHEAD = 8;
constexpr int64_t Q4_LINES = 8;
constexpr int Q4_AHEAD = 16;

#ifdef __AVX2__
// Eight weights as fp32 lanes: fp32 as is, bf16 by a 16-bit shift, fp16 converted (F16C;
// exact, as the software load), int8 codes widened.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const f16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const b16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const int8_t* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
#endif
#ifdef __AVX512F__
// Sixteen at a time where the build has AVX-512.  Every column still gets the same
// operations in the same order, so a 512-bit build gives the 256-bit one's results bit
// for bit: its loops only take 16 columns a step, and leave the rest to the 8-wide ones.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const f16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const b16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const int8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}
#endif

// Four rows at a time: acc[j] += v0*r0[j] + v1*r1[j] + v2*r2[j] + v3*r3[j].  Explicit AVX2
// (and AVX-512) for fp32, bf16, fp16 and int8 codes (an int8 weight's column scale is
// applied to the finished sums); a plain loop for the tail.
template <typename W>
inline void axpy4(float* acc, int64_t width, const float* v, const W* r0, const W* r1,
                  const W* r2, const W* r3) {
  int64_t j = 0;
#ifdef __AVX512F__
  {
    const __m512 a0 = _mm512_set1_ps(v[0]), a1 = _mm512_set1_ps(v[1]);
    const __m512 a2 = _mm512_set1_ps(v[2]), a3 = _mm512_set1_ps(v[3]);
    for (; j + 16 <= width; j += 16) {
      __m512 s = _mm512_loadu_ps(acc + j);
      s = _mm512_fmadd_ps(a0, load16(r0 + j), s);
      s = _mm512_fmadd_ps(a1, load16(r1 + j), s);
      s = _mm512_fmadd_ps(a2, load16(r2 + j), s);
      s = _mm512_fmadd_ps(a3, load16(r3 + j), s);
      _mm512_storeu_ps(acc + j, s);
    }
  }
#endif
#ifdef __AVX2__
  {
    const __m256 a0 = _mm256_set1_ps(v[0]), a1 = _mm256_set1_ps(v[1]);
    const __m256 a2 = _mm256_set1_ps(v[2]), a3 = _mm256_set1_ps(v[3]);
    for (; j + 8 <= width; j += 8) {
      __m256 s = _mm256_loadu_ps(acc + j);
      s = _mm256_fmadd_ps(a0, load8(r0 + j), s);
      s = _mm256_fmadd_ps(a1, load8(r1 + j), s);
      s = _mm256_fmadd_ps(a2, load8(r2 + j), s);
      s = _mm256_fmadd_ps(a3, load8(r3 + j), s);
      _mm256_storeu_ps(acc + j, s);
    }
  }
#endif
  for (; j < width; ++j)
    acc[j] += v[0] * load(r0 + j) + v[1] * load(r1 + j) + v[2] * load(r2 + j) +
              v[3] * load(r3 + j);
}

// acc[0:width] = sum_r val[r] * w[idx[r], c0:c0+width]   (row stride n_cols)
template <typename T>
void gather_rows(const T* w, int64_t n_cols, int64_t c0, int64_t width, const int32_t* idx,
                 const float* val, int64_t n, float* acc) {
  for (int64_t j = 0; j < width; ++j) acc[j] = 0.0f;
  const int64_t line = 64 / int64_t(sizeof(T));
  // The rows are scattered, so the hardware prefetcher cannot guess the next one; once
  // a row is started it streams it, but not far enough ahead to keep the memory busy,
  // so whole rows AHEAD are prefetched.
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) {
    if (r + AHEAD + 4 <= n) {
      for (int q = 0; q < 4; ++q) {
        const T* pre = w + int64_t(idx[r + AHEAD + q]) * n_cols + c0;
        for (int64_t j = 0; j < width; j += line) __builtin_prefetch(pre + j, 0, 3);
      }
    }
    axpy4(acc, width, val + r, w + int64_t(idx[r]) * n_cols + c0,
          w + int64_t(idx[r + 1]) * n_cols + c0, w + int64_t(idx[r + 2]) * n_cols + c0,
          w + int64_t(idx[r + 3]) * n_cols + c0);
  }
  for (; r < n; ++r) {
    const T* r0 = w + int64_t(idx[r]) * n_cols + c0;
    const float v0 = val[r];
    for (int64_t j = 0; j < width; ++j) acc[j] += v0 * load(r0 + j);
  }
}

// int4 weights (teal.model.quant): codes [K, N/2], where a segment of width W keeps its
// column j in the low nibble of byte j and column j + W/2 in the high one; group scales
// and offsets [ceil(K/G), N], fp32 (sfmt 0) or fp16 (sfmt 2): w[k, n] = q s + m over the
// group of k.  Zero-point codes and the symmetric format arrive as offsets (Python side).
struct Q4 {
  const uint8_t* q;
  const void* s;
  const void* m;
  int64_t G, sfmt;
};

#ifdef __AVX2__
// Eight bytes of a row as two fp32 lanes: low nibbles (columns b..b+7) and high nibbles
// (columns W/2+b..).
inline void nibbles8(const uint8_t* p, __m256* lo, __m256* hi) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  *lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
#endif
#ifdef __AVX512F__
inline void nibbles16(const uint8_t* p, __m512* lo, __m512* hi) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  *lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
  *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
#endif

#ifdef __AVX512F__
// acc += s * sum + m * vs over sixteen columns.
template <typename S>
inline void finish16(float* acc, const S* s, const S* m, __m512 sum, __m512 vs) {
  const __m512 a = _mm512_fmadd_ps(load16(s), sum, _mm512_loadu_ps(acc));
  _mm512_storeu_ps(acc, _mm512_fmadd_ps(load16(m), vs, a));
}
#endif
#ifdef __AVX2__
template <typename S>
inline void finish8(float* acc, const S* s, const S* m, __m256 sum, __m256 vs) {
  const __m256 a = _mm256_fmadd_ps(load8(s), sum, _mm256_loadu_ps(acc));
  _mm256_storeu_ps(acc, _mm256_fmadd_ps(load8(m), vs, a));
}
#endif

// One pass of a group's walk over R of its kept rows: the group's sums of raw codes,
// ga[c] += sum over the R rows of v[i] * code[i, c] (low nibbles give columns 0..half,
// high ones half..2 half).  The group's first pass starts from zero instead of reading
// ga, and its last applies the group's scale and offset and adds the result to acc
// (acc += s * sum + m * vs, vs the sum of the group's kept inputs) instead of writing ga
// back: a group of at most four kept rows never touches ga, and no separate pass over the
// width applies the scales.
template <int R, bool FIRST, bool LAST, typename S>
inline void q4_pass(float* ga, float* acc, const S* s, const S* m, float vs, int64_t half,
                    const float* v, const uint8_t* const* rows) {
  int64_t j = 0;
#ifdef __AVX512F__
  {
    __m512 a[R];
    for (int i = 0; i < R; ++i) a[i] = _mm512_set1_ps(v[i]);
    const __m512 vv = _mm512_set1_ps(vs);
    for (; j + 16 <= half; j += 16) {
      __m512 sl = _mm512_setzero_ps(), sh = _mm512_setzero_ps();
      if constexpr (!FIRST) { sl = _mm512_loadu_ps(ga + j); sh = _mm512_loadu_ps(ga + half + j); }
      for (int i = 0; i < R; ++i) {
        __m512 l, h;
        nibbles16(rows[i] + j, &l, &h);
        sl = _mm512_fmadd_ps(a[i], l, sl);
        sh = _mm512_fmadd_ps(a[i], h, sh);
      }
      if constexpr (LAST) {
        finish16(acc + j, s + j, m + j, sl, vv);
        finish16(acc + half + j, s + half + j, m + half + j, sh, vv);
      } else {
        _mm512_storeu_ps(ga + j, sl); _mm512_storeu_ps(ga + half + j, sh);
      }
    }
  }
#endif
#ifdef __AVX2__
  {
    __m256 a[R];
    for (int i = 0; i < R; ++i) a[i] = _mm256_set1_ps(v[i]);
    const __m256 vv = _mm256_set1_ps(vs);
    for (; j + 8 <= half; j += 8) {
      __m256 sl = _mm256_setzero_ps(), sh = _mm256_setzero_ps();
      if constexpr (!FIRST) { sl = _mm256_loadu_ps(ga + j); sh = _mm256_loadu_ps(ga + half + j); }
      for (int i = 0; i < R; ++i) {
        __m256 l, h;
        nibbles8(rows[i] + j, &l, &h);
        sl = _mm256_fmadd_ps(a[i], l, sl);
        sh = _mm256_fmadd_ps(a[i], h, sh);
      }
      if constexpr (LAST) {
        finish8(acc + j, s + j, m + j, sl, vv);
        finish8(acc + half + j, s + half + j, m + half + j, sh, vv);
      } else {
        _mm256_storeu_ps(ga + j, sl); _mm256_storeu_ps(ga + half + j, sh);
      }
    }
  }
#endif
  for (; j < half; ++j) {
    float sl = FIRST ? 0.0f : ga[j], sh = FIRST ? 0.0f : ga[half + j];
    for (int i = 0; i < R; ++i) {
      sl += v[i] * float(rows[i][j] & 15);
      sh += v[i] * float(rows[i][j] >> 4);
    }
    if constexpr (LAST) {
      acc[j] += load(s + j) * sl + load(m + j) * vs;
      acc[half + j] += load(s + half + j) * sh + load(m + half + j) * vs;
    } else {
      ga[j] = sl;
      ga[half + j] = sh;
    }
  }
}

// One group's kept rows idx[r..e) in passes of four (the last of one to four).
template <typename S>
void q4_group(const uint8_t* q, int64_t rb, const S* s, const S* m, int64_t half,
              const int32_t* idx, const float* val, int64_t r, int64_t e, int64_t n,
              float* ga, float* acc) {
  float vs = 0.0f;
  for (int64_t i = r; i < e; ++i) vs += val[i];
  const int64_t head = std::min(half, Q4_LINES * 64);
  for (int64_t i = r; i < e; i += 4) {
    const int64_t R = std::min<int64_t>(4, e - i);
    for (int64_t k = i + Q4_AHEAD; k < std::min(i + Q4_AHEAD + R, n); ++k) {
      const uint8_t* pre = q + int64_t(idx[k]) * rb;
      for (int64_t j = 0; j < head; j += 64) __builtin_prefetch(pre + j, 0, 3);
    }
    const uint8_t* rows[4] = {};
    for (int64_t k = 0; k < R; ++k) rows[k] = q + int64_t(idx[i + k]) * rb;
    const bool first = i == r, last = i + R == e;
    const float* v = val + i;
#define TEAL_Q4_PASS(RR)                                                        \
  if (first && last) q4_pass<RR, true, true>(ga, acc, s, m, vs, half, v, rows); \
  else if (first) q4_pass<RR, true, false>(ga, acc, s, m, vs, half, v, rows);   \
  else if (last) q4_pass<RR, false, true>(ga, acc, s, m, vs, half, v, rows);    \
  else q4_pass<RR, false, false>(ga, acc, s, m, vs, half, v, rows);
    switch (R) {
      case 4: TEAL_Q4_PASS(4) break;
      case 3: TEAL_Q4_PASS(3) break;
      case 2: TEAL_Q4_PASS(2) break;
      default: TEAL_Q4_PASS(1) break;
    }
#undef TEAL_Q4_PASS
  }
}

// The int4 form of gather_rows: the kept rows (ascending channels) group by group, raw
// codes summed per group, the group's scale and offset applied once per column at its
// last pass.
inline void gather_rows(const Q4* w, int64_t n_cols, int64_t c0, int64_t width,
                        const int32_t* idx, const float* val, int64_t n, float* acc) {
  static thread_local std::vector<float> gbuf;
  if (int64_t(gbuf.size()) < width) gbuf.resize(size_t(width));
  float* ga = gbuf.data();
  for (int64_t j = 0; j < width; ++j) acc[j] = 0.0f;
  const int64_t rb = n_cols / 2, half = width / 2, G = w->G;
  const uint8_t* q = w->q + c0 / 2;
  int64_t r = 0;
  while (r < n) {
    const int64_t g = idx[r] / G;
    int64_t e = r + 1;
    while (e < n && idx[e] / G == g) ++e;
    const int64_t so = g * n_cols + c0;
    if (w->sfmt == 2)
      q4_group(q, rb, (const f16*)w->s + so, (const f16*)w->m + so, half, idx, val, r, e, n,
               ga, acc);
    else
      q4_group(q, rb, (const float*)w->s + so, (const float*)w->m + so, half, idx, val, r, e,
               n, ga, acc);
    r = e;
  }
}

// v rounded to T's precision (identity for fp32).
template <typename T>
inline float rnd(float v) { T t; store(v, &t); return load(&t); }

// Kept channels of one input row for one threshold: indices and values, in order.  The
// test is the reference's: in x's dtype, so the threshold and (with a scale) the scale and
// the score |x| * s are rounded to it first; both sides are then exact in fp32.
template <typename T>
int64_t compact(const T* x, int64_t xs_k, int64_t K, const float* scale, float thr,
                int32_t* idx, float* val) {
  int64_t n = 0;
  const float t = rnd<T>(thr);
  for (int64_t i = 0; i < K; ++i) {
    const float v = load(x + i * xs_k);
    const float s = scale ? rnd<T>(std::fabs(v) * rnd<T>(scale[i])) : std::fabs(v);
    if (s > t) { idx[n] = int32_t(i); val[n] = v; ++n; }
  }
  return n;
}

struct Scratch {
  std::vector<int32_t> idx;
  std::vector<float> val;
  std::vector<int64_t> cnt;
  void fit(int64_t lists, int64_t K) {
    if (int64_t(idx.size()) < lists * K) { idx.resize(lists * K); val.resize(lists * K); }
    if (int64_t(cnt.size()) < lists) cnt.resize(lists);
  }
};
Scratch& scratch() { static thread_local Scratch s; return s; }

// Column range [lo, hi) of thread t out of nt over `cols` columns, on ALIGN boundaries.
inline void split(int64_t cols, int t, int nt, int64_t* lo, int64_t* hi) {
  const int64_t units = (cols + ALIGN - 1) / ALIGN;
  *lo = std::min(cols, (units * t / nt) * ALIGN);
  *hi = std::min(cols, (units * (t + 1) / nt) * ALIGN);
}

struct Partials {
  std::vector<float> buf;
  float* fit(int64_t n) {
    if (int64_t(buf.size()) < n) buf.resize(size_t(n));
    return buf.data();
  }
};
Partials& partials() { static thread_local Partials p; return p; }

// Each thread takes an equal share of every kept list and streams whole kept rows (long
// contiguous reads are what the memory system serves fastest), accumulating the full
// output width in its own partial sums; after a barrier the threads add the partials up,
// each over its share of the columns.
template <typename T, typename Finish>
void run_lists(const T* w, int64_t N, int P, const int64_t* bounds, int64_t B, int64_t K,
               const int32_t* idx, const float* val, const int64_t* cnt, int threads,
               Finish finish) {
  float* part = partials().fit(int64_t(threads) * B * N);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    float* mine = part + int64_t(t) * B * N;
    for (int64_t b = 0; b < B; ++b)
      for (int p = 0; p < P; ++p) {
        const int64_t l = b * P + p, n = cnt[l];
        const int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
        gather_rows(w, N, bounds[p], bounds[p + 1] - bounds[p], idx + l * K + lo,
                    val + l * K + lo, hi - lo, mine + b * N + bounds[p]);
      }
#pragma omp barrier
    int64_t c0, c1;
    split(finish.cols, t, nt, &c0, &c1);
    for (int64_t b = 0; b < B; ++b) finish(part, nt, b, c0, c1);
  }
}

// col_scale (nullable, [N]): int8 weights' per-output scale, applied to each sum.
template <typename T>
struct SumOut {
  int64_t cols, N, B;
  T* out;
  const float* col_scale;
  void operator()(const float* part, int nt, int64_t b, int64_t c0, int64_t c1) const {
    for (int64_t j = c0; j < c1; ++j) {
      float s = 0.0f;
      for (int q = 0; q < nt; ++q) s += part[(int64_t(q) * B + b) * N + j];
      store(col_scale ? s * col_scale[j] : s, out + b * N + j);
    }
  }
};

template <typename T>
struct ActOut {
  int64_t cols, N, B;
  int kind;
  T* out;
  const float* col_scale;  // nullable, [2F]: gate's then up's
  void operator()(const float* part, int nt, int64_t b, int64_t c0, int64_t c1) const {
    // In chunks, each step its own loop with the activation chosen outside it, so the
    // compiler vectorises the exponentials (one call of act() per column, with its
    // switch inside, ran scalar: a tenth of an all-dropped block).
    constexpr int64_t CH = 256;
    float g[CH], u[CH];
    const int64_t F = cols;
    for (int64_t j0 = c0; j0 < c1; j0 += CH) {
      const int64_t len = std::min(CH, c1 - j0);
      for (int64_t j = 0; j < len; ++j) { g[j] = 0.0f; u[j] = 0.0f; }
      for (int q = 0; q < nt; ++q) {
        const float* pg = part + (int64_t(q) * B + b) * N + j0;
        for (int64_t j = 0; j < len; ++j) { g[j] += pg[j]; u[j] += pg[F + j]; }
      }
      if (col_scale) {
        for (int64_t j = 0; j < len; ++j) {
          g[j] *= col_scale[j0 + j];
          u[j] *= col_scale[F + j0 + j];
        }
      }
      act_chunk(g, len, kind);
      if (kind == 4)  // dReLU: the up branch through ReLU as well
        for (int64_t j = 0; j < len; ++j) u[j] = u[j] > 0.0f ? u[j] : 0.0f;
      for (int64_t j = 0; j < len; ++j) store(g[j] * u[j], out + b * F + j0 + j);
    }
  }
};

template <typename T, typename W>
void project(const T* x, int64_t B, int64_t xs_b, int64_t xs_k, const float* scale, const W* w,
             const float* col_scale, int64_t K, int64_t N, int P, const int64_t* bounds,
             const float* thr, T* out, int threads) {
  Scratch& s = scratch();
  s.fit(B * P, K);
  for (int64_t b = 0; b < B; ++b)
    for (int p = 0; p < P; ++p) {
      const int64_t l = b * P + p;
      s.cnt[l] = compact(x + b * xs_b, xs_k, K, scale, thr[p], s.idx.data() + l * K,
                         s.val.data() + l * K);
    }
  run_lists(w, N, P, bounds, B, K, s.idx.data(), s.val.data(), s.cnt.data(), threads,
            SumOut<T>{N, N, B, out, col_scale});
}

template <typename T, typename W>
void gate_up(const T* x, int64_t B, int64_t xs_b, int64_t xs_k, const float* scale, const W* w,
             const float* col_scale, int64_t K, int64_t F, const float* thr, int kind, T* out,
             int threads) {
  Scratch& s = scratch();
  s.fit(B * 2, K);
  for (int64_t b = 0; b < B; ++b)
    for (int p = 0; p < 2; ++p) {
      const int64_t l = b * 2 + p;
      s.cnt[l] = compact(x + b * xs_b, xs_k, K, scale, thr[p], s.idx.data() + l * K,
                         s.val.data() + l * K);
    }
  const int64_t bounds[3] = {0, F, 2 * F};
  run_lists(w, 2 * F, 2, bounds, B, K, s.idx.data(), s.val.data(), s.cnt.data(), threads,
            ActOut<T>{F, 2 * F, B, kind, out, col_scale});
}

// y[b, v] = sum_k w[v, k] x[b, k] for a row-major w [V, K] (torch.nn.functional.linear's
// layout, e.g. a tied lm_head): each thread streams a contiguous block of rows.
template <typename W>
inline float dot(const W* w, const float* x, int64_t K) {
  int64_t k = 0;
  float s = 0.0f;
#ifdef __AVX512F__
  // One 16-lane accumulator is the 8-wide loop's two side by side: the same sums.
  __m512 a = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) a = _mm512_fmadd_ps(load16(w + k), _mm512_loadu_ps(x + k), a);
  __m256 a0 = _mm512_castps512_ps256(a), a1 = _mm512_extractf32x8_ps(a, 1);
#elif defined(__AVX2__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(load8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
  }
#endif
#ifdef __AVX2__
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(a0, a1));
  for (int i = 0; i < 8; ++i) s += t[i];
#endif
  for (; k < K; ++k) s += load(w + k) * x[k];
  return s;
}

template <typename T>
void linear_rows(const T* x, int64_t B, int64_t xs_b, int64_t xs_k, const T* w, int64_t V,
                 int64_t K, T* out, int threads) {
  std::vector<float> xf(size_t(B * K));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) xf[b * K + k] = load(x + b * xs_b + k * xs_k);
  const float* X = xf.data();
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t lo = V * t / nt, hi = V * (t + 1) / nt;
    for (int64_t v = lo; v < hi; ++v)
      for (int64_t b = 0; b < B; ++b) store(dot(w + v * K, X + b * K, K), out + b * V + v);
  }
}

// ----- the rest of a one-token decode step ------------------------------------------
// At one token per step the projections are a few hundred microseconds per layer, and
// the glue between them (norms, RoPE, the cache write, attention over a few hundred
// positions) is two dozen small torch ops of a few microseconds each: a tenth of the
// step.  These two functions do that glue in one call each, rounding where the torch
// reference rounds (each op's result is stored in the model's dtype).

// out[b] = w * (x[b] * rsqrt(mean(x[b]^2) + eps)), normalised in fp32, rounded to T
// before the gain, as decoder.RMSNorm does.
template <typename T>
void rms_norm(const T* x, int64_t B, int64_t D, const T* w, float eps, T* out) {
  for (int64_t b = 0; b < B; ++b) {
    const T* xb = x + b * D;
    float ss = 0.0f;
    for (int64_t d = 0; d < D; ++d) { const float v = load(xb + d); ss += v * v; }
    const float r = 1.0f / std::sqrt(ss / float(D) + eps);
    for (int64_t d = 0; d < D; ++d) store(load(w + d) * rnd<T>(load(xb + d) * r), out + b * D + d);
  }
}

// RoPE (rotate-half layout) of one head vector, rounded as apply_rope's three ops are.
template <typename T>
inline void rope(const T* x, const T* cos, const T* sin, int D, float* y) {
  const int h = D / 2;
  for (int d = 0; d < D; ++d) {
    const float rot = d < h ? -load(x + d + h) : load(x + d - h);
    y[d] = rnd<T>(rnd<T>(load(x + d) * load(cos + d)) + rnd<T>(rot * load(sin + d)));
  }
}

// One query position per row b at cache slot `pos`: RoPE on q and k, k and v written to
// the cache ([B, Hkv, L, D], contiguous), then softmax(q k^T * scale) v over the slots
// (pos - window, pos] (window <= 0: all of [0, pos]); query head h reads kv head
// h / (H / Hkv).  Scores and softmax in fp32; out [B, H * D] rounded to T.
template <typename T>
void decode_attention(const T* qkv, int64_t B, int64_t qkv_stride, const T* cos, const T* sin,
                      T* kc, T* vc, int64_t L, int64_t pos, int64_t window, int H, int Hkv,
                      int D, float scale, T* out, int threads) {
  std::vector<float> tmp(static_cast<size_t>(D));
  for (int64_t b = 0; b < B; ++b)
    for (int g = 0; g < Hkv; ++g) {
      const T* k = qkv + b * qkv_stride + int64_t(H + g) * D;
      const T* v = k + int64_t(Hkv) * D;
      T* kd = kc + ((b * Hkv + g) * L + pos) * D;
      T* vd = vc + ((b * Hkv + g) * L + pos) * D;
      rope(k, cos, sin, D, tmp.data());
      for (int d = 0; d < D; ++d) { store(tmp[d], kd + d); vd[d] = v[d]; }
    }
  const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
  const int64_t n = pos - lo + 1;
  const int group = H / Hkv;
  // Threads only pay off once the cache is long; a parallel region costs microseconds.
  const bool par = threads > 1 && B * H * n * D >= (int64_t(1) << 16);
#pragma omp parallel for num_threads(threads) if (par) collapse(2)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      std::vector<float> q(static_cast<size_t>(D)), p(static_cast<size_t>(n));
      std::vector<float> acc(static_cast<size_t>(D), 0.0f);
      rope(qkv + b * qkv_stride + int64_t(h) * D, cos, sin, D, q.data());
      const int64_t base = (b * Hkv + h / group) * L;
      float m = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        // Vectorised dot (eight lanes, two chains): a scalar sum waits on the add
        // latency at every element, which made attention a tenth of a sparse step.
        p[j] = dot(kc + (base + lo + j) * D, q.data(), D) * scale;
        m = std::max(m, p[j]);
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < n; ++j) { p[j] = std::exp(p[j] - m); sum += p[j]; }
      for (int64_t j = 0; j < n; ++j) {
        const T* vj = vc + (base + lo + j) * D;
        const float pj = p[j];
        for (int d = 0; d < D; ++d) acc[d] += pj * load(vj + d);
      }
      const float inv = 1.0f / sum;
      for (int d = 0; d < D; ++d) store(acc[d] * inv, out + (b * H + h) * D + d);
    }
}

// One whole decoder block for a one-token step, sparse on the CPU: the same functions
// the model calls one by one from Python (rms_norm, project, decode_attention, gate_up),
// in the model's order and with its roundings (each residual add rounded to T, as the
// torch add is), so the result is bit-identical to the op-by-op path; only the
// ~10 Python calls per layer (15 us each) are gone.  Field order matches _BlockPlan.
struct BlockPlan {
  int64_t dtype, dim, heads, kv_heads, head_dim, ffn, cache_len, window, act;
  int64_t wfmt;  // the four projection weights: 0 float, 1 int8 codes with column scales,
                 // 2 int4 (each weight pointer then points to a Q4)
  const void *attn_norm, *wqkv, *bqkv, *wo, *ffn_norm, *w_gate_up, *w_down;
  void *k_cache, *v_cache;
  const float *thr;  // [7]: q, k, v, o, gate, up, down
  const float *s_attn_in, *s_attn_out, *s_mlp_in, *s_mlp_mid;  // nullable
  const float *c_qkv, *c_o, *c_gate_up, *c_down;  // int8 column scales, else null
  const int64_t* qkv_bounds;  // [4]
  float eps, attn_scale;
};

template <typename T>
struct BlockBuffers {
  std::vector<T> x, qkv, attn, o, mid;
};

template <typename T, typename W>
void block_decode(const BlockPlan& p, const T* h_in, T* h_out, int64_t B, int64_t pos,
                  const T* cos, const T* sin, int threads) {
  static thread_local BlockBuffers<T> buf;
  const int64_t D = p.dim, F = p.ffn, HD = p.heads * p.head_dim;
  const int64_t NQKV = (p.heads + 2 * p.kv_heads) * p.head_dim;
  buf.x.resize(size_t(B * D)); buf.qkv.resize(size_t(B * NQKV)); buf.attn.resize(size_t(B * HD));
  buf.o.resize(size_t(B * D)); buf.mid.resize(size_t(B * F));
  const int64_t one[2] = {0, D};
  rms_norm(h_in, B, D, (const T*)p.attn_norm, p.eps, buf.x.data());
  project(buf.x.data(), B, D, int64_t(1), p.s_attn_in, (const W*)p.wqkv, p.c_qkv, D, NQKV, 3,
          p.qkv_bounds, p.thr, buf.qkv.data(), threads);
  if (p.bqkv) {
    const T* bias = (const T*)p.bqkv;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < NQKV; ++j) {
        T* y = buf.qkv.data() + b * NQKV + j;
        store(load(y) + load(bias + j), y);
      }
  }
  decode_attention(buf.qkv.data(), B, NQKV, cos, sin, (T*)p.k_cache, (T*)p.v_cache,
                   p.cache_len, pos, p.window, int(p.heads), int(p.kv_heads), int(p.head_dim),
                   p.attn_scale, buf.attn.data(), threads);
  project(buf.attn.data(), B, HD, int64_t(1), p.s_attn_out, (const W*)p.wo, p.c_o, HD, D, 1,
          one, p.thr + 3, buf.o.data(), threads);
  for (int64_t i = 0; i < B * D; ++i) store(load(h_in + i) + load(buf.o.data() + i), h_out + i);
  rms_norm(h_out, B, D, (const T*)p.ffn_norm, p.eps, buf.x.data());
  gate_up(buf.x.data(), B, D, int64_t(1), p.s_mlp_in, (const W*)p.w_gate_up, p.c_gate_up, D, F,
          p.thr + 4, int(p.act), buf.mid.data(), threads);
  project(buf.mid.data(), B, F, int64_t(1), p.s_mlp_mid, (const W*)p.w_down, p.c_down, F, D, 1,
          one, p.thr + 6, buf.o.data(), threads);
  for (int64_t i = 0; i < B * D; ++i) store(load(h_out + i) + load(buf.o.data() + i), h_out + i);
}

}  // namespace

extern "C" {

// wfmt: 0 weights in the activations' dtype, 1 int8 codes with column scales col_scale,
// 2 int4 (w points to a Q4).  TEAL_WFMT runs CALL(T, W) for the activation type T of
// dtype and the weight type W of wfmt.
#define TEAL_WFMT(dtype, wfmt, CALL)                         \
  switch ((dtype) * 3 + (wfmt)) {                           \
    case 0: CALL(float, float); case 1: CALL(float, int8_t); \
    case 2: CALL(float, Q4);                                \
    case 3: CALL(b16, b16); case 4: CALL(b16, int8_t);       \
    case 5: CALL(b16, Q4);                                  \
    case 6: CALL(f16, f16); case 7: CALL(f16, int8_t);       \
    case 8: CALL(f16, Q4);                                  \
    default: return 1;                                      \
  }

int teal_project(const void* x, int64_t B, int64_t xs_b, int64_t xs_k, const float* scale,
                 const void* w, int wfmt, const float* col_scale, int64_t K, int64_t N,
                 int dtype, int P, const int64_t* bounds, const float* thr, void* out,
                 int threads) {
  if (wfmt < 0 || wfmt > 2) return 1;
#define TEAL_PROJECT(T, W)                                                                  \
  project((const T*)x, B, xs_b, xs_k, scale, (const W*)w, col_scale, K, N, P, bounds, thr, \
          (T*)out, threads);                                                               \
  return 0
  TEAL_WFMT(dtype, wfmt, TEAL_PROJECT)
#undef TEAL_PROJECT
}

int teal_gate_up(const void* x, int64_t B, int64_t xs_b, int64_t xs_k, const float* scale,
                 const void* w, int wfmt, const float* col_scale, int64_t K, int64_t F,
                 int dtype, const float* thr, int kind, void* out, int threads) {
  if (wfmt < 0 || wfmt > 2) return 1;
#define TEAL_GATE_UP(T, W)                                                                \
  gate_up((const T*)x, B, xs_b, xs_k, scale, (const W*)w, col_scale, K, F, thr, kind,    \
          (T*)out, threads);                                                             \
  return 0
  TEAL_WFMT(dtype, wfmt, TEAL_GATE_UP)
#undef TEAL_GATE_UP
}

int teal_linear_rows(const void* x, int64_t B, int64_t xs_b, int64_t xs_k, const void* w,
                     int64_t V, int64_t K, int dtype, void* out, int threads) {
  switch (dtype) {
    case 0: linear_rows((const float*)x, B, xs_b, xs_k, (const float*)w, V, K, (float*)out,
                        threads); return 0;
    case 1: linear_rows((const b16*)x, B, xs_b, xs_k, (const b16*)w, V, K, (b16*)out,
                        threads); return 0;
    case 2: linear_rows((const f16*)x, B, xs_b, xs_k, (const f16*)w, V, K, (f16*)out,
                        threads); return 0;
    default: return 1;
  }
}


int teal_rms_norm(const void* x, int64_t B, int64_t D, const void* w, float eps, int dtype,
                  void* out) {
  switch (dtype) {
    case 0: rms_norm((const float*)x, B, D, (const float*)w, eps, (float*)out); return 0;
    case 1: rms_norm((const b16*)x, B, D, (const b16*)w, eps, (b16*)out); return 0;
    case 2: rms_norm((const f16*)x, B, D, (const f16*)w, eps, (f16*)out); return 0;
    default: return 1;
  }
}

int teal_decode_attention(const void* qkv, int64_t B, int64_t qkv_stride, const void* cos,
                          const void* sin, void* kc, void* vc, int64_t L, int64_t pos,
                          int64_t window, int H, int Hkv, int D, float scale, int dtype,
                          void* out, int threads) {
  switch (dtype) {
    case 0: decode_attention((const float*)qkv, B, qkv_stride, (const float*)cos,
                             (const float*)sin, (float*)kc, (float*)vc, L, pos, window, H, Hkv,
                             D, scale, (float*)out, threads); return 0;
    case 1: decode_attention((const b16*)qkv, B, qkv_stride, (const b16*)cos, (const b16*)sin,
                             (b16*)kc, (b16*)vc, L, pos, window, H, Hkv, D, scale, (b16*)out,
                             threads); return 0;
    case 2: decode_attention((const f16*)qkv, B, qkv_stride, (const f16*)cos, (const f16*)sin,
                             (f16*)kc, (f16*)vc, L, pos, window, H, Hkv, D, scale, (f16*)out,
                             threads); return 0;
    default: return 1;
  }
}


int teal_block_decode(const BlockPlan* plan, const void* h_in, void* h_out, int64_t B,
                      int64_t pos, const void* cos, const void* sin, int threads) {
  if (pos < 0 || pos >= plan->cache_len) return 2;
  if (plan->wfmt < 0 || plan->wfmt > 2) return 1;
#define TEAL_BLOCK(T, W)                                                                  \
  block_decode<T, W>(*plan, (const T*)h_in, (T*)h_out, B, pos, (const T*)cos, (const T*)sin, \
                     threads);                                                            \
  return 0
  TEAL_WFMT(plan->dtype, plan->wfmt, TEAL_BLOCK)
#undef TEAL_BLOCK
}

// Blocks plans[0..n) in order, each on the previous one's output: one call per step
// instead of one per block (each Python-side call costs tens of microseconds, a tenth
// of a sparse step of a small model).  block_decode may run in place (it reads each
// element of its input before it writes the same element of its output).
int teal_blocks_decode(const BlockPlan* plans, int64_t n, const void* h_in, void* h_out,
                       int64_t B, int64_t pos, const void* cos, const void* sin, int threads) {
  for (int64_t i = 0; i < n; ++i) {
    const int rc = teal_block_decode(plans + i, i == 0 ? h_in : h_out, h_out, B, pos, cos, sin,
                                     threads);
    if (rc) return rc;
  }
  return 0;
}

}  // extern "C"
"""


# ----- building and loading the native kernel ------------------------------------------


def _compile_flags() -> list[str]:
    # No contraction of a * b + c into one FMA: the decode glue rounds each product as
    # the torch ops it replaces do (the GEMV loops use FMA intrinsics explicitly).
    flags = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno",
             "-ffp-contract=off"]  # fmt: skip
    # Vector width from what torch itself found on this CPU, not -march=native: the
    # library may be cached on a shared disk and loaded on another x86 machine (the
    # flags are part of its cache key).
    width = isa()
    if width in ("avx2", "avx512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    if width == "avx512":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    return flags


ISAS = ("generic", "avx2", "avx512")


def isa() -> str:
    """The vector instructions the native kernel is built with: ``avx512``, ``avx2`` or
    ``generic`` (plain C++), as torch found this CPU to support, or narrower when the
    environment variable ``TEAL_CPU_ISA`` asks for it.  AVX2 and AVX-512 give the same
    results bit for bit (each output column sees the same FMAs in the same order); plain
    C++ rounds each product, so it agrees within rounding."""
    cap = torch.backends.cpu.get_cpu_capability() if _is_x86() else "DEFAULT"
    found = {"AVX512": "avx512", "AVX2": "avx2"}.get(cap, "generic")
    want = os.environ.get("TEAL_CPU_ISA", found).strip().lower()
    if want not in ISAS:
        raise SettingError(f"TEAL_CPU_ISA={want!r} is not one of {', '.join(ISAS)}; unset it")
    return ISAS[min(ISAS.index(want), ISAS.index(found))]


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def _cache_dir() -> Path:
    from teal.data.packages import cache_dir

    return cache_dir() / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _build(cxx: str, target: Path) -> None:
    """Compile into a temporary file and rename it into place, so two processes that
    build at once both end with a complete library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "teal_cpu.cpp"
        src.write_text(_SOURCE)
        out = Path(tmp) / target.name
        cmd = [cxx, *_compile_flags(), str(src), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, target)


@functools.lru_cache(maxsize=1)
def _native() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use and cached by source hash; None (with a
    warning saying why) when it cannot be built, and the torch path is used instead."""
    if os.environ.get("TEAL_CPU_KERNEL", "native") == "embedding_bag":
        return None
    cxx = _compiler()
    if cxx is None:
        warnings.warn(
            "no C++ compiler (g++, c++ or clang++; or set CXX) found: the CPU sparse"
            " kernels fall back to torch's embedding_bag, which is slower",
            stacklevel=3,
        )
        return None
    key = hashlib.sha256((_SOURCE + " ".join(_compile_flags()) + cxx).encode()).hexdigest()
    target = _cache_dir() / f"teal_cpu_{key[:16]}.so"
    try:
        if not target.exists():
            _build(cxx, target)
        # Load after torch: the library's libgomp then resolves to the OpenMP runtime
        # torch already holds, so both share one thread pool.
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(
            f"building the CPU sparse kernel failed ({exc}); falling back to torch's"
            " embedding_bag, which is slower",
            stacklevel=3,
        )
        return None
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.teal_project.argtypes = [ptr, i64, i64, i64, ptr, ptr, cint, ptr, i64, i64, cint, cint,
                                 ptr, ptr, ptr, cint]  # fmt: skip
    lib.teal_project.restype = cint
    lib.teal_gate_up.argtypes = [ptr, i64, i64, i64, ptr, ptr, cint, ptr, i64, i64, cint, ptr,
                                 cint, ptr, cint]  # fmt: skip
    lib.teal_gate_up.restype = cint
    lib.teal_linear_rows.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, cint, ptr, cint]
    lib.teal_linear_rows.restype = cint
    f32 = ctypes.c_float
    lib.teal_rms_norm.argtypes = [ptr, i64, i64, ptr, f32, cint, ptr]
    lib.teal_rms_norm.restype = cint
    lib.teal_decode_attention.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, i64, i64, i64, cint,
                                          cint, cint, f32, cint, ptr, cint]  # fmt: skip
    lib.teal_decode_attention.restype = cint
    lib.teal_block_decode.argtypes = [ptr, ptr, ptr, i64, i64, ptr, ptr, cint]
    lib.teal_block_decode.restype = cint
    lib.teal_blocks_decode.argtypes = [ptr, i64, ptr, ptr, i64, i64, ptr, ptr, cint]
    lib.teal_blocks_decode.restype = cint
    return lib


def implementation() -> str:
    """Which implementation the ``cpu`` backend runs here: ``native`` or
    ``embedding_bag`` (benchmarks record it)."""
    return "native" if _native() is not None else "embedding_bag"


# ----- argument preparation (shared) ------------------------------------------------


@functools.lru_cache(maxsize=64)
def _bounds(splits: tuple[int, ...]) -> Tensor:
    b = [0]
    for s in splits:
        b.append(b[-1] + s)
    return torch.tensor(b, dtype=torch.int64)


def _rows(x: Tensor, wt: Tensor) -> Tensor:
    """``x`` as ``[rows, K]`` in the weights' dtype; its strides are passed to the kernel,
    so a non-contiguous view costs no copy as long as it flattens to two dimensions."""
    if x.dtype != wt.dtype:
        x = x.to(wt.dtype)
    return x.reshape(-1, x.shape[-1])


def _f32(t: Tensor | None) -> Tensor | None:
    if t is None:
        return None
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _check(x: Tensor, wt: Tensor) -> None:
    # Called per projection per decode step: the cheapest tests (attributes) only.
    if not (x.is_cpu and wt.is_cpu):
        raise ValueError("the cpu sparse backend needs CPU tensors")
    if wt.dtype not in _DTYPE_CODE:
        raise ValueError(f"the cpu sparse backend handles fp32, bf16 and fp16, not {wt.dtype}")
    if not wt.is_contiguous():
        raise ValueError("the cpu sparse backend needs contiguous input-major weights [K, N]")
    if x.shape[-1] != wt.shape[0]:
        raise ValueError(f"input has {x.shape[-1]} channels but the weights have {wt.shape[0]}")


# ----- the native path -----------------------------------------------------------------


def _native_project(
    lib: ctypes.CDLL,
    x: Tensor,
    wt: Tensor,
    thresholds: Tensor,
    splits: tuple[int, ...],
    scale: Tensor | None,
) -> Tensor:
    K, N = wt.shape
    rows = _rows(x, wt)
    out = torch.empty((*x.shape[:-1], N), dtype=wt.dtype)
    thr = _f32(thresholds)
    sc = _f32(scale)
    rc = lib.teal_project(
        rows.data_ptr(), rows.shape[0], rows.stride(0), rows.stride(1),
        sc.data_ptr() if sc is not None else None, wt.data_ptr(), 0, None, K, N,
        _DTYPE_CODE[wt.dtype], len(splits), _bounds(splits).data_ptr(), thr.data_ptr(),
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"teal_project failed with code {rc}")
    return out


def _native_gate_up(
    lib: ctypes.CDLL, x: Tensor, wt: Tensor, thresholds: Tensor, act: str, scale: Tensor | None
) -> Tensor:
    K, N2 = wt.shape
    rows = _rows(x, wt)
    out = torch.empty((*x.shape[:-1], N2 // 2), dtype=wt.dtype)
    thr = _f32(thresholds)
    sc = _f32(scale)
    rc = lib.teal_gate_up(
        rows.data_ptr(), rows.shape[0], rows.stride(0), rows.stride(1),
        sc.data_ptr() if sc is not None else None, wt.data_ptr(), 0, None, K, N2 // 2,
        _DTYPE_CODE[wt.dtype], thr.data_ptr(), _ACT_CODE[act], out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"teal_gate_up failed with code {rc}")
    return out


class _Q4(ctypes.Structure):
    """The C++ ``Q4``: an int4 weight's codes, scales and offsets (fp32 or fp16)."""

    _fields_ = [("q", ctypes.c_void_p), ("s", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("G", ctypes.c_int64), ("sfmt", ctypes.c_int64)]  # fmt: skip


# Per int4 weight: (the tensors it was made from, their versions, the _Q4, what it points to).
_Q4_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _q4(qw: QuantWeight) -> _Q4:
    """The native descriptor of an int4 weight, made once.  The kernel takes scales with
    offsets (``w = q s + m``): fp16 ones as stored when they are exact there (GGUF's
    Q4_1, the symmetric format's ``-8 s``), else fp32, where ``-z s`` of zero-point
    codes is one rounding from the reference's ``(q - z) s``."""
    src = [qw.qweight, qw.scales] + ([qw.zeros] if qw.zeros is not None else [])
    key = ([t.data_ptr() for t in src], [t._version for t in src])
    hit = _Q4_CACHE.get(qw)
    if hit is not None and hit[0] == key:
        return hit[1]
    zero = qw.zero
    if qw.scales.dtype == torch.float16 and zero in ("offset", "none"):
        sc = qw.scales.contiguous()
        m = qw.zeros.to(torch.float16) if zero == "offset" else sc * -8
    else:
        sc = qw.scales.float().contiguous()
        if zero == "offset":
            m = qw.zeros.float()
        else:
            m = -(8.0 if zero == "none" else qw.zeros.float()) * sc
    m = m.contiguous()
    desc = _Q4(qw.qweight.data_ptr(), sc.data_ptr(), m.data_ptr(), qw.group_size,
               2 if sc.dtype == torch.float16 else 0)  # fmt: skip
    desc._keep = (sc, m, qw.qweight)  # what the pointers point into
    _Q4_CACHE[qw] = (key, desc)
    return desc


def _quant_args(qw: QuantWeight) -> tuple[int, int, int | None, Tensor | None]:
    """(weight pointer, wfmt, column-scale pointer, what must stay alive) for the kernel."""
    if qw.fmt == "int8":
        cs = _f32(qw.scales)
        return qw.qweight.data_ptr(), 1, cs.data_ptr(), cs
    desc = _q4(qw)
    return ctypes.addressof(desc), 2, None, None


def quant_project(
    x: Tensor,
    qw: QuantWeight,
    thresholds: Tensor | None,
    splits: tuple[int, ...],
    scale: Tensor | None = None,
    act: str | None = None,
) -> Tensor:
    """The dispatcher's quantized-kernel call on the CPU: ``x @ W`` with each segment's
    input sparsified by its threshold (None: keep every channel), or with ``act``,
    ``act(gate) * up`` of a ``[gate | up]`` weight.  int8 codes are read as rows like
    float weights and the per-column scales applied to the finished sums; int4 codes are
    summed group by group, each group's sums then scaled and offset."""
    lib = _native()
    if lib is None:
        raise ValueError("the native CPU kernel needs a C++ compiler")
    if not (x.is_cpu and qw.qweight.is_cpu and qw.qweight.is_contiguous()):
        raise ValueError("the cpu quantized kernel needs CPU tensors and contiguous codes")
    K, N = qw.shape
    if x.shape[-1] != K:
        raise ValueError(f"input has {x.shape[-1]} channels but the weights have {K}")
    rows = x.reshape(-1, K)
    dtype = _DTYPE_CODE[x.dtype]
    lists = 2 if act is not None else len(splits)
    thr = _f32(thresholds) if thresholds is not None else torch.full((lists,), -torch.inf)
    sc = _f32(scale)
    sc_ptr = sc.data_ptr() if sc is not None else None
    w_ptr, wfmt, cs_ptr, _alive = _quant_args(qw)
    args = (rows.data_ptr(), rows.shape[0], rows.stride(0), rows.stride(1), sc_ptr, w_ptr,
            wfmt, cs_ptr, K)  # fmt: skip
    if act is not None:
        out = torch.empty((*x.shape[:-1], N // 2), dtype=x.dtype)
        rc = lib.teal_gate_up(*args, N // 2, dtype, thr.data_ptr(), _ACT_CODE[act],
                              out.data_ptr(), torch.get_num_threads())  # fmt: skip
    else:
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype)
        rc = lib.teal_project(*args, N, dtype, len(splits), _bounds(splits).data_ptr(),
                              thr.data_ptr(), out.data_ptr(), torch.get_num_threads())  # fmt: skip
    if rc:
        raise RuntimeError(f"the native {qw.fmt} kernel failed with code {rc}")
    return out


# ----- the pure-torch path (embedding_bag) ---------------------------------------------


def _chunks(splits: tuple[int, ...], threads: int) -> int:
    """Column chunks per row: a width that divides every segment, small enough that
    there are at least a few bags per thread (embedding_bag parallelises over bags)."""
    g = 0
    for s in splits:
        g = s if g == 0 else _gcd(g, s)
    width = g
    total = sum(splits)
    while total // width < 2 * threads and width % 2 == 0 and width > 64:
        width //= 2
    return total // width


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _bag_project(
    x: Tensor, wt: Tensor, thresholds: Tensor, splits: tuple[int, ...], scale: Tensor | None
) -> Tensor:
    K, N = wt.shape
    rows = _rows(x, wt)
    S = _chunks(splits, torch.get_num_threads())
    width = N // S
    # Threshold of every chunk: chunk c lies in segment seg[c].
    seg = torch.repeat_interleave(torch.arange(len(splits)), torch.tensor(splits) // width)
    # Compared in x's dtype, as the reference does (threshold rounded to it first).
    thr = thresholds.to(rows.dtype).float()[seg]  # [S]
    score = rows.abs()
    if scale is not None:
        score = score * scale.to(rows.dtype)
    score = score.float()
    keep = score[:, None, :] > thr[None, :, None]  # [B, S, K]
    # nonzero walks (row, chunk, channel) in order, so each (row, chunk) bag is contiguous.
    b, c, i = keep.nonzero(as_tuple=True)
    counts = keep.sum(-1).flatten()
    offsets = torch.cat((counts.new_zeros(1), counts.cumsum(0)))
    y = F.embedding_bag(
        i * S + c,
        wt.view(K * S, width),
        offsets,
        mode="sum",
        per_sample_weights=rows[b, i],
        include_last_offset=True,
    )
    return y.view(*x.shape[:-1], N)


def _bag_gate_up(
    x: Tensor, wt: Tensor, thresholds: Tensor, act: str, scale: Tensor | None
) -> Tensor:
    ffn = wt.shape[1] // 2
    gu = _bag_project(x, wt, thresholds, (ffn, ffn), scale).float()
    return reference.gate_up_product(gu[..., :ffn], gu[..., ffn:], act).to(wt.dtype)


# ----- the backend ---------------------------------------------------------------------


def sparse_project(
    x: Tensor,
    wt: Tensor,
    thresholds: Tensor,
    splits: tuple[int, ...],
    scale: Tensor | None = None,
    *,
    impl: str | None = None,
) -> Tensor:
    """``reference.sparse_linear_fused`` on the CPU: ``x [..., K] @ wt [K, N]`` where
    segment ``j`` of the output (widths ``splits``) sees only channels with
    ``|x_i| * scale_i > thresholds[j]``; the dropped rows of ``wt`` are never read."""
    _check(x, wt)
    if sum(splits) != wt.shape[1] or len(splits) != thresholds.numel():
        raise ValueError(f"splits {splits} must sum to {wt.shape[1]} with one threshold each")
    lib = _native() if impl in (None, "native") else None
    if impl == "native" and lib is None:
        raise RuntimeError("the native CPU kernel is not available here (see the warning)")
    if lib is not None:
        return _native_project(lib, x, wt, thresholds, splits, scale)
    return _bag_project(x, wt, thresholds, splits, scale)


def sparse_gate_up(
    x: Tensor,
    wt_gate_up: Tensor,
    thresholds: Tensor,
    act: str = "silu",
    scale: Tensor | None = None,
    *,
    impl: str | None = None,
) -> Tensor:
    """``reference.sparse_gate_up_act`` on the CPU: ``act(gate) * up`` ``[..., F]`` from
    ``wt_gate_up = [gate | up]`` ``[K, 2F]``, gate and up each with its own threshold."""
    _check(x, wt_gate_up)
    if act not in _ACT_CODE:
        raise ValueError(f"unknown activation {act!r}: expected one of {sorted(_ACT_CODE)}")
    lib = _native() if impl in (None, "native") else None
    if impl == "native" and lib is None:
        raise RuntimeError("the native CPU kernel is not available here (see the warning)")
    if lib is not None:
        return _native_gate_up(lib, x, wt_gate_up, thresholds, act, scale)
    return _bag_gate_up(x, wt_gate_up, thresholds, act, scale)


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """Dense ``torch.nn.functional.linear(x, weight)`` (no bias) for a few rows of ``x``
    and a row-major ``weight`` ``[N, K]``, e.g. a tied ``lm_head``: each thread streams a
    contiguous block of rows.  torch's BLAS runs this matrix-vector shape on one thread
    (about 15 GB/s here, against 30+ for this kernel on two), and it is a sixth of the
    default model's bytes per token.  Falls back to ``F.linear`` without the native
    kernel or for many rows."""
    lib = _native()
    rows = x.reshape(-1, x.shape[-1])
    if (
        lib is None
        or rows.shape[0] > 8
        or weight.dtype not in _DTYPE_CODE
        or x.dtype != weight.dtype
        or not weight.is_contiguous()
        or weight.device.type != "cpu"
    ):
        return F.linear(x, weight)
    V, K = weight.shape
    out = torch.empty(rows.shape[0], V, dtype=weight.dtype)
    rc = lib.teal_linear_rows(
        rows.data_ptr(), rows.shape[0], rows.stride(0), rows.stride(1), weight.data_ptr(), V, K,
        _DTYPE_CODE[weight.dtype], out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"teal_linear_rows failed with code {rc}")
    return out.view(*x.shape[:-1], V)


# ----- where the weights live ---------------------------------------------------------

_HUGE = 2 << 20  # a transparent huge page on x86-64 and most arm64 kernels
_MADV_HUGEPAGE = 14
# Models already seen by place_weights (whether or not the OS took the advice).
_PLACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _madvise_huge(addr: int, length: int) -> bool:
    try:
        libc = ctypes.CDLL(None)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(addr, length, _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def _huge_arena(nbytes: int) -> Tensor | None:
    """``nbytes`` of fresh memory whose whole 2 MiB stretches are advised onto huge pages
    (the partial tail keeps small pages, so no page is wasted), or None."""
    # torch.empty leaves the pages untouched, so advice given now decides their size.
    raw = torch.empty(nbytes + _HUGE, dtype=torch.uint8)
    start = -raw.data_ptr() % _HUGE
    whole = nbytes - nbytes % _HUGE
    if whole and not _madvise_huge(raw.data_ptr() + start, whole):
        return None
    return raw[start : start + nbytes]


def place_weights(model: torch.nn.Module) -> bool:
    """Move the model's 2-D weights (projections, embedding, lm_head) onto transparent
    huge pages, where the OS allows them (Linux with THP in ``madvise`` or ``always``
    mode); True if it did.

    Why: a decode step streams 270 MB of weights (the default model, bf16) and a
    sparse one reads scattered rows, each in another 4 KiB page; the TLB misses show.
    In interleaved A/B runs on the 2-core test machine (one thread, other processes
    busy) the default model's step took 14-25 % less time dense and 15-19 % less at
    50 % sparsity with its weights on 2 MiB pages.  One buffer per block (and one per other weight),
    so that replacing a block's weights (``model.quantize``) frees its buffer; each
    buffer is a plain torch tensor.  Weights are copied in one at a time, each old
    storage freed as it goes.  Idempotent."""
    if sys.platform != "linux" or model in _PLACED:
        return False
    groups: dict[str, list[Tensor]] = {}
    for name, q in model.named_parameters():
        if q.dim() == 2 and q.is_cpu:
            parts = name.split(".")
            key = ".".join(parts[:2]) if parts[0] == "layers" else name
            groups.setdefault(key, []).append(q)
    align = 64  # every weight starts on a cache line

    def padded(q: Tensor) -> int:
        return -(-q.numel() * q.element_size() // align) * align

    placed = False
    with torch.no_grad():
        for params in groups.values():
            arena = _huge_arena(sum(padded(q) for q in params))
            if arena is None:
                break
            off = 0
            for q in params:
                n = q.numel() * q.element_size()
                dst = arena[off : off + n].view(q.dtype).view(q.shape)
                dst.copy_(q)
                q.data = dst
                off += padded(q)
            placed = True
    _PLACED[model] = placed
    return placed


# ----- the decode-step glue (norms, attention) -------------------------------------------


def decode_glue_available(x: Tensor) -> bool:
    """Whether ``rms_norm`` and ``decode_attention`` run natively for this one-token
    hidden state ``x`` ``[B, 1, D]``; the model keeps its torch ops otherwise."""
    return (
        x.device.type == "cpu" and x.dim() == 3 and x.shape[1] == 1 and x.dtype in _DTYPE_CODE
        and _native() is not None
    )  # fmt: skip


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``decoder.RMSNorm`` for a few contiguous rows: fp32 statistics, rounded to the
    dtype before the gain, in one call instead of eight ops."""
    lib = _native()
    if lib is None or not x.is_contiguous() or weight.dtype != x.dtype:
        raise ValueError("native rms_norm needs the kernel, a contiguous x and weight of x's dtype")
    out = torch.empty_like(x)
    D = x.shape[-1]
    rc = lib.teal_rms_norm(x.data_ptr(), x.numel() // D, D, weight.data_ptr(), eps,
                           _DTYPE_CODE[x.dtype], out.data_ptr())  # fmt: skip
    if rc:
        raise RuntimeError(f"teal_rms_norm failed with code {rc}")
    return out


def decode_attention(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    pos: int,
    window: int | None,
    n_heads: int,
    n_kv_heads: int,
) -> Tensor:
    """One decode step of attention from the fused ``qkv`` ``[B, 1, (H + 2 Hkv) D]``:
    RoPE on q and k (``cos``/``sin`` ``[1, D]`` of the step's position), k and v written
    to slot ``pos`` of the cache ``[B, Hkv, L, D]``, and softmax attention over slots
    ``<= pos`` (the last ``window`` of them for a sliding window).  Returns ``[B, 1, H D]``,
    what ``F.scaled_dot_product_attention`` plus the reshape gives on the torch path."""
    lib = _native()
    B, T, width = qkv.shape
    _, hkv, L, D = cache_k.shape
    if (
        lib is None or T != 1 or qkv.stride(-1) != 1 or hkv != n_kv_heads
        or width != (n_heads + 2 * n_kv_heads) * D or not 0 <= pos < L
        or not (cache_k.is_contiguous() and cache_v.is_contiguous())
        or not (cos.is_contiguous() and sin.is_contiguous() and cos.numel() == D)
        or len({qkv.dtype, cos.dtype, sin.dtype, cache_k.dtype, cache_v.dtype}) != 1
    ):  # fmt: skip
        raise ValueError("native decode_attention got shapes, strides or dtypes it does not take")
    out = torch.empty(B, 1, n_heads * D, dtype=qkv.dtype)
    rc = lib.teal_decode_attention(
        qkv.data_ptr(), B, qkv.stride(0), cos.data_ptr(), sin.data_ptr(), cache_k.data_ptr(),
        cache_v.data_ptr(), L, pos, window or 0, n_heads, n_kv_heads, D, D**-0.5,
        _DTYPE_CODE[qkv.dtype], out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"teal_decode_attention failed with code {rc}")
    return out


class _BlockPlan(ctypes.Structure):
    """What ``teal_block_decode`` reads for one block (the C++ ``BlockPlan``, same order)."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in (
            "dtype", "dim", "heads", "kv_heads", "head_dim", "ffn", "cache_len", "window",
            "act", "wfmt")),
        *((name, ctypes.c_void_p) for name in (
            "attn_norm", "wqkv", "bqkv", "wo", "ffn_norm", "w_gate_up", "w_down", "k_cache",
            "v_cache", "thr", "s_attn_in", "s_attn_out", "s_mlp_in", "s_mlp_mid", "c_qkv",
            "c_o", "c_gate_up", "c_down", "qkv_bounds")),
        ("eps", ctypes.c_float),
        ("attn_scale", ctypes.c_float),
    ]  # fmt: skip


def _projection_weights(block) -> list:  # noqa: ANN001
    """q|k|v, o, gate|up and down of ``block``: tensors, or ``QuantWeight`` modules."""
    attn, mlp = block.attention, block.mlp
    return [attn.wqkv, attn.wo, mlp.w_gate_up, mlp.w_down]


def _plan_tensors(block) -> list[Tensor]:  # noqa: ANN001
    """The tensors of ``block`` a plan points into (weights, or a quantized weight's
    codes, scales and zero points; norms; the cache)."""
    attn = block.attention
    ts = [block.attention_norm.weight, block.ffn_norm.weight]
    for w in _projection_weights(block):
        if isinstance(w, QuantWeight):
            ts += [w.qweight, w.scales] + ([w.zeros] if w.zeros is not None else [])
        else:
            ts.append(w)
    if attn.kv_cache is not None:
        ts += [attn.kv_cache.k, attn.kv_cache.v]
    if attn.bqkv is not None:
        ts.append(attn.bqkv)
    return ts


def _plan_inputs(block, thresholds: Tensor, scales) -> list[Tensor] | None:  # noqa: ANN001
    """Every tensor a ``_BlockPlan`` of ``block`` points into, or None where the fused
    step does not apply: mixed weight formats, non-contiguous weights, CATS, a low-rank
    split, no cache, a dtype or activation without a kernel."""
    act = block.mlp.act
    if (
        block.attention.kv_cache is None
        or act not in _ACT_CODE
        or (scales and "mlp_cats" in scales)
        or block.mlp.lr_u is not None  # the low-rank split runs in MLP.forward
    ):
        return None
    weights = _projection_weights(block)
    fmts = {w.fmt if isinstance(w, QuantWeight) else None for w in weights}
    if len(fmts) != 1:
        return None
    ts = _plan_tensors(block)
    dtype = ts[0].dtype
    quant = [w for w in weights if isinstance(w, QuantWeight)]
    codes = {id(w.qweight): w.qweight.dtype for w in quant}
    # int8 column scales are fp32; int4 scales and zero points are converted by _q4.
    other = {id(t) for w in quant for t in (w.scales, w.zeros) if t is not None}

    def fits(t: Tensor) -> bool:
        if not (isinstance(t, Tensor) and t.is_cpu and t.is_contiguous()):
            return False
        if id(t) in other:
            return True
        return t.dtype == codes.get(id(t), dtype)

    if dtype not in _DTYPE_CODE or not all(fits(t) for t in ts):
        return None
    return [*ts, thresholds, *(scales or {}).values()]


def _block_plan(block, thresholds: Tensor, scales) -> tuple[_BlockPlan, list[Tensor]]:  # noqa: ANN001
    """The plan of ``block`` and the fp32 copies it points to (kept alive beside it)."""
    attn, mlp = block.attention, block.mlp
    cfg, cache = attn.cfg, attn.kv_cache
    thr = _f32(thresholds)
    sc = {site: _f32(t) for site, t in (scales or {}).items()}
    bounds = _bounds(attn.splits)
    weights = _projection_weights(block)

    def ptr(t: Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    if isinstance(weights[0], QuantWeight):
        args = [_quant_args(w) for w in weights]
        codes, wfmt, col = [a[0] for a in args], args[0][1], [a[2] for a in args]
        alive = [a[3] for a in args] + [_q4(w) for w in weights if w.fmt == "int4"]
    else:
        codes, wfmt, col, alive = [ptr(w) for w in weights], 0, [None] * 4, []
    plan = _BlockPlan(
        _DTYPE_CODE[block.attention_norm.weight.dtype], cfg.dim, cfg.n_heads, cfg.n_kv_heads,
        cfg.head_dim, cfg.ffn_dim, cache.k.shape[2], cfg.sliding_windows[attn.layer] or 0,
        _ACT_CODE[mlp.act], wfmt, ptr(block.attention_norm.weight), codes[0],
        ptr(attn.bqkv), codes[1], ptr(block.ffn_norm.weight), codes[2], codes[3],
        ptr(cache.k), ptr(cache.v), ptr(thr), ptr(sc.get("attn_in")), ptr(sc.get("attn_out")),
        ptr(sc.get("mlp_in")), ptr(sc.get("mlp_mid")), *col, ptr(bounds),
        block.attention_norm.eps, cfg.head_dim**-0.5,
    )  # fmt: skip
    return plan, [thr, bounds, *sc.values(), *alive]


# The one-call step's plans of each model's blocks (a ``_StepPlans``), keyed by the
# blocks' container.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class DecodeGlue:
    """The native glue of one decode step at cache slot ``pos`` (read from the position
    tensor once per step, not once per layer)."""

    pos: int

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return rms_norm(x, weight, eps)

    def attention(self, qkv: Tensor, cos: Tensor, sin: Tensor, cache_k: Tensor,
                  cache_v: Tensor, window: int | None, n_heads: int,
                  n_kv_heads: int) -> Tensor:  # fmt: skip
        return decode_attention(qkv, cos, sin, cache_k, cache_v, self.pos, window, n_heads,
                                n_kv_heads)  # fmt: skip

    def blocks(self, blocks, h: Tensor, cos: Tensor, sin: Tensor, thresholds: Tensor,  # noqa: ANN001
               scales: list[dict[str, Tensor]] | None) -> Tensor | None:  # fmt: skip
        """Every one of ``blocks`` (sparse, thresholds ``[n, 7]``) in one native call, or
        None where some block cannot run fused (the caller then goes block by block)."""
        if not h.is_contiguous():
            return None
        plans = _blocks_plan(blocks, thresholds, scales, h.dtype)
        if plans is None:
            return None
        out = torch.empty_like(h)
        rc = _native().teal_blocks_decode(
            plans, len(plans), h.data_ptr(), out.data_ptr(), h.shape[0], self.pos,
            cos.data_ptr(), sin.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if rc:
            raise RuntimeError(f"teal_blocks_decode failed with code {rc}")
        return out


@dataclass
class _StepPlans:
    """The plans of every block of a model, and what tells whether they still hold."""

    layout: int  # decoder.layout_version() when made
    tensors: list[Tensor]  # every tensor the plans point into (kept alive here) ...
    addresses: list[int]  # ... and its address then (``.data`` may be swapped in place)
    sources: list[Tensor]  # thresholds and scales the fp32 copies were made from ...
    versions: list[int]  # ... and their version counters then (in-place edits)
    dtype: torch.dtype
    plans: ctypes.Array | None  # None: some block cannot run fused
    keep: list  # the fp32 copies and bounds the plans point to


def _blocks_plan(blocks, thresholds: Tensor, scales, dtype: torch.dtype):  # noqa: ANN001, ANN202
    """The cached ``_BlockPlan`` array of ``blocks`` (None where some block cannot run
    fused), re-made when anything it points to may have moved.  Checking costs a few
    tens of microseconds a step; re-reading every block's attributes, ten times that."""
    from teal.model.decoder import layout_version

    sources = [thresholds, *(t for sc in scales or () for t in sc.values())]
    c = _PLANS.get(blocks)
    if (
        c is not None
        and c.layout == layout_version()
        and c.dtype == dtype
        and len(c.sources) == len(sources)
        and all(a is b for a, b in zip(c.sources, sources))
        and [t._version for t in sources] == c.versions
        and [t.data_ptr() for t in c.tensors] == c.addresses
    ):
        return c.plans
    tensors = [t for b in blocks for t in _plan_tensors(b)]
    plans, keep = None, []
    per = [scales[i] if scales else None for i in range(len(blocks))]
    inputs = [_plan_inputs(b, thresholds[i], per[i]) for i, b in enumerate(blocks)]
    if all(x is not None and x[0].dtype == dtype for x in inputs):
        made = [_block_plan(b, thresholds[i], per[i]) for i, b in enumerate(blocks)]
        plans = (_BlockPlan * len(made))(*(plan for plan, _ in made))
        keep = made
    _PLANS[blocks] = _StepPlans(
        layout_version(), tensors, [t.data_ptr() for t in tensors], sources,
        [t._version for t in sources], dtype, plans, keep,
    )  # fmt: skip
    return plans


register_backend("cpu", sparse_project, sparse_gate_up)
register_quant_backend("cpu", quant_project)

if __name__ == "__main__":  # `python -m teal.kernels.cpu`: build and say which path runs
    print(implementation(), isa(), file=sys.stderr)
