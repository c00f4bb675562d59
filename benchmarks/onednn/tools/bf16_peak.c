/* Single-core instruction throughput: vfmadd231ps zmm (f32 FMA) vs vdpbf16ps zmm (AVX512-BF16 dot product).
   Interleaved, best of N rounds, so that a background load affects both the same way.
   gcc -O2 -mavx512f -mavx512bf16 tools/bf16_peak.c -o /tmp/bf16_peak && /tmp/bf16_peak
   FLOP per instruction: FMA zmm = 16 lanes x 2 = 32; vdpbf16ps zmm = 16 lanes x 2 pairs x 2 = 64. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#ifndef ACC
#define ACC 12
#endif
#define ITERS 20000000L

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

__attribute__((noinline)) static float run_fma(long n) {
  __m512 acc[ACC], a = _mm512_set1_ps(1e-7f), b = _mm512_set1_ps(1.0f);
  for (int i = 0; i < ACC; i++) acc[i] = _mm512_set1_ps((float)i);
  for (long k = 0; k < n; k++) {
#pragma GCC unroll 32
    for (int i = 0; i < ACC; i++) acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
    __asm__ volatile("" : "+v"(a));
  }
  __m512 s = acc[0];
  for (int i = 1; i < ACC; i++) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

__attribute__((noinline)) static float run_dpbf16(long n) {
  __m512 acc[ACC];
  __m512bh a = (__m512bh)_mm512_set1_epi16(0x3400), b = (__m512bh)_mm512_set1_epi16(0x3f80);
  for (int i = 0; i < ACC; i++) acc[i] = _mm512_set1_ps((float)i);
  for (long k = 0; k < n; k++) {
#pragma GCC unroll 32
    for (int i = 0; i < ACC; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));
  }
  __m512 s = acc[0];
  for (int i = 1; i < ACC; i++) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

int main(void) {
  double best_f = 1e30, best_b = 1e30;
  float sink = 0;
  for (int r = 0; r < 7; r++) {
    double t0 = now();
    sink += run_fma(ITERS);
    double t1 = now();
    sink += run_dpbf16(ITERS);
    double t2 = now();
    if (t1 - t0 < best_f) best_f = t1 - t0;
    if (t2 - t1 < best_b) best_b = t2 - t1;
  }
  double n = (double)ITERS * ACC;
  printf("{\"fma_f32_instr_per_ns\": %.3f, \"dpbf16_instr_per_ns\": %.3f, \"fma_f32_gflops_1core\": %.1f, "
         "\"dpbf16_gflops_1core\": %.1f, \"bf16_over_f32\": %.2f, \"sink\": %g}\n",
         n / best_f * 1e-9, n / best_b * 1e-9, 32 * n / best_f * 1e-9, 64 * n / best_b * 1e-9,
         (64 * n / best_b) / (32 * n / best_f), sink);
  return 0;
}
