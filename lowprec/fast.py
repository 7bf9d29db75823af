"""Fast path of the rounding, bit-identical to :func:`lowprec.rounding.round_to_format`, its eager reference
(tests/lowprec/test_fast_round.py, test_fast_native.py: every code, midpoint and the values beside it, all
roundings, saturate or not, flushing, subnormals, NaN/inf, and the same stochastic results from the same generator,
left in the same state). Two kinds of kernels: ``torch.compile`` (inductor's CPU C++ backend) and a few plain C
loops called through ctypes (the "native helpers", built once per machine with the same C compiler).

:func:`fast_round` returns None where it does not apply (the caller then runs the eager reference):

* float32 CPU tensors of at least :data:`MIN_NUMEL` elements (:data:`MIN_NUMEL_STOCHASTIC` for stochastic
  rounding; below that, eager costs no more than a compiled call);
* float formats whose grid lies within float32's normal range and whose nearest rounding is the eager magic-number
  one (``emin - man_bits - 1 >= -126``, ``emax + 24 - man_bits <= 127``, at most 22 mantissa bits): every
  8-bit-or-smaller float format and fp16; bf16 for stochastic rounding (the master rounding of ``fp8-all``);
* nearest, toward_zero and stochastic rounding.

Stochastic rounding: the native loop draws the very words :func:`lowprec.rounding.random_bits` would draw, from
the generator's own mt19937 state (read with ``get_state``, written back with ``set_state``; the default generator
when None), in L1-sized chunks, and rounds as the eager path does, in one pass: no 64 MiB random buffer, and the
words cost ~1 ns each instead of torch's ~8 ns per int64 draw. (Like torch's own draws this is not atomic: two
threads sharing one generator get an unspecified interleaving, as they would eagerly.) Nearest and toward_zero on
the float32 bit patterns: the native loop on one torch thread, the compiled (parallel) kernel otherwise. Scaled
specs (MX, NVFP4, fp32 tensor scaling: :func:`fast_scaled`) run one compiled graph, with native random bits.

Every result is a fresh tensor asked onto transparent huge pages (:func:`_empty`: a fresh 64 MiB buffer otherwise
costs 16384 page faults, several times the rounding itself); the compiled kernels write straight into it. One
compiled graph per (format, rounding, saturate, flush, rand_bits), with a dynamic length: no recompilation per
shape; the native loops take any length. The first call of a spec compiles (seconds; inductor caches the kernel on
disk), the first native call builds the helpers (~1 s, cached in ``$LOWPREC_CACHE_DIR``, default a per-user folder
in the temp dir). A compile failure (no C++ compiler) turns the fast path off for the process, with one warning; a
failed native build leaves the compiled kernels (and torch's random draws) in charge. ``LOWPREC_FAST=0`` in the
environment, or :func:`set_fast_path`, turns the fast path off; ``LOWPREC_NATIVE=0`` only the native helpers.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import os
import platform
import struct
import subprocess
import sys
import tempfile
import types
import warnings
from typing import Callable

import torch

from .formats import Format, get_format, torch_dtype
from .rounding import inf_needs_mask, overflow_value, random_bits, rounding_limit
from .spec import QuantSpec, Rounding

__all__ = ["fast_round", "fast_scaled", "fast_scaled_ok", "fast_round_ok", "set_fast_path", "fast_path_enabled",
           "fast_path_settings", "fast_min_numel", "record_counts", "tensor_scaled_segments", "adam_step",
           "PackedMoments", "packed_moments_ok",
           "tensor_scaled_in_place", "stochastic_in_place", "block_scaled_in_place", "native_scaled_t", "native_available", "mark_written", "lost_updates", "dense_cpu_f32",
           "decode_table_rows", "sum_finite", "sums_finite", "SUM_FINITE", "SUM_NONFINITE", "SUM_UNDECIDED",
           "MIN_NUMEL", "MIN_NUMEL_STOCHASTIC", "MIN_NUMEL_NATIVE"]

# below these a compiled call (~50 us here) and, for stochastic rounding, the random-bit draw (the same in both
# paths) leave no gain over eager (measured on 2 shared cores, 1 thread)
MIN_NUMEL = 1 << 18
MIN_NUMEL_STOCHASTIC = 1 << 20
# the native helpers (no compile, a few microseconds a call) take tensors from this size (or from min_numel,
# where set_fast_path set it lower); the compiled kernels only from min_numel / min_numel_stochastic. A native call
# beats the eager path at every size (an e4m3 block encode of 3,072 values: ~70 us eager, a few us native; the d64
# fp8-all step 4-6% faster than with 4,096 here); the bits are the same at every size (the tests run the native
# loops from 2 values: set_fast_path(min_numel=2)), so only one-element tensors stay eager
MIN_NUMEL_NATIVE = 2
_INT_MIN = -(1 << 31)
_CANONICAL_NAN = 0x7FC00000
_state = {"enabled": os.environ.get("LOWPREC_FAST", "1") != "0", "min_numel": MIN_NUMEL,
          "min_numel_stochastic": MIN_NUMEL_STOCHASTIC}
_cache: dict[tuple, Callable[..., torch.Tensor]] = {}

def _compile_errors() -> tuple[type[Exception], ...]:
    """What a failed kernel build raises (looked up only when something was raised: importing dynamo is slow)."""
    return torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError


# ---- native helpers (plain C through ctypes, built once per machine with the C compiler inductor needs) ----------
# torch.compile cannot express torch's mt19937, so stochastic rounding used to draw its random bits eagerly
# (random_ on int64: ~8 ns a value here, plus a 64 MiB buffer) and read them back. The C kernel below draws the very
# same words from the generator's mt19937 state (get_state/set_state: same stream, same final state) in chunks that
# stay in L1 and rounds as _stochastic_kernel does, in one pass; lp_random_bits writes random_bits' words exactly,
# for the compiled scaled kernels. Tested bit for bit against the eager path (tests/lowprec/test_fast_native.py).
_NATIVE_SRC = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#define MT_N 624
#define MT_M 397
#define CHUNK 4096
#define L1_CHUNK 1024  /* values per pass of the MX and e4m3-encode loops: their buffers and rows stay in L1 */
typedef struct { uint32_t s[MT_N]; int32_t left; int32_t next; } mt_t;
/* torch's CPUGeneratorImplState bytes (get_state): left int32 at 8, next uint64 at 16, state uint64[624] at 24
   (words < 2**32); the exported functions draw from such bytes in place (the caller set_state()s them after) */
static void mt_load(const uint8_t *restrict st, mt_t *restrict g) {
  uint64_t w[MT_N], nx;
  memcpy(&g->left, st + 8, 4);
  memcpy(&nx, st + 16, 8);
  g->next = (int32_t)nx;
  memcpy(w, st + 24, sizeof w);
  for (int i = 0; i < MT_N; i++) g->s[i] = (uint32_t)w[i];
}
static void mt_store(const mt_t *restrict g, uint8_t *restrict st) {
  uint64_t w[MT_N], nx = (uint64_t)(uint32_t)g->next;
  for (int i = 0; i < MT_N; i++) w[i] = g->s[i];
  memcpy(st + 8, &g->left, 4);
  memcpy(st + 16, &nx, 8);
  memcpy(st + 24, w, sizeof w);
}
static inline uint32_t twist(uint32_t u, uint32_t v) {
  return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((0u - (v & 1u)) & 0x9908b0dfu);
}
static void next_state(uint32_t *restrict s) {  /* at::mt19937::next_state */
  int i;
  for (i = 0; i < MT_N - MT_M; i++) s[i] = s[i + MT_M] ^ twist(s[i], s[i + 1]);
  for (; i < MT_N - 1; i++) s[i] = s[i + MT_M - MT_N] ^ twist(s[i], s[i + 1]);
  s[MT_N - 1] = s[MT_M - 1] ^ twist(s[MT_N - 1], s[0]);
}
/* `count` (even) draws as random_bits lays them out: the draws (a, b) of one int64 random_() value
   (random64() = a << 32 | b, top bit cleared) are the int32 words (b, a & 0x7fffffff) */
static void draws(mt_t *g, uint32_t *restrict out, int64_t count) {
  int64_t done = 0;
  while (done < count) {
    if (g->left == 1) { next_state(g->s); g->left = MT_N + 1; g->next = 0; }
    int64_t k = g->left - 1;
    if (k > count - done) k = count - done;
    const uint32_t *restrict p = g->s + g->next;
    uint32_t *restrict o = out + done;
    for (int64_t i = 0; i < k; i++) {
      uint32_t y = p[i];
      y ^= y >> 11;
      y ^= (y << 7) & 0x9d2c5680u;
      y ^= (y << 15) & 0xefc60000u;
      y ^= y >> 18;
      o[i] = y;
    }
    g->left -= (int32_t)k; g->next += (int32_t)k; done += k;
  }
  uint64_t *restrict w = (uint64_t *)out;
  for (int64_t i = 0; i < count / 2; i++) {
    uint64_t v = w[i];
    w[i] = ((v >> 32) | (v << 32)) & 0x7fffffffffffffffull;
  }
}
void lp_random_bits(uint8_t *st, int32_t *out, int64_t n) {
  uint32_t buf[CHUNK] __attribute__((aligned(64)));
  mt_t g;
  mt_load(st, &g);
  for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
    int64_t c = n - i0 < CHUNK ? n - i0 : CHUNK;
    draws(&g, buf, (c + 1) & ~(int64_t)1);
    memcpy(out + i0, buf, (size_t)c * 4);
  }
  mt_store(&g, st);
}
static inline uint32_t fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bitsf(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
typedef struct { float lim, thr, max, ov; uint32_t rmask, keep; int32_t saturate, inf_mask, flush; } sr_params;
static inline __attribute__((always_inline)) void sr_chunk(const float *restrict xs, float *restrict os,
    const uint32_t *restrict r, int64_t c, const sr_params *p, const int sat, const int infm, const int flush) {
  const float lim = p->lim, thr = p->thr, mx = p->max, ov = p->ov;
  const uint32_t rmask = p->rmask, keep = p->keep;
  for (int64_t j = 0; j < c; j++) {
    float xv = xs[j];
    float ax = fabsf(xv);
    float a = ax < lim ? ax : lim;
    int low = a < thr;
    float a2 = low ? a + thr : a;
    float t = bitsf((fbits(a2) + (r[j] & rmask)) & keep);
    float q = low ? t - thr : t;
    if (!sat) {
      int over = q > mx;
      if (infm) over |= ax == INFINITY;
      q = over ? ov : q;
    }
    if (flush) q = q < thr ? 0.0f : q;
    q = copysignf(q, xv);
    os[j] = xv != xv ? xv : q;
  }
}
static void sr_rows(const float *restrict x, float *restrict out, int64_t n, mt_t *g, const sr_params *p) {
  uint32_t buf[CHUNK] __attribute__((aligned(64)));
  const int mode = (p->saturate ? 4 : 0) | (p->inf_mask ? 2 : 0) | (p->flush ? 1 : 0);
  for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
    int64_t c = n - i0 < CHUNK ? n - i0 : CHUNK;
    draws(g, buf, (c + 1) & ~(int64_t)1);
    switch (mode) {  /* constant flags: each variant vectorizes */
      case 0: sr_chunk(x + i0, out + i0, buf, c, p, 0, 0, 0); break;
      case 1: sr_chunk(x + i0, out + i0, buf, c, p, 0, 0, 1); break;
      case 2: sr_chunk(x + i0, out + i0, buf, c, p, 0, 1, 0); break;
      case 3: sr_chunk(x + i0, out + i0, buf, c, p, 0, 1, 1); break;
      case 4: case 6: sr_chunk(x + i0, out + i0, buf, c, p, 1, 0, 0); break;
      default: sr_chunk(x + i0, out + i0, buf, c, p, 1, 0, 1); break;
    }
  }
}
void lp_stochastic(const float *restrict x, float *restrict out, int64_t n, uint8_t *st, const sr_params *p) {
  mt_t g;
  mt_load(st, &g);
  sr_rows(x, out, n, &g, p);
  mt_store(&g, st);
}
typedef struct { uint32_t lim, max_b, min_normal_b, over_b, keep, half_less_one, odd_or; int32_t drop;
                 float up, inv_up; int32_t nearest, saturate, inf_mask, flush; uint32_t nan_b; } rn_params;
static inline __attribute__((always_inline)) void rn_body(const uint32_t *restrict xb, uint32_t *restrict ob,
    int64_t n, const rn_params *p, const int nearest, const int sat, const int infm, const int flush) {
  const uint32_t lim = p->lim, max_b = p->max_b, mnb = p->min_normal_b, over_b = p->over_b, keep = p->keep;
  const uint32_t hlo = p->half_less_one, odd_or = p->odd_or, nan_b = p->nan_b;
  const int drop = p->drop;
  const float up = p->up, inv_up = p->inv_up;
  for (int64_t j = 0; j < n; j++) {
    uint32_t b = xb[j];
    uint32_t sign = b & 0x80000000u, mag = b & 0x7fffffffu;
    uint32_t a = mag < lim ? mag : lim;
    float sc = bitsf(a) * up;
    uint32_t t, sub;
    if (nearest) {
      t = (a + ((((a >> drop) & 1u) | odd_or) + hlo)) & keep;
      sub = fbits(nearbyintf(sc) * inv_up);
    } else {
      t = a & keep;
      sub = fbits(truncf(sc) * inv_up);
    }
    t = a < mnb ? sub : t;
    if (!sat) {
      int over = t > max_b;
      if (infm) over |= mag == 0x7f800000u;
      t = over ? over_b : t;
    }
    if (flush) t = t < mnb ? 0u : t;
    ob[j] = (mag > 0x7f800000u ? nan_b : t) | sign;
  }
}
/* MX (1-D blocks, E8M0 scales, OCP floor rule): lowprec.fast._scaled_kernel for the rows of v (G x B), one pass
   per row: the amax of the finite magnitudes (as integers: non-negative floats order as their bits), the scale
   2**clamp(exponent field - 127 - emax, -127, 127) (2**-127 a float32 subnormal), v / scale rounded, times scale */
/* max |x| over the finite values (NaN, ±inf count as 0), on the magnitude bits (finite non-negative floats
   order as their bits) */
static float finite_amax(const float *restrict x, int64_t n) {
  /* signed int32 magnitudes (all >= 0): gcc vectorizes this max reduction (the unsigned lane form it did not:
     0.67 vs 0.05 ns a value here) */
  const int32_t *restrict b = (const int32_t *)x;
  int32_t top = 0;
  for (int64_t i = 0; i < n; i++) {
    int32_t a = b[i] & 0x7FFFFFFF;
    a = a < 0x7F800000 ? a : 0;
    top = a > top ? a : top;
  }
  float amax;
  memcpy(&amax, &top, 4);
  return amax;
}
/* The MX scale of a block whose finite amax has the bits amax_b: 2**clamp(exponent field - 127 - emax, -127, 127)
   (2**-127 a float32 subnormal) */
static inline float e8m0_scale(uint32_t amax_b, int32_t emax) {
  int32_t e = (int32_t)(amax_b >> 23) - (127 + emax);
  e = e < -127 ? -127 : (e > 127 ? 127 : e);
  return bitsf(e == -127 ? 0x00400000u : (uint32_t)(e + 127) << 23);
}
static inline __attribute__((always_inline)) void mx_body(const float *restrict v, float *restrict q,
    float *restrict scale, int64_t G, int64_t B, int32_t emax, const rn_params *p, const int nearest, const int sat,
    const int infm, const int flush) {
  /* in chunks of whole rows (B <= 1024 = L1_CHUNK: the caller checks): the rows' scales, then one rn_body over the
     chunk (per row it was a loop of B: 0.9 vs 0.4 ns a value on 512 x 64), the same operations per element */
  uint32_t y[L1_CHUNK], t[L1_CHUNK];
  float scs[L1_CHUNK];
  const int64_t rows = L1_CHUNK / B;
  for (int64_t g0 = 0; g0 < G; g0 += rows) {
    const int64_t nr = G - g0 < rows ? G - g0 : rows;
    for (int64_t r = 0; r < nr; r++) {
      const uint32_t *restrict row = (const uint32_t *)(v + (g0 + r) * B);
      const float sc = e8m0_scale(fbits(finite_amax(v + (g0 + r) * B, B)), emax);
      scale[g0 + r] = scs[r] = sc;
      const float rec = 1.0f / sc;  /* exact (sc is a power of two): x * rec is x / sc, correctly rounded alike */
      for (int64_t j = 0; j < B; j++) y[r * B + j] = fbits(bitsf(row[j]) * rec);
    }
    rn_body(y, t, nr * B, p, nearest, sat, infm, flush);
    for (int64_t r = 0; r < nr; r++) {
      const float sc = scs[r];
      float *restrict qr = q + (g0 + r) * B;
      for (int64_t j = 0; j < B; j++) qr[j] = bitsf(t[r * B + j]) * sc;
    }
  }
}
#define MX(N_, S_, I_, F_, B_) case (N_ << 3 | S_ << 2 | I_ << 1 | F_): \
  mx_body(v, q, scale, G, B_, emax, p, N_, S_, I_, F_); break;
#define MX_ALL(B_) switch (mode) { \
    MX(0, 0, 0, 0, B_) MX(0, 0, 0, 1, B_) MX(0, 0, 1, 0, B_) MX(0, 0, 1, 1, B_) MX(0, 1, 0, 0, B_) MX(0, 1, 0, 1, B_) \
    MX(1, 0, 0, 0, B_) MX(1, 0, 0, 1, B_) MX(1, 0, 1, 0, B_) MX(1, 0, 1, 1, B_) MX(1, 1, 0, 0, B_) MX(1, 1, 0, 1, B_) }
void lp_mx_e8m0(const float *v, float *q, float *scale, int64_t G, int64_t B, int32_t emax, const rn_params *p) {
  const int mode = (p->nearest ? 8 : 0) | (p->saturate ? 4 : 0) | (p->inf_mask && !p->saturate ? 2 : 0)
                   | (p->flush ? 1 : 0);
  if (B == 32) { MX_ALL(32) }  /* the MX block size, then NVFP4's: constant trip counts unroll */
  else if (B == 16) { MX_ALL(16) }
  else { MX_ALL(B) }
}
/* The finite amax bits (finite_amax's int32 maxima) of kc columns over B rows of a row-major tile whose rows are K
   apart: the blocks along axis 0 of the _t loops below (vectorized along the columns). */
static inline __attribute__((always_inline)) void column_amax(const float *restrict x, int64_t K, const int64_t B,
                                                               int64_t kc, int32_t *restrict top) {
  for (int64_t kk = 0; kk < kc; kk++) top[kk] = 0;
  for (int64_t i = 0; i < B; i++) {
    const int32_t *restrict row = (const int32_t *)(x + i * K);
    for (int64_t kk = 0; kk < kc; kk++) {
      int32_t a = row[kk] & 0x7FFFFFFF;
      a = a < 0x7F800000 ? a : 0;
      top[kk] = a > top[kk] ? a : top[kk];
    }
  }
}
/* lp_mx_e8m0 on the rows of x^T without making x^T: x is M x K (row-major), the blocks run along M (B rows of one
   column); q is written as K x M and scale as K x (M / B), the layout lp_mx_e8m0 gives on x.t().contiguous(). Tiles
   of B rows x up to L1_CHUNK / B columns: the column amaxes (int32 maxima, as finite_amax), the scales as mx_body's,
   x * (1 / scale) rounded by one rn_body over the tile (elementwise, no draws: any order gives the same bits), and
   the products written column by column (B contiguous values each). */
static inline __attribute__((always_inline)) void mx_t_body(const float *restrict x, float *restrict q,
    float *restrict scale, int64_t M, int64_t K, const int64_t B, int32_t emax, const rn_params *p, const int nearest,
    const int sat, const int infm, const int flush) {
  uint32_t y[L1_CHUNK], t[L1_CHUNK];
  int32_t top[L1_CHUNK];
  float scs[L1_CHUNK], recs[L1_CHUNK];
  const int64_t KC = L1_CHUNK / B, nb = M / B;
  for (int64_t i0 = 0; i0 < M; i0 += B) {
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = K - k0 < KC ? K - k0 : KC;
      column_amax(x + i0 * K + k0, K, B, kc, top);
      for (int64_t kk = 0; kk < kc; kk++) {
        const float sc = e8m0_scale((uint32_t)top[kk], emax);
        scs[kk] = sc;
        recs[kk] = 1.0f / sc;
        scale[(k0 + kk) * nb + i0 / B] = sc;
      }
      for (int64_t i = 0; i < B; i++) {
        const float *restrict row = x + (i0 + i) * K + k0;
        for (int64_t kk = 0; kk < kc; kk++) y[i * kc + kk] = fbits(row[kk] * recs[kk]);
      }
      rn_body(y, t, B * kc, p, nearest, sat, infm, flush);
      for (int64_t kk = 0; kk < kc; kk++) {
        const float sc = scs[kk];
        float *restrict qc = q + (k0 + kk) * M + i0;
        for (int64_t i = 0; i < B; i++) qc[i] = bitsf(t[i * kc + kk]) * sc;
      }
    }
  }
}
#define MXT(N_, S_, I_, F_, B_) case (N_ << 3 | S_ << 2 | I_ << 1 | F_): \
  mx_t_body(x, q, scale, M, K, B_, emax, p, N_, S_, I_, F_); break;
#define MXT_ALL(B_) switch (mode) { \
    MXT(0, 0, 0, 0, B_) MXT(0, 0, 0, 1, B_) MXT(0, 0, 1, 0, B_) MXT(0, 0, 1, 1, B_) MXT(0, 1, 0, 0, B_) \
    MXT(0, 1, 0, 1, B_) MXT(1, 0, 0, 0, B_) MXT(1, 0, 0, 1, B_) MXT(1, 0, 1, 0, B_) MXT(1, 0, 1, 1, B_) \
    MXT(1, 1, 0, 0, B_) MXT(1, 1, 0, 1, B_) }
void lp_mx_e8m0_t(const float *x, float *q, float *scale, int64_t M, int64_t K, int64_t B, int32_t emax,
                  const rn_params *p) {
  const int mode = (p->nearest ? 8 : 0) | (p->saturate ? 4 : 0) | (p->inf_mask && !p->saturate ? 2 : 0)
                   | (p->flush ? 1 : 0);
  if (B == 32) { MXT_ALL(32) }
  else if (B == 16) { MXT_ALL(16) }
  else { MXT_ALL(B) }
}
/* the e4m3 code of a float32 value on the e4m3 grid (rn_body's output) or NaN, as torch's float8_e4m3fn cast
   gives it: sign | exponent + 7 << 3 | 3 mantissa bits; below 2**-6 the subnormal count of 2**-9; NaN 0x7f */
static inline uint8_t e4m3_code(uint32_t b) {  /* selects, no branches: the loop vectorizes */
  const uint32_t sign = (b >> 24) & 0x80u, mag = b & 0x7fffffffu;
  const int low = mag < (121u << 23);
  const uint32_t sub = (uint32_t)(int32_t)(bitsf(low ? mag : 0u) * 512.0f);   /* exact: 0..7 */
  const uint32_t nrm = (((mag >> 23) - 120u) << 3) | ((mag >> 20) & 7u);
  uint32_t c = low ? sub : nrm;
  c = mag > 0x7f800000u ? 0x7fu : c;
  return (uint8_t)(c | sign);
}
/* lowprec.codecs.encode of float32 rows (G x n) onto e4m3 (nearest, saturating, no flushing) with an fp32 scale
   per block of `block` along the rows (the last one of a row ragged): the scale amax / fmt_max of the block's
   finite magnitudes (1 where that is 0 or not finite), the codes those of torch's e4m3 cast of x / scale (RNE;
   saturating, inf -> 448; NaN -> 0x7f | sign) by rn_body's rounding and e4m3_code. Elements go through an
   L1_CHUNK buffer in order (the codes are laid out as x) */
void lp_encode_e4m3(const float *restrict x, uint8_t *restrict codes, float *restrict scale, int64_t G, int64_t n,
                    int64_t block, float fmt_max, const rn_params *p) {
  const int64_t nb = (n + block - 1) / block;
  uint32_t y[L1_CHUNK], t[L1_CHUNK];
  int64_t fill = 0, start = 0;  /* y holds the elements [start, start + fill) */
  for (int64_t g = 0; g < G; g++) {
    for (int64_t b = 0; b < nb; b++) {
      const int64_t o = b * block, len = n - o < block ? n - o : block;
      const float *restrict src = x + g * n + o;
      float sc = finite_amax(src, len) / fmt_max;
      sc = sc > 0.0f && sc < INFINITY ? sc : 1.0f;
      scale[g * nb + b] = sc;
      for (int64_t k0 = 0; k0 < len;) {
        if (fill == L1_CHUNK) {
          rn_body(y, t, fill, p, 1, 1, 0, 0);
          for (int64_t k = 0; k < fill; k++) codes[start + k] = e4m3_code(t[k]);
          start += fill; fill = 0;
        }
        const int64_t m = len - k0 < L1_CHUNK - fill ? len - k0 : L1_CHUNK - fill;
        for (int64_t k = 0; k < m; k++) y[fill + k] = fbits(src[k0 + k] / sc);
        fill += m; k0 += m;
      }
    }
  }
  rn_body(y, t, fill, p, 1, 1, 0, 0);
  for (int64_t k = 0; k < fill; k++) codes[start + k] = e4m3_code(t[k]);
}
#define RN(N_, S_, I_, F_) case (N_ << 3 | S_ << 2 | I_ << 1 | F_): rn_body(x, out, n, p, N_, S_, I_, F_); break;
/* lowprec.fast._int_kernel: nearest / toward_zero on float32 bit patterns, one pass */
void lp_round(const uint32_t *x, uint32_t *out, int64_t n, const rn_params *p) {
  const int mode = (p->nearest ? 8 : 0) | (p->saturate ? 4 : 0) | (p->inf_mask && !p->saturate ? 2 : 0)
                   | (p->flush ? 1 : 0);
  switch (mode) {
    RN(0, 0, 0, 0) RN(0, 0, 0, 1) RN(0, 0, 1, 0) RN(0, 0, 1, 1) RN(0, 1, 0, 0) RN(0, 1, 0, 1)
    RN(1, 0, 0, 0) RN(1, 0, 0, 1) RN(1, 0, 1, 0) RN(1, 0, 1, 1) RN(1, 1, 0, 0) RN(1, 1, 0, 1)
  }
}
/* dst (cols x rows) = the transpose of src (rows x cols), in 16 x 16 tiles (a copy: every bit as it was; 16 beat
   8 and 32 here, 32 meeting 4K aliasing on 256 x 512) */
void lp_transpose(const float *restrict src, float *restrict dst, int64_t rows, int64_t cols) {
  for (int64_t i0 = 0; i0 < rows; i0 += 16) {
    const int64_t i1 = i0 + 16 < rows ? i0 + 16 : rows;
    for (int64_t j0 = 0; j0 < cols; j0 += 16) {
      const int64_t j1 = j0 + 16 < cols ? j0 + 16 : cols;
      for (int64_t j = j0; j < j1; j++)
        for (int64_t i = i0; i < i1; i++) dst[j * rows + i] = src[i * cols + j];
    }
  }
}
/* lowprec.optim_batch.decode_rows: out[i, k] = table[codes[i, k]] * scale[i, k / bs] (scale NULL: no multiply) for
   R rows of n uint8 codes: the eager lookup and its one float32 multiply per element. */
void lp_decode_rows(const uint8_t *restrict codes, const float *restrict table, const float *restrict scale,
                    float *restrict out, int64_t R, int64_t n, int64_t bs, int64_t nb) {
  for (int64_t i = 0; i < R; i++) {
    const uint8_t *restrict c = codes + i * n;
    float *restrict o = out + i * n;
    if (scale == NULL) {
      for (int64_t k = 0; k < n; k++) o[k] = table[c[k]];
      continue;
    }
    for (int64_t b = 0; b < nb; b++) {
      const float sc = scale[i * nb + b];
      const int64_t k1 = (b + 1) * bs < n ? (b + 1) * bs : n;
      for (int64_t k = b * bs; k < k1; k++) o[k] = table[c[k]] * sc;
    }
  }
}
/* lowprec.telemetry.record: every count of one quantization x -> q in one pass (float32, contiguous). scale:
   NULL, one value (scale_n == 1) or one per element; the saturation limit is lim * scale in float32 as torch's
   `fmt_max * (1 + 1e-6) * scale`. Sums of squares in double, in ST_L interleaved lanes. The scale's min and max
   come from the same pass (smin, smax; range_ok 1) where they are certain to be torch's min() and max(): no NaN
   scale (torch's would be NaN) and neither one zero (a +0 / -0 tie, which torch's reduction may break either
   way); range_ok 0 otherwise (the caller reduces with torch). One value: its own. */
typedef struct { int64_t nonzero, flushed, saturated, nan, inf, zeros; double sig2, err2, smin, smax;
                 int64_t range_ok; } st_out;
#define ST_L 8  /* independent lanes: the loop vectorizes without reassociating any one lane's sum */
static inline __attribute__((always_inline)) void st_lanes(const float *restrict x, const float *restrict q,
    const float *restrict scale, int64_t m, float lim, int32_t has_lim, int32_t *restrict c, double *restrict s2,
    double *restrict e2, float *restrict mn, float *restrict mx, const int per_elem) {
  /* c: 7 × ST_L int32 lane counts (nonzero, flushed, saturated, nan, qfinite, zeros, NaN scales); mn, mx: ST_L
     lane minima and maxima of the scales (per_elem only); m: a multiple of ST_L */
  for (int64_t i = 0; i < m; i += ST_L) {
    for (int j = 0; j < ST_L; j++) {
      const float xv = x[i + j], qv = q[i + j], ax = fabsf(xv), aq = fabsf(qv);
      const int32_t fx = ax < INFINITY, nz = fx & (ax > 0.0f), qz = qv == 0.0f, fq = aq < INFINITY;
      const float l = per_elem ? lim * scale[i + j] : lim;
      if (per_elem) {
        const float sv = scale[i + j];
        mn[j] = sv < mn[j] ? sv : mn[j];
        mx[j] = sv > mx[j] ? sv : mx[j];
        c[6 * ST_L + j] += sv != sv;
      }
      c[j] += nz; c[ST_L + j] += nz & qz; c[2 * ST_L + j] += fx & ((fq ^ 1) | (has_lim & (ax > l)));
      c[3 * ST_L + j] += qv != qv; c[4 * ST_L + j] += fq; c[5 * ST_L + j] += qz;
      const float d = xv - qv;
      s2[j] += (double)xv * (double)xv;
      e2[j] += (double)d * (double)d;
    }
  }
}
void lp_stats(const float *restrict x, const float *restrict q, const float *restrict scale, int64_t scale_n,
              int64_t n, float lim, int32_t has_lim, st_out *o) {
  int32_t c[7 * ST_L];
  double s2[ST_L] = {0}, e2[ST_L] = {0};
  float mn[ST_L], mx[ST_L];
  int64_t tot[7] = {0};
  for (int j = 0; j < ST_L; j++) { mn[j] = INFINITY; mx[j] = -INFINITY; }
  const int per_elem = scale != NULL && scale_n > 1;
  const float one = scale != NULL && scale_n == 1 ? lim * scale[0] : lim;
  const int64_t full = n - n % ST_L;
  for (int64_t i0 = 0; i0 < n; i0 += 1 << 20) {  /* int32 lane counts: added into int64 every 2**20 values */
    const int64_t e = n - i0 < (1 << 20) ? n : i0 + (1 << 20);
    const int64_t m = (e < full ? e : full) - i0;
    memset(c, 0, sizeof c);
    if (m > 0) {
      if (per_elem) st_lanes(x + i0, q + i0, scale + i0, m, lim, has_lim, c, s2, e2, mn, mx, 1);
      else st_lanes(x + i0, q + i0, NULL, m, one, has_lim, c, s2, e2, mn, mx, 0);
    }
    for (int64_t i = i0 + (m > 0 ? m : 0); i < e; i++) {  /* the last n % ST_L values, into lane 0 */
      float xp[ST_L] = {0}, qp[ST_L] = {0}, sp[ST_L] = {0};
      xp[0] = x[i]; qp[0] = q[i]; sp[0] = per_elem ? scale[i] : 0.0f;
      int32_t cc[7 * ST_L] = {0};
      double a[ST_L] = {0}, b[ST_L] = {0};
      float tmn[ST_L], tmx[ST_L];
      for (int j = 0; j < ST_L; j++) { tmn[j] = INFINITY; tmx[j] = -INFINITY; }
      st_lanes(xp, qp, sp, ST_L, per_elem ? lim : one, has_lim, cc, a, b, tmn, tmx, per_elem);
      for (int k = 0; k < 7; k++) c[k * ST_L] += cc[k * ST_L];  /* lane 0 only (the others are padding) */
      s2[0] += a[0]; e2[0] += b[0];
      mn[0] = tmn[0] < mn[0] ? tmn[0] : mn[0];
      mx[0] = tmx[0] > mx[0] ? tmx[0] : mx[0];
    }
    for (int k = 0; k < 7; k++)
      for (int j = 0; j < ST_L; j++) tot[k] += c[k * ST_L + j];
  }
  double sig2 = 0.0, err2 = 0.0;
  float smin = INFINITY, smax = -INFINITY;
  for (int j = 0; j < ST_L; j++) {
    sig2 += s2[j]; err2 += e2[j];
    smin = mn[j] < smin ? mn[j] : smin;
    smax = mx[j] > smax ? mx[j] : smax;
  }
  o->nonzero = tot[0]; o->flushed = tot[1]; o->saturated = tot[2]; o->nan = tot[3];
  o->inf = n - tot[4] - tot[3]; o->zeros = tot[5]; o->sig2 = sig2; o->err2 = err2;
  if (scale != NULL && scale_n == 1) {
    o->smin = o->smax = scale[0]; o->range_ok = 1;
  } else {
    o->smin = smin; o->smax = smax;
    o->range_ok = per_elem && n > 0 && tot[6] == 0 && smin != 0.0f && smax != 0.0f;
  }
}
/* lowprec.fast.fast_scaled for one fp32 tensor scale (nearest / toward_zero): the finite amax (NaN, ±inf count as
   0), scale = amax / fmt_max (1 where that is 0 or not finite), then x / scale rounded by lp_round and
   multiplied back, in chunks; float32 IEEE throughout, as the eager path. */
/* (out may be x: each chunk is read into yb before it is written) */
static void tensor_scaled(const float *x, float *out, float *scale_out, int64_t n, float fmt_max, const rn_params *p) {
  const float amax = finite_amax(x, n);
  float sc = amax / fmt_max;
  sc = sc > 0.0f && sc < INFINITY ? sc : 1.0f;
  *scale_out = sc;
  uint32_t yb[CHUNK], qb[CHUNK];
  for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
    const int64_t c = n - i0 < CHUNK ? n - i0 : CHUNK;
    for (int64_t j = 0; j < c; j++) { const float y = x[i0 + j] / sc; memcpy(&yb[j], &y, 4); }
    lp_round(yb, qb, c, p);
    for (int64_t j = 0; j < c; j++) { float q; memcpy(&q, &qb[j], 4); out[i0 + j] = q * sc; }
  }
}
void lp_tensor_scaled(const float *restrict x, float *restrict out, float *restrict scale_out, int64_t n,
                      float fmt_max, const rn_params *p) {
  tensor_scaled(x, out, scale_out, n, fmt_max, p);
}
/* lowprec.fast._scaled_kernel for E4M3 block scales under an fp32 tensor scale (NVFP4; nearest / toward_zero) on
   the rows of v (G x B): g = tensor amax / denom (1 where that is 0 or not finite), each block's scale
   e4m3(min((amax / fmt_max) / g, 448)) * g (RNE by lp_round with ps), then v / scale (1 where the scale is 0)
   rounded with pe, times (scale != 0), times scale: the eager path's float32 operations in its order. */
static inline __attribute__((always_inline)) void
nv_body(const float *restrict v, float *restrict q, float *restrict scale, int64_t G, const int64_t B, float fmt_max,
        float denom, const rn_params *pe, const rn_params *ps, mt_t *gen, const sr_params *sp) {
  /* sp != NULL: stochastic rounding of the elements with sr_rows' draws from gen (B even: every pass rounds
     an even count, so the words land on the values as one sr_rows call over all of v would put them) */
  const int64_t n = G * B;
  const float t_amax = finite_amax(v, n);
  float g = t_amax / denom;
  g = g > 0.0f && g < INFINITY ? g : 1.0f;
  uint32_t xb[L1_CHUNK], rb[L1_CHUNK];
  float yf[L1_CHUNK], of[L1_CHUNK], se[L1_CHUNK];
  const int64_t rows = B <= L1_CHUNK ? L1_CHUNK / B : 1;  /* whole rows per pass (a row over L1_CHUNK: one at a time) */
  for (int64_t r0 = 0; r0 < G; r0 += rows) {
    const int64_t nr = G - r0 < rows ? G - r0 : rows;
    /* these rows' block scales, then their elements while the rows are in L1 (one read of v after the amax,
       not two; the scales are elementwise, so computing them chunk by chunk gives the same bits) */
    for (int64_t j = 0; j < nr; j++) {
      float t = (finite_amax(v + (r0 + j) * B, B) / fmt_max) / g;
      t = t > 448.0f ? 448.0f : t;
      memcpy(&xb[j], &t, 4);
    }
    lp_round(xb, rb, nr, ps);
    for (int64_t j = 0; j < nr; j++) { float e; memcpy(&e, &rb[j], 4); scale[r0 + j] = e * g; }
    for (int64_t off = 0; off < B; off += L1_CHUNK) {  /* one pass unless a row is longer than L1_CHUNK */
      const int64_t kb = B - off < L1_CHUNK ? B - off : L1_CHUNK;  /* values per row this pass */
      const int64_t m = nr * kb;
      /* each row's scale spread over its values (one broadcast store a row), so that the division and the
         product below run as whole-chunk loops (per row of 16 the loop overhead cost more than the division) */
      for (int64_t r = 0; r < nr; r++) {
        const float sc = scale[r0 + r];
        for (int64_t k = 0; k < kb; k++) se[r * kb + k] = sc;
      }
      /* nearest: the quotients go to lp_round as bit patterns and its results come back as such (memcpy per
         value: plain stores, no buffer copies); stochastic: sr_rows on floats */
      const int sto = sp != NULL;
      if (kb == B) {   /* whole rows: the chunk is contiguous in v and q */
        const float *restrict vc = v + r0 * B;
        if (sto)
          for (int64_t i = 0; i < m; i++) { const float sc = se[i]; yf[i] = vc[i] / (sc == 0.0f ? 1.0f : sc); }
        else
          for (int64_t i = 0; i < m; i++) {
            const float sc = se[i], y = vc[i] / (sc == 0.0f ? 1.0f : sc);
            memcpy(&xb[i], &y, 4);
          }
      } else {
        for (int64_t r = 0; r < nr; r++) {
          const float *restrict vr = v + (r0 + r) * B + off;
          for (int64_t k = 0; k < kb; k++) {
            const float sc = se[r * kb + k], y = vr[k] / (sc == 0.0f ? 1.0f : sc);
            if (sto) yf[r * kb + k] = y; else memcpy(&xb[r * kb + k], &y, 4);
          }
        }
      }
      if (sto)
        sr_rows(yf, of, m, gen, sp);
      else
        lp_round(xb, rb, m, pe);
      if (kb == B) {
        float *restrict qc = q + r0 * B;
        if (sto)
          for (int64_t i = 0; i < m; i++) { const float sc = se[i]; qc[i] = (of[i] * (sc != 0.0f ? 1.0f : 0.0f)) * sc; }
        else
          for (int64_t i = 0; i < m; i++) {
            const float sc = se[i];
            float o;
            memcpy(&o, &rb[i], 4);
            qc[i] = (o * (sc != 0.0f ? 1.0f : 0.0f)) * sc;
          }
      } else {
        for (int64_t r = 0; r < nr; r++) {
          float *restrict qr = q + (r0 + r) * B + off;
          for (int64_t k = 0; k < kb; k++) {
            const float sc = se[r * kb + k];
            float o = of[r * kb + k];
            if (!sto) memcpy(&o, &rb[r * kb + k], 4);
            qr[k] = (o * (sc != 0.0f ? 1.0f : 0.0f)) * sc;
          }
        }
      }
    }
  }
}
void lp_nv(const float *restrict v, float *restrict q, float *restrict scale, int64_t G, int64_t B, float fmt_max,
           float denom, const rn_params *pe, const rn_params *ps, uint8_t *st, const sr_params *sp) {
  /* NVFP4's blocks of 16 with the block length a constant: the row loops unroll and vectorize (the same
     operations in the same order as any other length); st: generator state bytes (NULL: nearest) */
  mt_t g, *gen = NULL;
  if (st) { mt_load(st, &g); gen = &g; }
  if (B == 16)
    nv_body(v, q, scale, G, 16, fmt_max, denom, pe, ps, gen, sp);
  else
    nv_body(v, q, scale, G, B, fmt_max, denom, pe, ps, gen, sp);
  if (st) mt_store(&g, st);
}

/* In place over T tensors (the wrapped optimizer's gradients and master weights): each tensor gets what the
   one-tensor loop gives it (lp_tensor_scaled: scales[t] its scale; lp_stochastic: the same draws in tensor order,
   each tensor starting at an even word as its own call would), read into an L1 buffer before it is overwritten. */
void lp_tensor_scaled_list(int64_t T, float *const *x, const int64_t *n, float *scale_out, float fmt_max,
                           const rn_params *p) {
  for (int64_t t = 0; t < T; t++) tensor_scaled(x[t], x[t], scale_out + t, n[t], fmt_max, p);
}
void lp_stochastic_list(int64_t T, float *const *x, const int64_t *n, uint8_t *st, const sr_params *p) {
  mt_t g;
  mt_load(st, &g);
  float tmp[CHUNK] __attribute__((aligned(64)));
  for (int64_t t = 0; t < T; t++) {
    float *X = x[t];
    const int64_t N = n[t];
    for (int64_t i0 = 0; i0 < N; i0 += CHUNK) {
      const int64_t c = N - i0 < CHUNK ? N - i0 : CHUNK;
      memcpy(tmp, X + i0, (size_t)c * 4);
      sr_rows(tmp, X + i0, c, &g, p);   /* one chunk: sr_rows' own draws for it */
    }
  }
  mt_store(&g, st);
}

/* lp_nv (nearest / toward_zero: no draws, so any order gives the same bits) on the rows of x^T without making x^T,
   as lp_mx_e8m0_t does for MX: x is M x K, blocks of B along M; q as K x M, scale as K x (M / B). The tensor amax
   over all of x, then per tile of B rows x up to L1_CHUNK / B columns nv_body's operations: the block scales
   e4m3(min((amax / fmt_max) / g, 448)) * g, x / scale (1 where it is 0) rounded, times (scale != 0), times scale. */
void lp_nv_t(const float *restrict x, float *restrict q, float *restrict scale, int64_t M, int64_t K, int64_t B,
             float fmt_max, float denom, const rn_params *pe, const rn_params *ps) {
  const float t_amax = finite_amax(x, M * K);
  float g = t_amax / denom;
  g = g > 0.0f && g < INFINITY ? g : 1.0f;
  uint32_t y[L1_CHUNK], t[L1_CHUNK], sb[L1_CHUNK], sr[L1_CHUNK];
  int32_t top[L1_CHUNK];
  float scs[L1_CHUNK];
  const int64_t KC = L1_CHUNK / B, nb = M / B;
  for (int64_t i0 = 0; i0 < M; i0 += B) {
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = K - k0 < KC ? K - k0 : KC;
      column_amax(x + i0 * K + k0, K, B, kc, top);
      for (int64_t kk = 0; kk < kc; kk++) {
        float tv = (bitsf((uint32_t)top[kk]) / fmt_max) / g;
        tv = tv > 448.0f ? 448.0f : tv;
        sb[kk] = fbits(tv);
      }
      lp_round(sb, sr, kc, ps);
      for (int64_t kk = 0; kk < kc; kk++) {
        const float sc = bitsf(sr[kk]) * g;
        scs[kk] = sc;
        scale[(k0 + kk) * nb + i0 / B] = sc;
      }
      for (int64_t i = 0; i < B; i++) {
        const float *restrict row = x + (i0 + i) * K + k0;
        for (int64_t kk = 0; kk < kc; kk++) {
          const float sc = scs[kk];
          y[i * kc + kk] = fbits(row[kk] / (sc == 0.0f ? 1.0f : sc));
        }
      }
      lp_round(y, t, B * kc, pe);
      for (int64_t kk = 0; kk < kc; kk++) {
        const float sc = scs[kk], keep = sc != 0.0f ? 1.0f : 0.0f;
        float *restrict qc = q + (k0 + kk) * M + i0;
        for (int64_t i = 0; i < B; i++) qc[i] = (bitsf(t[i * kc + kk]) * keep) * sc;
      }
    }
  }
}

/* In place over T tensors of rows of B values (the wrapped optimizer's block-scaled gradients): lp_mx_e8m0 / lp_nv
   on each, into a scratch buffer copied back (each tensor exactly as its own call: the stochastic draws continue
   from one tensor to the next as consecutive calls would draw them). */
void lp_mx_list(int64_t T, float *const *x, const int64_t *G, int64_t B, float *restrict scratch,
                float *restrict sscratch, int32_t emax, const rn_params *p) {
  for (int64_t t = 0; t < T; t++) {
    lp_mx_e8m0(x[t], scratch, sscratch, G[t], B, emax, p);
    memcpy(x[t], scratch, (size_t)(G[t] * B) * 4);
  }
}
void lp_nv_list(int64_t T, float *const *x, const int64_t *G, int64_t B, float *restrict scratch,
                float *restrict sscratch, float fmt_max, float denom, const rn_params *pe, const rn_params *ps,
                uint8_t *st, const sr_params *sp) {
  mt_t g, *gen = NULL;
  if (st) { mt_load(st, &g); gen = &g; }
  for (int64_t t = 0; t < T; t++) {
    if (B == 16)
      nv_body(x[t], scratch, sscratch, G[t], 16, fmt_max, denom, pe, ps, gen, sp);
    else
      nv_body(x[t], scratch, sscratch, G[t], B, fmt_max, denom, pe, ps, gen, sp);
    memcpy(x[t], scratch, (size_t)(G[t] * B) * 4);
  }
  if (st) mt_store(&g, st);
}

/* lowprec.telemetry's NaN/inf checks (is the float32 sum of x finite?) decided without the sum where that is
   certain: 0 when every value is finite, n <= 2^24 and 4 n max|x| <= FLT_MAX (no partial sum, in any order, can
   overflow: each is at most n max|x| (1 + 2^-24)^n < e n max|x|), 1 when a value is NaN or ±inf (any sum is then
   NaN or ±inf), 2 when neither is certain (the caller sums). The max on the magnitude bits, as finite_amax. */
static inline int sum_finite(const float *restrict x, int64_t n) {
  const int32_t *restrict b = (const int32_t *)x;
  int32_t top = 0;
  for (int64_t i = 0; i < n; i++) {
    int32_t a = b[i] & 0x7FFFFFFF;
    top = a > top ? a : top;
  }
  if (top >= 0x7F800000)
    return 1;
  float amax;
  memcpy(&amax, &top, 4);
  return (n <= ((int64_t)1 << 24) && 4.0 * (double)n * (double)amax <= 3.4028234663852886e38) ? 0 : 2;
}
int lp_sum_finite(const float *restrict x, int64_t n) { return sum_finite(x, n); }
void lp_sum_finite_list(int64_t T, const float *const *x, const int64_t *n, int8_t *out) {
  for (int64_t t = 0; t < T; t++)
    out[t] = (int8_t)sum_finite(x[t], n[t]);
}
/* Telemetry.record_update's counts in one pass: intended = (unrounded != old) (NaN != anything), lost = intended
   and new == old (float comparisons, so -0 == +0 as torch's). */
void lp_lost_updates(const float *restrict old, const float *restrict unrounded, const float *restrict nw,
                     int64_t n, int64_t *restrict out) {
  int64_t intended = 0, lost = 0;
  for (int64_t i = 0; i < n; i++) {
    const int in = !(unrounded[i] == old[i]);
    intended += in;
    lost += in & (nw[i] == old[i]);
  }
  out[0] = intended;
  out[1] = lost;
}

/* lp_adam_pass1's operations on N elements (see below) */
static inline __attribute__((always_inline)) void adam_first(float *restrict P, const float *restrict G,
    float *restrict M, float *restrict V, int64_t N, float wd_mul, int32_t do_wd, float w1, float b2, float c2) {
  const int small = fabsf(w1) < 0.5f;
  const float coeff = small ? w1 : w1 - 1.0f;
  if (do_wd)
    for (int64_t i = 0; i < N; i++) P[i] = P[i] * wd_mul;
  if (small)
    for (int64_t i = 0; i < N; i++) { float gi = G[i], mi = M[i]; M[i] = fmaf(coeff, gi - mi, mi); }
  else
    for (int64_t i = 0; i < N; i++) { float gi = G[i], mi = M[i]; M[i] = fmaf(coeff, gi - mi, gi); }
  for (int64_t i = 0; i < N; i++) { float gi = G[i]; V[i] = fmaf(c2 * gi, gi, V[i] * b2); }
}
/* torch's foreach AdamW step (_multi_tensor_adam, decoupled weight decay), float32, in two passes around torch's
   own sqrt (MKL's, not IEEE's correctly rounded one, so it stays torch's call). Each line is the float operation
   of the ATen kernel it replaces, in its order (lowprec/adamw.py checks the bits against torch at first use):
   pass 1: p *= wd_mul (mul_, when weight decay is on); m = lerp(m, g, w1) as ATen's vectorized lerp, one fma of
   (w1 or w1 - 1) and (g - m) onto (m or g); v = v * b2 + (c2 * g) * g (mul_, then addcmul_ contracted to an fma);
   pass 2: d = sqrt(v) / bc2s + eps (div_, add_); p = p + (ss * m) / d (addcdiv_). T tensors, pointer arrays. */
void lp_adam_pass1(int64_t T, float *const *p, const float *const *g, float *const *m, float *const *v,
                   const int64_t *n, float wd_mul, int32_t do_wd, float w1, float b2, float c2) {
  for (int64_t t = 0; t < T; t++) adam_first(p[t], g[t], m[t], v[t], n[t], wd_mul, do_wd, w1, b2, c2);
}

/* lp_encode_e4m3 of one block (len <= L1_CHUNK): its scale, then its codes, by the same operations */
static inline __attribute__((always_inline)) void encode_e4m3_block(const float *restrict x, int64_t len,
    uint8_t *restrict codes, float *restrict scale, float fmt_max, const rn_params *p, uint32_t *restrict y,
    uint32_t *restrict t) {
  float sc = finite_amax(x, len) / fmt_max;
  sc = sc > 0.0f && sc < INFINITY ? sc : 1.0f;
  *scale = sc;
  for (int64_t k = 0; k < len; k++) y[k] = fbits(x[k] / sc);
  rn_body(y, t, len, p, 1, 1, 0, 0);
  for (int64_t k = 0; k < len; k++) codes[k] = e4m3_code(t[k]);
}
/* lowprec.optim's fused state step for lowprec.adamw.NativeAdamW: pass 1 on states kept as e4m3 codes with one
   fp32 scale per block of bs[t] along rows of rl[t] values (the last block of a row ragged). Per block, in this
   order: lp_decode_rows' decode of m's and v's codes (table[code] * scale) into m and v, lp_adam_pass1's
   operations on the block's elements, and lp_encode_e4m3's encode of the new m and v (their block amax, scale
   and codes) into mc2/ms2 and vc2/vs2. Every element gets the same float32 operations as in the three separate
   passes (each depends on its own inputs and its block's amax only), the block staying in L1 throughout. */
void lp_adam_pass1_e4m3(int64_t T, float *const *p, const float *const *g, float *const *m, float *const *v,
                        const int64_t *n, const int64_t *rl, const int64_t *bs, const uint8_t *const *mc,
                        const float *const *ms, const uint8_t *const *vc, const float *const *vs,
                        uint8_t *const *mc2, float *const *ms2, uint8_t *const *vc2, float *const *vs2,
                        const float *restrict table, float fmt_max, const rn_params *rp,
                        float wd_mul, int32_t do_wd, float w1, float b2, float c2) {
  uint32_t y[L1_CHUNK], t[L1_CHUNK];
  for (int64_t i = 0; i < T; i++) {
    const int64_t L = rl[i], R = n[i] / rl[i], B = bs[i], nb = (L + B - 1) / B;
    for (int64_t r = 0; r < R; r++) {
      for (int64_t b = 0; b < nb; b++) {
        const int64_t o = r * L + b * B, len = L - b * B < B ? L - b * B : B, s = r * nb + b;
        float *restrict P = p[i] + o, *restrict M = m[i] + o, *restrict V = v[i] + o;
        const float *restrict G = g[i] + o;
        const uint8_t *restrict cm = mc[i] + o, *restrict cv = vc[i] + o;
        const float sm = ms[i][s], sv = vs[i][s];
        for (int64_t k = 0; k < len; k++) M[k] = table[cm[k]] * sm;
        for (int64_t k = 0; k < len; k++) V[k] = table[cv[k]] * sv;
        adam_first(P, G, M, V, len, wd_mul, do_wd, w1, b2, c2);
        encode_e4m3_block(M, len, mc2[i] + o, ms2[i] + s, fmt_max, rp, y, t);
        encode_e4m3_block(V, len, vc2[i] + o, vs2[i] + s, fmt_max, rp, y, t);
      }
    }
  }
}

void lp_adam_pass2(int64_t T, float *const *p, const float *const *m, const float *const *d, const int64_t *n,
                   const float *bc2s, const float *ss, float eps) {
  for (int64_t t = 0; t < T; t++) {
    float *restrict P = p[t];
    const float *restrict M = m[t], *restrict D = d[t];
    const int64_t N = n[t];
    const float b = bc2s[t], s = ss[t];
    for (int64_t i = 0; i < N; i++) P[i] = P[i] + (s * M[i]) / (D[i] / b + eps);
  }
}
"""
# no -ffast-math: IEEE float32 arithmetic as torch's; -fno-trapping-math only lets the selects vectorize. On x86-64,
# 512-bit vectors where the CPU has AVX-512 (gcc's default for it is 256): the same elementwise operations, so the
# same bits (no reduction is reassociated without -ffast-math), and on a Sapphire Rapids Xeon 1.1-1.8x faster loops
# (e4m3 block encode of 262,144 values 221 -> 152 us, tensor-scaled e4m3 241 -> 135 us, NVFP4 233 -> 159 us)
_NATIVE_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-shared", "-fPIC") + (
    ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ())
_native: dict = {}  # "lib": the loaded library, or None once building it failed


class _SRParams(ctypes.Structure):
    _fields_ = [("lim", ctypes.c_float), ("thr", ctypes.c_float), ("max", ctypes.c_float), ("ov", ctypes.c_float),
                ("rmask", ctypes.c_uint32), ("keep", ctypes.c_uint32), ("saturate", ctypes.c_int32),
                ("inf_mask", ctypes.c_int32), ("flush", ctypes.c_int32)]


def _native_lib() -> ctypes.CDLL | None:
    """The native helpers, built on first use into ``$LOWPREC_CACHE_DIR`` (default: a per-user folder in the temp
    dir), or None where that fails or is off (no C compiler, not Linux, ``LOWPREC_NATIVE=0``): the callers then
    use the compiled kernels and torch's generator."""
    if "lib" in _native:
        return _native["lib"]
    lib = None
    cc = os.environ.get("CC", "cc")
    if sys.platform.startswith("linux") and os.environ.get("LOWPREC_NATIVE", "1") != "0":
        key = hashlib.sha256(repr((_NATIVE_SRC, _NATIVE_FLAGS, cc)).encode()).hexdigest()[:16]
        folder = os.environ.get("LOWPREC_CACHE_DIR") or os.path.join(tempfile.gettempdir(), f"lowprec_{os.getuid()}")
        so = os.path.join(folder, f"lowprec_native_{key}.so")
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            st = os.stat(folder)
            if st.st_uid != os.getuid() or st.st_mode & 0o022:  # never load a library others could have put there
                raise OSError(f"{folder} is not this user's own folder")
            if not os.path.exists(so):
                src, tmp = f"{so}.{os.getpid()}.c", f"{so}.{os.getpid()}.tmp"
                try:
                    with open(src, "w") as f:
                        f.write(_NATIVE_SRC)
                    subprocess.run([cc, *_NATIVE_FLAGS, "-o", tmp, src], check=True, capture_output=True,
                                   timeout=120)
                    os.replace(tmp, so)  # atomic: a concurrent build never loads a half-written file
                finally:
                    for leftover in (src, tmp):
                        if os.path.exists(leftover):
                            os.remove(leftover)
            lib = ctypes.CDLL(so)
            for name in ("lp_stochastic", "lp_random_bits", "lp_round", "lp_mx_e8m0", "lp_stats", "lp_tensor_scaled",
                         "lp_nv", "lp_decode_rows", "lp_transpose", "lp_encode_e4m3", "lp_adam_pass1",
                         "lp_adam_pass1_e4m3", "lp_adam_pass2", "lp_tensor_scaled_list", "lp_stochastic_list",
                         "lp_lost_updates", "lp_mx_list", "lp_nv_list", "lp_mx_e8m0_t", "lp_nv_t", "lp_sum_finite_list"):
                getattr(lib, name).restype = None
            lib.lp_sum_finite.restype = ctypes.c_int
        except (OSError, subprocess.SubprocessError) as e:
            lib, _native["error"] = None, f"{type(e).__name__}: {e}"  # (for a reader wondering why it is off)
    _native["lib"] = lib
    return lib


_MT_BYTES = 5056  # torch's CPUGeneratorImplState: seed u64, left i32, seeded i32, next u64, state u64[624], ...


def _mt_take(generator: torch.Generator | None) -> tuple[torch.Generator, torch.Tensor] | None:
    """(generator, a copy of its state bytes) for the native draws (which advance the mt19937 in those bytes, for
    ``_mt_put``), or None where the state is not the CPU mt19937 this code knows (the caller then draws with
    torch)."""
    g = torch.default_generator if generator is None else generator
    if g.device.type != "cpu":
        return None
    st = g.get_state()
    if st.numel() != _MT_BYTES:
        return None
    left, nxt = struct.unpack_from("<i4xq", st.numpy(), 8)
    if not (0 < left <= 624 and (left == 1 or left + nxt == 625)):
        return None
    return g, st


def _mt_put(g: torch.Generator, st: torch.Tensor) -> None:
    """Give ``g`` the advanced state (``st``'s other fields, the normal-sample caches, unchanged)."""
    g.set_state(st)


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _native_random_bits(shape: torch.Size, generator: torch.Generator | None) -> torch.Tensor | None:
    """``random_bits(shape, cpu, generator)`` bit for bit, same generator state after, by the native draws (into a
    huge-page buffer); None where the native helpers are unavailable."""
    lib = _native_lib()
    taken = _mt_take(generator) if lib is not None else None
    if taken is None:
        return None
    out = _empty(shape, torch.int32)
    lib.lp_random_bits(_ptr(taken[1]), _ptr(out), ctypes.c_int64(out.numel()))
    _mt_put(*taken)
    return out


def _draw_bits(shape: torch.Size, generator: torch.Generator | None) -> torch.Tensor:
    """The random bits of stochastic rounding: native where available, else torch's ``random_bits``."""
    r = _native_random_bits(shape, generator)
    return random_bits(shape, torch.device("cpu"), generator) if r is None else r


def _sr_params(fmt: Format, saturate: bool, flush: bool, rand_bits: int | None) -> _SRParams:
    """The constants of _stochastic_kernel for the native loops."""
    drop = 23 - fmt.man_bits
    nb = drop if rand_bits is None else min(rand_bits, drop)
    return _SRParams(rounding_limit(fmt, Rounding.STOCHASTIC, saturate), fmt.min_normal, fmt.max, overflow_value(fmt),
                     ((1 << nb) - 1) << (drop - nb), (~((1 << drop) - 1)) & 0xFFFFFFFF, int(saturate),
                     int(inf_needs_mask(fmt, Rounding.STOCHASTIC) and not saturate), int(flush))


def _native_stochastic(flat: torch.Tensor, fmt: Format, saturate: bool, flush: bool, rand_bits: int | None,
                       generator: torch.Generator | None) -> torch.Tensor | None:
    """_stochastic_kernel on contiguous float32 ``flat`` with the random bits drawn inside the loop (native), or
    None where the native helpers are unavailable."""
    lib = _native_lib()
    taken = _mt_take(generator) if lib is not None else None
    if taken is None:
        return None
    p = _sr_params(fmt, saturate, flush, rand_bits)
    out = _empty(flat.shape, torch.float32)
    lib.lp_stochastic(_ptr(flat), _ptr(out), ctypes.c_int64(flat.numel()), _ptr(taken[1]), ctypes.byref(p))
    _mt_put(*taken)
    return out


class _RNParams(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("lim", "max_b", "min_normal_b", "over_b", "keep", "half_less_one",
                                               "odd_or")] + [
        ("drop", ctypes.c_int32), ("up", ctypes.c_float), ("inv_up", ctypes.c_float), ("nearest", ctypes.c_int32),
        ("saturate", ctypes.c_int32), ("inf_mask", ctypes.c_int32), ("flush", ctypes.c_int32),
        ("nan_b", ctypes.c_uint32)]


def _nan_bits(fmt: Format, rounding: Rounding) -> int:
    """The float32 NaN the eager path gives (before the sign): torch's E5M2 cast (nearest on registered e5m2) turns
    every NaN into code 0x7F, which widens to 0x7FE00000; every other path gives the canonical 0x7FC00000."""
    return 0x7FE00000 if rounding == Rounding.NEAREST and torch_dtype(fmt) == torch.float8_e5m2 else _CANONICAL_NAN


@functools.lru_cache(maxsize=256)
def _rn_params(fmt: Format, rounding: Rounding, saturate: bool, flush: bool) -> _RNParams:
    """The constants of _int_kernel for the native loops (cached: the callers pass it by reference, read-only)."""
    drop = 23 - fmt.man_bits
    ov = overflow_value(fmt)
    return _RNParams(_bits(rounding_limit(fmt, rounding, saturate)), _bits(fmt.max), _bits(fmt.min_normal),
                     _CANONICAL_NAN if ov != ov else (0x7F800000 if ov == float("inf") else _bits(fmt.max)),
                     (~((1 << drop) - 1)) & 0xFFFFFFFF, (1 << (drop - 1)) - 1, int(drop == 23), drop,
                     2.0 ** (fmt.man_bits - fmt.emin), 2.0 ** (fmt.emin - fmt.man_bits),
                     int(rounding == Rounding.NEAREST), int(saturate), int(inf_needs_mask(fmt, rounding)), int(flush),
                     _nan_bits(fmt, rounding))


def _native_round(flat: torch.Tensor, fmt: Format, rounding: Rounding, saturate: bool,
                  flush: bool) -> torch.Tensor | None:
    """_int_kernel (nearest / toward_zero) on contiguous float32 ``flat`` by the native loop, or None where the
    native helpers are unavailable or torch runs more than one thread (the compiled kernel is parallel, this loop
    is not)."""
    lib = _native_lib() if torch.get_num_threads() == 1 else None
    if lib is None:
        return None
    out = _empty(flat.shape, torch.float32)
    lib.lp_round(_ptr(flat), _ptr(out), ctypes.c_int64(flat.numel()),
                 ctypes.byref(_rn_params(fmt, rounding, saturate, flush)))
    return out


def fast_min_numel() -> int:
    """The smallest tensor any fast path takes now (the callers' cheap early-out)."""
    return min(MIN_NUMEL_NATIVE, _state["min_numel"], _state["min_numel_stochastic"])


def _min_native(sto: bool) -> int:
    """The smallest tensor the native helpers take (stochastic rounding or not)."""
    return min(MIN_NUMEL_NATIVE, _state["min_numel_stochastic" if sto else "min_numel"])


def _tensor_scaled_ok(s: QuantSpec) -> bool:
    """Whether the native tensor-scaling loop (``lp_tensor_scaled``) takes ``s``: one fp32 tensor scale, nearest /
    toward_zero, an element format with emax < 127, on one torch thread."""
    return (s.rounding != Rounding.STOCHASTIC and s.scaling is not None and s.scaling.mode == "tensor"
            and s.scaling.scale_format == "fp32" and s.format.emax < 127 and torch.get_num_threads() == 1)


def _native_tensor_scaled(v2: torch.Tensor, s: QuantSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """_scaled_kernel for one fp32 tensor scale (:func:`_tensor_scaled_ok`) on contiguous float32 ``v2`` (1 x n)
    by the native loop: (quantized values, scale (1, 1)), or None where it does not apply (that, or no native
    helpers)."""
    if not _tensor_scaled_ok(s):
        return None
    lib = _native_lib()
    if lib is None:
        return None
    q = _empty(v2.shape, torch.float32)
    scale = torch.empty(1, 1, dtype=torch.float32)
    lib.lp_tensor_scaled(_ptr(v2), _ptr(q), _ptr(scale), ctypes.c_int64(v2.numel()), ctypes.c_float(s.format.max),
                         ctypes.byref(_rn_params(s.format, s.rounding, s.saturate, s.flush_subnormals)))
    return q, scale


def encode_e4m3_ok(x: torch.Tensor, s: QuantSpec) -> bool:
    """Whether :func:`encode_e4m3` takes ``x`` under ``s``: e4m3 (torch's float8_e4m3fn), nearest, saturating, no
    flushing, fp32 scales per tensor or per 1-D block along the last axis; contiguous float32 on the CPU of at
    least the native helpers' size, one torch thread, the fast path on."""
    sc = s.scaling
    return (_state["enabled"] and not torch.compiler.is_compiling() and x.dtype == torch.float32
            and x.device.type == "cpu" and x.dim() >= 1 and x.numel() >= _min_native(False) and x.is_contiguous()
            and s.rounding == Rounding.NEAREST and s.saturate and not s.flush_subnormals
            and torch_dtype(s.format) == torch.float8_e4m3fn and sc is not None and sc.scale_format == "fp32"
            and (sc.mode == "tensor" or (sc.mode == "block" and sc.block_rows == 1
                                         and sc.axis % x.dim() == x.dim() - 1))
            and torch.get_num_threads() == 1)


def encode_e4m3(x: torch.Tensor, s: QuantSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The codes (uint8, ``x``'s shape) and fp32 scales (``lowprec.codecs.encode``'s layout: ``x.shape[:-1] +
    (blocks,)``, or ``[1] * x.dim()`` for a tensor scale) of ``encode(x, s)`` in one native pass, bit for bit, or
    None where it does not apply (:func:`encode_e4m3_ok`, no native helpers)."""
    if not encode_e4m3_ok(x, s):
        return None
    lib = _native_lib()
    if lib is None:
        return None
    if s.scaling.mode == "tensor":
        G, n, block = 1, x.numel(), x.numel()
        scale = torch.empty([1] * x.dim(), dtype=torch.float32)
    else:
        n = x.shape[-1]
        G, block = x.numel() // n, s.scaling.block_size
        scale = torch.empty(*x.shape[:-1], -(-n // block), dtype=torch.float32)
    codes = _empty(x.shape, torch.uint8)
    lib.lp_encode_e4m3(_ptr(x), _ptr(codes), _ptr(scale), ctypes.c_int64(G), ctypes.c_int64(n),
                       ctypes.c_int64(block), ctypes.c_float(s.format.max),
                       ctypes.byref(_rn_params(s.format, Rounding.NEAREST, True, False)))
    return codes, scale


def tensor_scaled_segments(buf: torch.Tensor, lens: list[int], s: QuantSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``quantize_with_scale`` of each segment of contiguous 1-D float32 ``buf`` (consecutive lengths ``lens``)
    under one fp32 tensor scale per segment, by the native loop of :func:`_native_tensor_scaled` called once per
    segment (the same bits: a segment is quantized exactly as the tensor alone): (the quantized buffer, the
    segments' scales as float32 ``[len(lens)]``), or None where that loop does not apply (see there) or the fast
    path is off. Segments of any length (the per-tensor path's size threshold is a cost, not a bit, matter)."""
    if (not _state["enabled"] or torch.compiler.is_compiling() or buf.dtype != torch.float32
            or buf.device.type != "cpu" or buf.dim() != 1 or not buf.is_contiguous() or sum(lens) != buf.numel()
            or not _tensor_scaled_ok(s)):
        return None
    lib = _native_lib()
    if lib is None:
        return None
    q = _empty(buf.shape, torch.float32)
    scale = torch.empty(len(lens), dtype=torch.float32)
    rn = ctypes.byref(_rn_params(s.format, s.rounding, s.saturate, s.flush_subnormals))
    fmax = ctypes.c_float(s.format.max)
    x0, q0, s0 = buf.data_ptr(), q.data_ptr(), scale.data_ptr()
    off = 0
    for i, n in enumerate(lens):
        lib.lp_tensor_scaled(ctypes.c_void_p(x0 + 4 * off), ctypes.c_void_p(q0 + 4 * off),
                             ctypes.c_void_p(s0 + 4 * i), ctypes.c_int64(n), fmax, rn)
        off += n
    return q, scale


def _mx_loop_ok(s: QuantSpec, B: int) -> bool:
    """Whether the native MX loops (``lp_mx_e8m0`` and its ``_t`` and ``_list`` forms) take ``s`` with blocks of
    ``B``: E8M0 block scales, nearest / toward_zero, ``B <=`` :data:`_MX_MAX_BLOCK`, one torch thread."""
    return (s.rounding != Rounding.STOCHASTIC and s.scaling.mode == "block" and s.scaling.scale_format == "e8m0"
            and B <= _MX_MAX_BLOCK and torch.get_num_threads() == 1)


def _nv_loop_ok(s: QuantSpec, B: int) -> bool:
    """Whether the native NVFP4 loops (``lp_nv`` and its ``_t`` and ``_list`` forms) take ``s`` with blocks of
    ``B``: E4M3 block scales, one torch thread, and for stochastic rounding blocks of even length."""
    return (s.scaling.mode == "block" and s.scaling.scale_format == "e4m3" and torch.get_num_threads() == 1
            and not (s.rounding == Rounding.STOCHASTIC and B % 2))


def _native_nv(v2: torch.Tensor, s: QuantSpec,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """_scaled_kernel for E4M3 block scales (NVFP4-style; any rounding, stochastic drawing from ``generator`` the
    words the eager path draws) on contiguous float32 rows ``v2`` by the native loop: (quantized rows, scales (G,
    1)), or None where it does not apply (stochastic rounding of odd-length blocks, more than one torch thread, a
    generator that is not the CPU mt19937, no native helpers)."""
    sto = s.rounding == Rounding.STOCHASTIC
    if not _nv_loop_ok(s, v2.shape[1]):
        return None
    lib = _native_lib()
    if lib is None:
        return None
    taken = _mt_take(generator) if sto else None
    if sto and taken is None:
        return None
    q = _empty(v2.shape, torch.float32)
    scale = torch.empty(v2.shape[0], 1, dtype=torch.float32)
    fmax, denom, rn, ps, sp = _nv_args(s)
    lib.lp_nv(_ptr(v2), _ptr(q), _ptr(scale), ctypes.c_int64(v2.shape[0]), ctypes.c_int64(v2.shape[1]), fmax, denom,
              rn, ps, _ptr(taken[1]) if sto else None, sp)
    if sto:
        _mt_put(*taken)
    return q, scale


@functools.lru_cache(maxsize=256)
def _nv_args(s: QuantSpec) -> tuple:
    """lp_nv's constant arguments for ``s`` (format max, the tensor-scale denominator, the element and e4m3 block
    scale rounding constants, the stochastic constants or None), made once per spec (read-only in C)."""
    sto = s.rounding == Rounding.STOCHASTIC
    rn = _rn_params(s.format, Rounding.NEAREST if sto else s.rounding, s.saturate, s.flush_subnormals)
    ps = _rn_params(get_format("e4m3"), Rounding.NEAREST, True, False)
    sp = _sr_params(s.format, s.saturate, s.flush_subnormals, s.rand_bits) if sto else None
    return (ctypes.c_float(s.format.max), ctypes.c_float(448.0 * s.format.max), ctypes.byref(rn), ctypes.byref(ps),
            None if sp is None else ctypes.byref(sp))


_MX_MAX_BLOCK = 1024  # the native MX loop keeps chunks of whole rows (L1_CHUNK = 1024 values) on the stack


def _native_mx(v2: torch.Tensor, s: QuantSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """_scaled_kernel for E8M0 block scales (nearest / toward_zero) on contiguous float32 rows ``v2`` by the
    native loop: (quantized rows, scales (G, 1)), or None where it does not apply (stochastic rounding, E4M3 or
    fp32 scales, blocks over :data:`_MX_MAX_BLOCK`, more than one torch thread, no native helpers)."""
    if not _mx_loop_ok(s, v2.shape[-1]):
        return None
    lib = _native_lib()
    if lib is None:
        return None
    q = _empty(v2.shape, torch.float32)
    scale = torch.empty(v2.shape[0], 1, dtype=torch.float32)
    lib.lp_mx_e8m0(_ptr(v2), _ptr(q), _ptr(scale), ctypes.c_int64(v2.shape[0]), ctypes.c_int64(v2.shape[1]),
                   ctypes.c_int32(s.format.emax), ctypes.byref(_rn_params(s.format, s.rounding, s.saturate,
                                                                          s.flush_subnormals)))
    return q, scale


def native_scaled_t(x: torch.Tensor, s: QuantSpec, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`native_scaled` of ``x.t().contiguous()`` viewed as rows of one block, for contiguous float32 2-D ``x``
    with blocks along axis 0 (``x.shape[0] % B == 0``): (quantized rows, scales ``(rows, 1)``) in that transposed
    layout, the same bits. MX and NVFP4-style E4M3 blocks with nearest / toward_zero rounding read ``x`` in place,
    with no transposed copy (``lp_mx_e8m0_t``, ``lp_nv_t``); stochastic rounding goes through :func:`transposed`
    then :func:`native_scaled` (its draws follow the transposed order). None where neither applies."""
    M, K = x.shape
    B = s.scaling.block_size
    tiles = (x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous() and x.device.type == "cpu"
             and M % B == 0)
    if tiles and _mx_loop_ok(s, B):
        lib = _native_lib()
        if lib is not None:
            q = _empty((K * M // B, B), torch.float32)
            scale = torch.empty(K * M // B, 1, dtype=torch.float32)
            lib.lp_mx_e8m0_t(_ptr(x), _ptr(q), _ptr(scale), ctypes.c_int64(M), ctypes.c_int64(K), ctypes.c_int64(B),
                             ctypes.c_int32(s.format.emax),
                             ctypes.byref(_rn_params(s.format, s.rounding, s.saturate, s.flush_subnormals)))
            return q, scale
    if tiles and s.rounding != Rounding.STOCHASTIC and B <= _MX_MAX_BLOCK and _nv_loop_ok(s, B):
        lib = _native_lib()   # (tiles of B rows: the loop's buffers hold L1_CHUNK = _MX_MAX_BLOCK values)
        if lib is not None:
            q = _empty((K * M // B, B), torch.float32)
            scale = torch.empty(K * M // B, 1, dtype=torch.float32)
            fmax, denom, rn, ps, _ = _nv_args(s)
            lib.lp_nv_t(_ptr(x), _ptr(q), _ptr(scale), ctypes.c_int64(M), ctypes.c_int64(K), ctypes.c_int64(B),
                        fmax, denom, rn, ps)
            return q, scale
    xt = transposed(x)
    return None if xt is None else native_scaled(xt.view(-1, B), s, generator)


class _StatsOut(ctypes.Structure):
    _fields_ = [("nonzero", ctypes.c_int64), ("flushed", ctypes.c_int64), ("saturated", ctypes.c_int64),
                ("nan", ctypes.c_int64), ("inf", ctypes.c_int64), ("zeros", ctypes.c_int64),
                ("sig2", ctypes.c_double), ("err2", ctypes.c_double), ("smin", ctypes.c_double),
                ("smax", ctypes.c_double), ("range_ok", ctypes.c_int64)]


# the counts of record_counts (lp_stats also returns the scale range after them)
STAT_COUNTS = ("nonzero", "flushed", "saturated", "nan", "inf", "zeros", "sig2", "err2")


def transposed(x: torch.Tensor) -> torch.Tensor | None:
    """``x.t().contiguous()`` of a contiguous 2-D float32 CPU tensor by the native tiled loop (the same bits;
    torch's strided copy measured ~7x a plain copy), or None where that does not apply."""
    if x.dim() != 2 or x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu":
        return None
    lib = _native_lib()
    if lib is None:
        return None
    out = _empty((x.shape[1], x.shape[0]), torch.float32)
    lib.lp_transpose(_ptr(x), _ptr(out), ctypes.c_int64(x.shape[0]), ctypes.c_int64(x.shape[1]))
    return out


def _contiguous_view(view: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``view.contiguous()`` for a scaling view of float32 ``x``; blocks along axis 0 of a contiguous 2-D ``x``
    (``view`` = ``x.t()`` in rows of blocks) by the native transpose."""
    if view.is_contiguous():
        return view
    if (x.dim() == 2 and view.dim() == 3 and view.shape[0] == x.shape[1]
            and view.shape[1] * view.shape[2] == x.shape[0]
            and view.stride() == (1, view.shape[2] * x.shape[1], x.shape[1])):
        t = transposed(x)   # (which checks x is contiguous float32 on the CPU)
        if t is not None:
            return t.view(view.shape)
    return view.contiguous()


def decode_table_rows(codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | None,
                      block: int, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``table[codes] * scale`` per block of ``block`` codes along the rows of 2-D uint8 ``codes`` (``scale``:
    float32 ``[rows, ceil(n / block)]``, or None for no scale) in one native pass: float32 ``[rows, n]`` with the
    eager lookup's values and its one multiply per element (into ``out``, a contiguous float32 CPU tensor of that
    shape, if given), or None where that loop does not apply (fast path off, not CPU / contiguous / these dtypes,
    no native helpers)."""
    if (not _state["enabled"] or torch.compiler.is_compiling() or codes.device.type != "cpu" or codes.dim() != 2
            or codes.dtype != torch.uint8 or not codes.is_contiguous() or table.dtype != torch.float32
            or table.numel() != 256 or not table.is_contiguous() or block < 1):
        return None
    R, n = codes.shape
    nb = -(-n // block)
    if scale is not None and (scale.dtype != torch.float32 or tuple(scale.shape) != (R, nb)
                              or not scale.is_contiguous() or scale.device.type != "cpu"):
        return None
    if out is not None and (out.dtype != torch.float32 or out.shape != codes.shape or not out.is_contiguous()
                            or out.device.type != "cpu"):
        return None
    lib = _native_lib()
    if lib is None:
        return None
    if out is None:
        out = _empty(codes.shape, torch.float32)
    lib.lp_decode_rows(_ptr(codes), _ptr(table), None if scale is None else _ptr(scale), _ptr(out),
                       ctypes.c_int64(R), ctypes.c_int64(n), ctypes.c_int64(block), ctypes.c_int64(nb))
    return out


def native_available() -> bool:
    """Whether the native helpers are built and loaded in this process (builds them on first call)."""
    return _native_lib() is not None


def _pointers(ts: list[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])


def mark_written(ts: list[torch.Tensor]) -> None:
    """Bump the autograd version counters of tensors a native loop wrote in place (as torch's in-place ops do, so
    that autograd still refuses a backward through a saved tensor that changed)."""
    bump = getattr(torch.autograd.graph, "increment_version", None)
    if bump is not None and ts:
        bump(ts)


def dense_cpu_f32(t: torch.Tensor) -> bool:
    """A contiguous dense float32 CPU tensor: what the native loops read and write through its data pointer."""
    return t.dtype is torch.float32 and t.is_cpu and t.layout is torch.strided and t.is_contiguous()


def _in_place_ok(ts: list[torch.Tensor]) -> bool:
    return _state["enabled"] and not torch.compiler.is_compiling() and all(dense_cpu_f32(t) for t in ts)


def tensor_scaled_in_place(ts: list[torch.Tensor], s: QuantSpec) -> torch.Tensor | None:
    """``quantize_with_scale(t, s)`` written into every ``t`` (contiguous float32 CPU tensors) by the native
    tensor-scaling loop, one call for all: their fp32 scales ``[len(ts)]``, or None (nothing changed) where the
    loop does not take ``s`` (:func:`_tensor_scaled_ok`) or the tensors, or the fast path is off. Any size: the
    per-tensor path's threshold is a matter of cost, not of bits (:func:`tensor_scaled_segments`)."""
    if not _tensor_scaled_ok(s) or not _in_place_ok(ts):
        return None
    lib = _native_lib()
    if lib is None:
        return None
    T = len(ts)
    scale = torch.empty(T, dtype=torch.float32)
    lib.lp_tensor_scaled_list(ctypes.c_int64(T), _pointers(ts), (ctypes.c_int64 * T)(*[t.numel() for t in ts]),
                              _ptr(scale), ctypes.c_float(s.format.max),
                              ctypes.byref(_rn_params(s.format, s.rounding, s.saturate, s.flush_subnormals)))
    mark_written(ts)
    return scale


def block_scaled_in_place(ts: list[torch.Tensor], s: QuantSpec, generator: torch.Generator | None) -> bool:
    """``quantize_with_scale(t, s, generator)`` written into every ``t`` in list order, by the native MX or NVFP4
    loop, one call for all: what each tensor's own quantize runs (its plan: the loop on its rows of one block),
    the stochastic draws in the same order. Contiguous float32 CPU tensors whose last axis the blocks tile; False
    (nothing changed, nothing drawn) where a tensor, the spec or the settings do not give that plan."""
    sc = s.scaling
    if (sc is None or sc.mode != "block" or sc.block_rows != 1 or not fast_scaled_ok(s) or not _in_place_ok(ts)
            or torch.get_num_threads() != 1 or not ts):
        return False
    B, sto, mx = sc.block_size, s.rounding == Rounding.STOCHASTIC, sc.scale_format == "e8m0"
    if not (_mx_loop_ok(s, B) if mx else _nv_loop_ok(s, B)):
        return False
    if any(t.dim() == 0 or sc.axis % t.dim() != t.dim() - 1 or t.shape[-1] % B or t.numel() < _min_native(sto)
           for t in ts):
        return False
    lib = _native_lib()
    if lib is None:
        return False
    T = len(ts)
    G = (ctypes.c_int64 * T)(*[t.numel() // B for t in ts])
    big = max(t.numel() for t in ts)
    scratch, sscratch = torch.empty(big, dtype=torch.float32), torch.empty(big // B, dtype=torch.float32)
    if mx:
        lib.lp_mx_list(ctypes.c_int64(T), _pointers(ts), G, ctypes.c_int64(B), _ptr(scratch), _ptr(sscratch),
                       ctypes.c_int32(s.format.emax),
                       ctypes.byref(_rn_params(s.format, s.rounding, s.saturate, s.flush_subnormals)))
    else:
        taken = _mt_take(generator) if sto else None
        if sto and taken is None:
            return False
        fmax, denom, rn, ps, sp = _nv_args(s)
        lib.lp_nv_list(ctypes.c_int64(T), _pointers(ts), G, ctypes.c_int64(B), _ptr(scratch), _ptr(sscratch),
                       fmax, denom, rn, ps, _ptr(taken[1]) if sto else None, sp)
        if sto:
            _mt_put(*taken)
    mark_written(ts)
    return True


def stochastic_in_place(ts: list[torch.Tensor], fmt: Format, *, saturate: bool, flush: bool,
                        rand_bits: int | None, generator: torch.Generator | None) -> bool:
    """``round_to_format(t, fmt, "stochastic", ...)`` written into every ``t`` (contiguous float32 CPU tensors) in
    list order, one native call for all: the draws of one call per tensor (each starts on an even word, as
    ``lowprec.optim_batch``'s batches align them), the generator left where those calls leave it. False (nothing
    changed, nothing drawn) where the native loop does not apply."""
    if not fast_round_ok(fmt, Rounding.STOCHASTIC) or not _in_place_ok(ts):
        return False
    lib = _native_lib()
    taken = _mt_take(generator) if lib is not None else None
    if taken is None:
        return False
    T = len(ts)
    p = _sr_params(fmt, bool(saturate), bool(flush), rand_bits)
    lib.lp_stochastic_list(ctypes.c_int64(T), _pointers(ts), (ctypes.c_int64 * T)(*[t.numel() for t in ts]),
                           _ptr(taken[1]), ctypes.byref(p))
    _mt_put(*taken)
    mark_written(ts)
    return True


class PackedMoments:
    """One parameter's AdamW moments held as e4m3 codes while a step runs (``lowprec.optim`` hands them to
    ``lowprec.adamw.NativeAdamW``): ``codes`` (m's, v's: uint8 in the parameter's 2-D shape) and ``scales`` (fp32
    ``[rows, blocks]``, one per block of ``spec``'s block size along the rows; ``spec`` e4m3, nearest, saturating,
    fp32 scales), ``table`` (float32 value of each code), and the tensors of the same layouts the step writes the
    new encodings into (``codes_out``, ``scales_out``): ``lowprec.codecs.encode`` of the new moments, bit for bit.
    ``done``: set once a step has written them (else the caller decodes and encodes as usual)."""
    __slots__ = ("codes", "scales", "spec", "table", "codes_out", "scales_out", "done")

    def __init__(self, codes: tuple[torch.Tensor, torch.Tensor], scales: tuple[torch.Tensor, torch.Tensor],
                 spec: QuantSpec, table: torch.Tensor) -> None:
        self.codes, self.scales, self.spec, self.table = codes, scales, spec, table
        self.codes_out = tuple(_empty(c.shape, torch.uint8) for c in codes)
        self.scales_out = tuple(torch.empty(sc.shape, dtype=torch.float32) for sc in scales)
        self.done = False


def packed_moments_ok(codes: torch.Tensor, scale: torch.Tensor | None, spec: QuantSpec, shape: torch.Size) -> bool:
    """Whether :func:`adam_step` can take a moment encoded as ``codes``/``scale`` under ``spec`` for a parameter of
    ``shape``: the layouts :class:`PackedMoments` describes, where :func:`encode_e4m3` and the native row decode
    (``lowprec.optim_batch``) would both run (fast path on, one torch thread, the native helpers' sizes), blocks of
    at most 1,024 values."""
    sc = spec.scaling
    if not (_state["enabled"] and not torch.compiler.is_compiling() and torch.get_num_threads() == 1
            and len(shape) == 2 and codes.dtype == torch.uint8 and codes.shape == shape and codes.is_contiguous()
            and codes.device.type == "cpu" and codes.numel() >= _min_native(False)
            and spec.rounding == Rounding.NEAREST and spec.saturate and not spec.flush_subnormals
            and torch_dtype(spec.format) == torch.float8_e4m3fn and sc is not None and sc.mode == "block"
            and sc.block_rows == 1 and sc.axis in (-1, 1) and sc.scale_format == "fp32"
            and 1 <= sc.block_size <= 1024 and scale is not None):
        return False
    nb = -(-shape[1] // sc.block_size)
    return (scale.dtype == torch.float32 and tuple(scale.shape) == (shape[0], nb) and scale.is_contiguous()
            and scale.device.type == "cpu")


def adam_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
              exp_avg_sqs: list[torch.Tensor], steps: list[float], *, lr: float, beta1: float, beta2: float,
              eps: float, weight_decay: float, packed: list[PackedMoments | None] | None = None) -> bool:
    """One step of torch's foreach AdamW (decoupled weight decay; no amsgrad, maximize or capturable) on contiguous
    float32 CPU tensors, in place, by two native passes around ``torch._foreach_sqrt`` (the C source says which
    ATen operation each line replaces); ``steps``: each parameter's step count after this step's increment (the
    bias corrections, computed as torch does in double). False where the native helpers are unavailable (nothing
    was changed). Bit for bit torch's step only where :mod:`lowprec.adamw`'s check at first use passed: call it
    through :class:`lowprec.adamw.NativeAdamW`.

    ``packed`` (one entry per parameter, None for most): moments held as e4m3 codes (:class:`PackedMoments`,
    checked by :func:`packed_moments_ok`). For those, ``exp_avgs`` / ``exp_avg_sqs`` are buffers to write: the
    first pass decodes the codes into them, updates them and encodes the results, block by block
    (``lp_adam_pass1_e4m3``), the same bits as decoding first, the step, and encoding after."""
    lib = _native_lib()
    if lib is None:
        return False
    T = len(params)
    if T == 0:
        return True
    n = (ctypes.c_int64 * T)(*[t.numel() for t in params])
    wd = (ctypes.c_float(1 - lr * weight_decay), ctypes.c_int32(weight_decay != 0), ctypes.c_float(1 - beta1),
          ctypes.c_float(beta2), ctypes.c_float(1 - beta2))
    plain = list(range(T)) if packed is None else [i for i in range(T) if packed[i] is None]
    fused = [] if packed is None else [i for i in range(T) if packed[i] is not None]

    def pick(ts: list[torch.Tensor], idx: list[int]) -> ctypes.Array:
        return _pointers([ts[i] for i in idx])
    if plain:
        lib.lp_adam_pass1(ctypes.c_int64(len(plain)), pick(params, plain), pick(grads, plain), pick(exp_avgs, plain),
                          pick(exp_avg_sqs, plain), (ctypes.c_int64 * len(plain))(*[n[i] for i in plain]), *wd)
    if fused:
        pk = [packed[i] for i in fused]
        F = len(fused)
        fmt = pk[0].spec.format
        lib.lp_adam_pass1_e4m3(
            ctypes.c_int64(F), pick(params, fused), pick(grads, fused), pick(exp_avgs, fused),
            pick(exp_avg_sqs, fused),
            (ctypes.c_int64 * F)(*[n[i] for i in fused]), (ctypes.c_int64 * F)(*[params[i].shape[1] for i in fused]),
            (ctypes.c_int64 * F)(*[q.spec.scaling.block_size for q in pk]),
            _pointers([q.codes[0] for q in pk]), _pointers([q.scales[0] for q in pk]),
            _pointers([q.codes[1] for q in pk]), _pointers([q.scales[1] for q in pk]),
            _pointers([q.codes_out[0] for q in pk]), _pointers([q.scales_out[0] for q in pk]),
            _pointers([q.codes_out[1] for q in pk]), _pointers([q.scales_out[1] for q in pk]),
            _ptr(pk[0].table), ctypes.c_float(fmt.max), ctypes.byref(_rn_params(fmt, Rounding.NEAREST, True, False)),
            *wd)
        for q in pk:
            q.done = True
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    bc2s = (ctypes.c_float * T)(*[(1 - beta2 ** s) ** 0.5 for s in steps])
    ss = (ctypes.c_float * T)(*[(lr / (1 - beta1 ** s)) * -1 for s in steps])
    lib.lp_adam_pass2(ctypes.c_int64(T), _pointers(params), _pointers(exp_avgs), _pointers(denoms), n, bc2s, ss,
                      ctypes.c_float(eps))
    mark_written(params + exp_avgs + exp_avg_sqs)
    return True


SUM_FINITE, SUM_NONFINITE, SUM_UNDECIDED = 0, 1, 2


def sum_finite(t: torch.Tensor) -> int:
    """Whether ``t.sum()`` (float32, torch's, whatever its order) is finite, without summing where that is
    certain, in one native pass: ``SUM_FINITE`` (every value finite, and ``4 n max|t|`` within float32's range, so
    no partial sum can overflow), ``SUM_NONFINITE`` (a NaN or ±inf value: any sum is NaN or ±inf), or
    ``SUM_UNDECIDED`` (larger values; or not a dense float32 CPU tensor, the fast path off, no native helpers):
    the caller then sums."""
    if not (_state["enabled"] and dense_cpu_f32(t)) or torch.compiler.is_compiling():
        return SUM_UNDECIDED
    lib = _native_lib()
    if lib is None:
        return SUM_UNDECIDED
    return lib.lp_sum_finite(ctypes.c_void_p(t.data_ptr()), ctypes.c_int64(t.numel()))


def sums_finite(ts: list[torch.Tensor]) -> list[int]:
    """``[sum_finite(t) for t in ts]`` in one native call."""
    if not _state["enabled"] or torch.compiler.is_compiling():
        return [SUM_UNDECIDED] * len(ts)
    lib = _native_lib()
    if lib is None:
        return [SUM_UNDECIDED] * len(ts)
    dense = [dense_cpu_f32(t) for t in ts]
    T = len(ts)
    out = (ctypes.c_int8 * T)()
    lib.lp_sum_finite_list(ctypes.c_int64(T), (ctypes.c_void_p * T)(*[t.data_ptr() if d else 0 for t, d in zip(ts, dense)]),
                           (ctypes.c_int64 * T)(*[t.numel() if d else 0 for t, d in zip(ts, dense)]), out)
    return [k if d else SUM_UNDECIDED for k, d in zip(out, dense)]


def lost_updates(old: torch.Tensor, unrounded: torch.Tensor, new: torch.Tensor) -> tuple[int, int] | None:
    """``Telemetry.record_update``'s counts, (intended, lost) = (#(unrounded != old), #(that and new == old)), in
    one native pass over float32 CPU tensors of one shape; None where that does not apply (the caller counts
    with torch)."""
    ts = (old, unrounded, new)
    if not _state["enabled"] or any(t.dtype != torch.float32 or t.device.type != "cpu" or t.shape != old.shape
                                    for t in ts):
        return None
    lib = _native_lib()
    if lib is None:
        return None
    old, unrounded, new = (t.detach().contiguous() for t in ts)
    out = (ctypes.c_int64 * 2)()
    lib.lp_lost_updates(_ptr(old), _ptr(unrounded), _ptr(new), ctypes.c_int64(old.numel()), out)
    return int(out[0]), int(out[1])


def record_counts(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None,
                  limit: float | None) -> dict[str, float] | None:
    """The counts of ``Telemetry.record`` for float32 CPU tensors ``x -> q`` (same shape; ``scale`` broadcastable
    to them or None; ``limit`` the saturation threshold before scaling, None: no format maximum) in one native
    pass: nonzero (finite, non-zero x), flushed (those with q == 0), saturated (finite x with |x| > limit·scale or
    q non-finite), nan and inf (of q), zeros (of q), sig2 = Σx², err2 = Σ(x - q)² (x - q in float32, the sums in
    float64 in 8 interleaved lanes); and, for a float32 ``scale`` read by the pass, its min and max (``scale_min``,
    ``scale_max``: float(scale.min()) and float(scale.max()) exactly) where the pass is certain of them (no NaN and no
    zero scale; else those keys are absent). None where it does not apply (fast path off, no native helpers, other
    dtypes or devices, a scale that is not float32-convertible): the caller then counts with torch."""
    if not _state["enabled"] or x.dtype != torch.float32 or q.dtype != torch.float32 or x.shape != q.shape:
        return None
    if x.device.type != "cpu" or q.device.type != "cpu":
        return None
    lib = _native_lib()
    if lib is None:
        return None
    x, q = x.detach().contiguous(), q.detach().contiguous()
    sc, scale_n = None, 0
    if scale is not None and limit is not None:
        s = scale.detach()
        if s.device.type != "cpu" or not s.dtype.is_floating_point:
            return None
        s = s.to(torch.float32)
        if s.numel() == 1:
            sc, scale_n = s.reshape(1).contiguous(), 1
        else:
            sc, scale_n = torch.broadcast_to(s, x.shape).contiguous(), x.numel()
    out = _StatsOut()
    lib.lp_stats(_ptr(x), _ptr(q), None if sc is None else _ptr(sc), ctypes.c_int64(scale_n),
                 ctypes.c_int64(x.numel()), ctypes.c_float(0.0 if limit is None else limit),
                 ctypes.c_int32(limit is not None), ctypes.byref(out))
    counts = {name: getattr(out, name) for name in STAT_COUNTS}
    if out.range_ok and scale.dtype == torch.float32:   # (another dtype's min is not that of its float32 copy)
        counts["scale_min"], counts["scale_max"] = out.smin, out.smax
    return counts


# ---- fresh outputs on transparent huge pages ----------------------------------------------------------------------
# Every quantize returns a new tensor; a fresh 64 MiB buffer costs 16384 first-touch page faults (here: a clone of
# 16M floats 5x slower than a copy into an existing tensor). madvise(MADV_HUGEPAGE) before the first write asks
# Linux for 2 MiB pages (32 faults), where THP is "madvise" or "always"; elsewhere it is a no-op. Contents and
# ownership are untouched: the tensor is torch's own allocation, freed by torch.
_HUGE_MIN_BYTES = 4 << 20
_MADV_HUGEPAGE = 14
_madvise: list = []


def _empty(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype)`` on CPU, asked onto transparent huge pages when it is large (see above)."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes >= _HUGE_MIN_BYTES and sys.platform.startswith("linux"):
        if not _madvise:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _madvise.append(libc.madvise)
            except (OSError, AttributeError):
                _madvise.append(None)
        if _madvise[0] is not None:
            p = t.data_ptr()
            page = mmap.PAGESIZE
            start, end = (p + page - 1) // page * page, (p + nbytes) // page * page  # whole pages inside it
            _madvise[0](start, end - start, _MADV_HUGEPAGE)  # advice only: a failure changes nothing
    return t


def _give_up(error: Exception, generator: torch.Generator | None, saved: torch.Tensor | None) -> None:
    """A kernel failed to build: turn the fast path off for the process, put the generator back where the eager
    path expects it, and say so once. Returns None (the caller's "not applicable")."""
    _state["enabled"] = False
    if saved is not None:
        generator.set_state(saved)
    warnings.warn(f"lowprec: the compiled fast path failed to build ({type(error).__name__}); using the eager "
                  f"rounding from now on", RuntimeWarning, stacklevel=3)
    return None


def set_fast_path(enabled: bool, min_numel: int | None = None, min_numel_stochastic: int | None = None) -> None:
    """Turn the compiled fast path on or off for this process. ``min_numel``: the smallest tensor it takes (for
    stochastic rounding too unless ``min_numel_stochastic`` is given); None keeps the current sizes (defaults
    :data:`MIN_NUMEL`, :data:`MIN_NUMEL_STOCHASTIC`)."""
    for v in (min_numel, min_numel_stochastic):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
            raise ValueError(f"min_numel must be an integer >= 2, got {v!r}")
    _state["enabled"] = bool(enabled)
    if min_numel is not None:
        _state["min_numel"] = _state["min_numel_stochastic"] = min_numel
    if min_numel_stochastic is not None:
        _state["min_numel_stochastic"] = min_numel_stochastic


def fast_path_settings() -> tuple[bool, int, int]:
    """(enabled, min_numel, min_numel_stochastic): what :func:`set_fast_path` set (restore it with that call)."""
    return _state["enabled"], _state["min_numel"], _state["min_numel_stochastic"]


def fast_path_enabled() -> bool:
    """Whether :func:`fast_round` may run compiled kernels (see :func:`set_fast_path`)."""
    return _state["enabled"]


def _bits(v: float) -> int:
    """The float32 bit pattern of ``v`` (finite, >= 0) as a Python int."""
    return int(torch.tensor(v, dtype=torch.float32).view(torch.int32))


def fast_round_ok(fmt: Format, rounding: Rounding) -> bool:
    """Whether :func:`fast_round` has a kernel for ``fmt`` and ``rounding`` (module docstring)."""
    if fmt.kind != "float" or fmt.man_bits > 22:
        return False
    if rounding == Rounding.STOCHASTIC:
        return fmt.emin >= -126
    return fmt.emin - fmt.man_bits - 1 >= -126 and fmt.emax + 24 - fmt.man_bits <= 127


def _int_kernel(fmt: Format, rounding: Rounding, saturate: bool, flush: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Nearest / toward_zero on int32 bit patterns ``b`` -> int32 bit patterns of the result.

    At or above the smallest normal the grid keeps ``M`` of float32's 23 mantissa bits: nearest adds half an ulp
    less one plus the lowest kept bit of the significand (ties to even, as float addition breaks them: with M = 0
    that bit is the implicit 1; a carry moves into the next binade) and masks, toward_zero
    masks. Below it the grid is the fixed step ``2**(emin - M)``, a normal float32 (``emin - M - 1 >= -126``, see
    :func:`fast_round_ok`): the magnitude times ``2**(M - emin)`` (exact) is rounded to an integer (half to even,
    or truncated) and scaled back (exact), as the eager ``_subnormals_and_nan`` does."""
    m, emin, drop = fmt.man_bits, fmt.emin, 23 - fmt.man_bits
    lim = _bits(rounding_limit(fmt, rounding, saturate))
    max_b, min_normal_b = _bits(fmt.max), _bits(fmt.min_normal)
    up = 2.0 ** (m - emin)
    nearest = rounding == Rounding.NEAREST
    ov = overflow_value(fmt)
    over_b = _CANONICAL_NAN if ov != ov else (0x7F800000 if ov == float("inf") else max_b)
    inf_mask = inf_needs_mask(fmt, rounding) and not saturate
    keep, half_less_one = ~((1 << drop) - 1), (1 << (drop - 1)) - 1
    nan_b = _nan_bits(fmt, rounding)

    def kernel(b: torch.Tensor) -> torch.Tensor:
        sign = b & _INT_MIN
        mag = b & 0x7FFFFFFF
        a = torch.clamp(mag, max=lim)
        scaled = a.view(torch.float32) * up
        if nearest:
            odd = (a >> drop) & 1 if drop < 23 else 1  # no mantissa bits: the implicit bit, always 1
            t = (a + (odd + half_less_one)) & keep
            sub = torch.round(scaled)
        else:
            t = a & keep
            sub = torch.trunc(scaled)
        t = torch.where(a < min_normal_b, (sub * (1.0 / up)).view(torch.int32), t)
        if not saturate:
            over = t > max_b
            if inf_mask:
                over = over | (mag == 0x7F800000)
            t = torch.where(over, over_b, t)
        if flush:
            t = torch.where(t < min_normal_b, 0, t)
        return torch.where(mag > 0x7F800000, nan_b, t) | sign

    return kernel


def _stochastic_kernel(fmt: Format, saturate: bool, flush: bool,
                       rand_bits: int | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Stochastic rounding of float32 ``x`` with int32 random bits ``r`` (shaped like ``x``), the eager
    algorithm: magnitudes below the smallest normal are shifted up by it (a float add), the random bits are added
    to the bit pattern below the kept mantissa bits, the result truncated and shifted back."""
    m, drop, thr = fmt.man_bits, 23 - fmt.man_bits, fmt.min_normal
    nb = drop if rand_bits is None else min(rand_bits, drop)
    rmask = ((1 << nb) - 1) << (drop - nb)
    lim = rounding_limit(fmt, Rounding.STOCHASTIC, saturate)
    ov = overflow_value(fmt)
    inf_mask = inf_needs_mask(fmt, Rounding.STOCHASTIC) and not saturate

    def kernel(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        a = torch.clamp(x.abs(), max=lim)
        low = a < thr
        a2 = torch.where(low, a + thr, a)
        t = ((a2.view(torch.int32) + (r & rmask)) & ~((1 << drop) - 1)).view(torch.float32)
        q = torch.where(low, t - thr, t)
        if not saturate:
            over = q > fmt.max
            if inf_mask:
                over = over | (x.abs() == float("inf"))
            q = torch.where(over, ov, q)
        if flush:
            q = torch.where(q < fmt.min_normal, 0.0, q)
        q = torch.copysign(q, x)
        return torch.where(x != x, x, q)

    return kernel


def _into(kernel: Callable) -> Callable:
    """``kernel`` writing its (first) result into a given ``out`` (a fresh :func:`_empty` buffer): inductor stores
    straight into it, no buffer of its own; returns the kernel's other results."""
    def into(out: torch.Tensor, *args: torch.Tensor):
        r = kernel(*args)
        if isinstance(r, tuple):
            out.copy_(r[0])
            return r[1:]
        out.copy_(r)
        return None

    into.__name__ = kernel.__name__
    return into


def _compiled(key: tuple, kernel: Callable) -> Callable:
    """``torch.compile`` of ``kernel`` under its own code object (dynamo's recompile limit counts per code
    object, so each spec gets its own budget), dynamic length."""
    code = kernel.__code__.replace(co_name=f"lowprec_fast_{len(_cache)}")
    fn = types.FunctionType(code, kernel.__globals__, code.co_name, kernel.__defaults__, kernel.__closure__)
    return torch.compile(fn, fullgraph=True)  # the length is marked dynamic per call: constants stay baked in


def _dynamic(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``t`` with its size along ``dim`` marked dynamic (one graph for every length)."""
    torch._dynamo.mark_dynamic(t, dim)
    return t


def fast_round(x: torch.Tensor, fmt: Format, rounding: Rounding, *, saturate: bool = True,
               flush_subnormals: bool = False, rand_bits: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor | None:
    """``round_to_format(x, fmt, rounding, ...)`` by a native or compiled kernel, bit for bit, or None where the
    fast path does not apply (module docstring); ``x`` is float32."""
    if not _state["enabled"] or x.numel() < fast_min_numel():
        return None  # the common case on small tensors: out before any parsing (this runs on every quantize)
    fmt, rounding = get_format(fmt), Rounding.parse(rounding)
    sto = rounding == Rounding.STOCHASTIC
    if (torch.compiler.is_compiling() or x.dtype != torch.float32 or x.device.type != "cpu"
            or x.numel() < _min_native(sto) or not fast_round_ok(fmt, rounding)
            or _unsigned_nan_cast(fmt, rounding, saturate)):
        return None
    flat = x.detach().contiguous().view(-1)
    if sto:  # random bits drawn inside the native loop, where it is available
        out = _native_stochastic(flat, fmt, bool(saturate), bool(flush_subnormals), rand_bits, generator)
    else:
        out = _native_round(flat, fmt, rounding, bool(saturate), bool(flush_subnormals))
    if out is not None:
        return out.view(x.shape)
    if x.numel() < _state["min_numel_stochastic" if sto else "min_numel"]:
        return None
    key = (fmt, rounding, bool(saturate), bool(flush_subnormals), rand_bits if sto else None)
    fn = _cache.get(key)
    first = fn is None
    if first:
        if rounding == Rounding.STOCHASTIC:
            fn = _compiled(key, _into(_stochastic_kernel(fmt, saturate, flush_subnormals, rand_bits)))
        else:
            fn = _compiled(key, _into(_int_kernel(fmt, rounding, saturate, flush_subnormals)))
        _cache[key] = fn
    # the first call compiles; should that fail, the generator is put back so the eager path draws the same bits
    saved = generator.get_state() if first and generator is not None else None
    out = _empty(flat.shape, torch.float32)
    try:
        if rounding == Rounding.STOCHASTIC:
            rnd = _draw_bits(flat.shape, generator)
            fn(_dynamic(out), _dynamic(flat), _dynamic(rnd))
        else:
            fn(_dynamic(out.view(torch.int32)), _dynamic(flat.view(torch.int32)))
    except _compile_errors() as e:
        return _give_up(e, generator, saved)
    return out.view(x.shape)


def _unsigned_nan_cast(fmt: Format, rounding: Rounding, saturate: bool) -> bool:
    """True where the eager path rounds by torch's float8_e4m3fn cast without saturation (nearest onto e4m3): that
    cast turns an overflow and ±inf into a NaN without its sign, where the native and compiled kernels keep the
    sign. Those specs stay eager, so that quantize gives the same bits at every size, NaN signs included."""
    return rounding == Rounding.NEAREST and not saturate and torch_dtype(fmt) == torch.float8_e4m3fn


def fast_scaled_ok(s: QuantSpec) -> bool:
    """Whether :func:`fast_scaled` has a fused kernel for ``s``: a :func:`fast_round_ok` float format with ``emax``
    in [0, 126] under 1-D block scaling with E8M0 scales and the OCP floor rule (mxfp8, mxfp6, mxfp4) or with
    E4M3 scales (nvfp4), or under fp32 tensor scaling; any rounding (stochastic with the eager random bits); not
    a non-saturating e4m3 (:func:`_unsigned_nan_cast`)."""
    sc = s.scaling
    if (sc is None or not fast_round_ok(s.format, s.rounding) or not 0 <= s.format.emax <= 126
            or _unsigned_nan_cast(s.format, s.rounding, s.saturate)):
        return False
    if sc.mode == "block":
        return sc.block_rows == 1 and (
            sc.scale_format == "e4m3" or (sc.scale_format == "e8m0" and sc.scale_rounding == "floor"))
    return sc.mode == "tensor" and sc.scale_format == "fp32"


def _scaled_kernel(s: QuantSpec) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``v`` (groups x group length, float32; ``r``: random bits shaped like it, stochastic rounding only) ->
    (``round(v / scale) * scale``, scale): the eager path's scales (finite amax; E8M0 ``2**clamp(floor(log2 amax)
    - emax, -127, 127)`` from the amax's exponent field; E4M3 block scales times the fp32 tensor scale, whose zero
    scales zero their block; fp32 ``amax / max``, 1 where that is 0 or not finite), division, rounding, product."""
    fmt, sf = s.format, s.scaling.scale_format
    if s.rounding == Rounding.STOCHASTIC:
        sr = _stochastic_kernel(fmt, s.saturate, s.flush_subnormals, s.rand_bits)

        def round_(y: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
            return sr(y, r)
    else:
        int_round = _int_kernel(fmt, s.rounding, s.saturate, s.flush_subnormals)

        def round_(y: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
            return int_round(y.view(torch.int32)).view(torch.float32)

    def kernel(v: torch.Tensor, r: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a = v.abs()
        a = torch.where((a != a) | (a == float("inf")), 0.0, a)
        amax = a.amax(dim=-1, keepdim=True) if sf != "fp32" else a.amax().reshape(1, 1)
        if sf == "e8m0":  # amax >= 0: its exponent field; subnormal or zero amax gives -127 (emax >= 0)
            exp = torch.clamp((amax.view(torch.int32) >> 23) - (127 + fmt.emax), min=-127, max=127)
            scale = torch.where(exp == -127, 0x00400000, (exp + 127) << 23).view(torch.float32)
        elif sf == "e4m3":
            g = amax.amax() / (448.0 * fmt.max)
            g = torch.where((g > 0) & (g != float("inf")), g, 1.0)
            s_blk = torch.clamp((amax / fmt.max) / g, max=448.0).to(torch.float8_e4m3fn)
            scale = s_blk.to(torch.float32) * g
        else:
            sc = amax / fmt.max
            scale = torch.where((sc > 0) & (sc != float("inf")), sc, 1.0)
        if sf == "e4m3":
            el = round_(v / torch.where(scale == 0, 1.0, scale), r) * (scale != 0)
        else:
            el = round_(v / scale, r)
        return el * scale, scale

    return kernel


def native_scaled(v2: torch.Tensor, s: QuantSpec,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The native loop of :func:`fast_scaled` for contiguous float32 rows ``v2`` (one block a row, or one row for a
    tensor scale; ``s`` passing :func:`fast_scaled_ok`): (quantized rows, scales ``(rows, 1)``), or None where no
    native loop applies (see :func:`_native_mx`, :func:`_native_nv`, :func:`_native_tensor_scaled`)."""
    if s.scaling.mode == "block":
        return _native_mx(v2, s) if s.scaling.scale_format == "e8m0" else _native_nv(v2, s, generator)
    return _native_tensor_scaled(v2, s)


def _scaled_eligible(x: torch.Tensor, s: QuantSpec) -> bool:
    """:func:`fast_scaled`'s conditions on the settings, ``x`` (float32 on the CPU, large enough) and ``s``."""
    return (_state["enabled"] and not torch.compiler.is_compiling() and x.dtype == torch.float32
            and x.device.type == "cpu" and x.numel() >= _min_native(s.rounding == Rounding.STOCHASTIC)
            and fast_scaled_ok(s))


def native_scaled_ok(x: torch.Tensor, s: QuantSpec) -> bool:
    """Whether :func:`fast_scaled` may take ``x`` under ``s`` now to one of its native loops (the settings, size,
    dtype and device conditions; the loop itself may still decline)."""
    return _scaled_eligible(x, s) and _native_lib() is not None


def fast_state() -> tuple:
    """The fast-path settings now (for callers that cache a decision that depends on them)."""
    return _state["enabled"], _state["min_numel"], _state["min_numel_stochastic"], torch.get_num_threads()


def fast_scaled(x: torch.Tensor, s: QuantSpec, view: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The scale -> round -> unscale of ``quantize`` for ``view`` (``lowprec.scaling.to_scaling_view`` of float32
    ``x``) in one compiled graph (MX E8M0 blocks with nearest/toward_zero on one torch thread: one native pass),
    bit for bit: (the quantized view, its scale broadcastable to the view), or None where it does not apply
    (:func:`fast_scaled_ok`, size and device as for :func:`fast_round`). Stochastic rounding draws the random bits
    of the view from ``generator`` as the eager path does (the same words, natively where available)."""
    if not _scaled_eligible(x, s):
        return None
    sto = s.rounding == Rounding.STOCHASTIC
    block = s.scaling.mode == "block"
    v2 = _contiguous_view(view, x).view(-1, view.shape[-1] if block else view.numel())
    native = native_scaled(v2, s, generator)
    if native is not None:
        return native[0].view(view.shape), native[1].view((*view.shape[:-1], 1) if block else [1] * view.dim())
    if x.numel() < _state["min_numel_stochastic" if sto else "min_numel"]:
        return None
    key = ("scaled", s)
    fn = _cache.get(key)
    first = fn is None
    if first:
        fn = _cache[key] = _compiled(key, _into(_scaled_kernel(s)))
    d = 0 if block else 1
    saved = generator.get_state() if first and sto and generator is not None else None
    q = _empty(v2.shape, torch.float32)
    try:
        if sto:
            rnd = _draw_bits(v2.shape, generator)
            (scale,) = fn(_dynamic(q, d), _dynamic(v2, d), _dynamic(rnd, d))
        else:
            (scale,) = fn(_dynamic(q, d), _dynamic(v2, d))
    except _compile_errors() as e:
        return _give_up(e, generator, saved)
    if block:
        return q.view(view.shape), scale.view(*view.shape[:-1], 1)
    return q.view(view.shape), scale.view([1] * view.dim())
