// The SpMM row kernel, included by one translation unit per instruction set
// (spmm_cpu.cpp: baseline x86-64 / any CPU; spmm_cpu_avx2.cpp: compiled with -mavx2
// -mfma). The including file defines MTD_KERNEL_NS, a namespace name unique to that
// translation unit, so the same templates compiled with different flags never clash.
// (Nothing from the standard library is instantiated here: an inline std:: template
// compiled with -mavx2 could be picked by the linker for the baseline code as well.)
//
// What makes it fast (measured on the Diginetica graph, 42,884 nodes, 762,502 nonzeros,
// d = 100, float32, one thread of a 2-core AMD EPYC, CPU time):
//   - software prefetch of the X rows kPrefetchDistance nonzeros ahead: the product is a gather of
//     random 400-byte rows, latency-bound without it (AVX2: 23 ms -> 14 ms);
//   - two nonzeros per step, so each Y vector is loaded and stored once per pair
//     (13-14 ms; torch's CSR @ dense took 27 ms in the same conditions);
//   - the normalization folded into the per-nonzero weight (row scale * value * column
//     scale): no normalized value array, and for a binary graph no value array at all.
// Tried and dropped: register tiles over the feature dimension (accumulators kept in
// registers across a row's neighbours) ran 2-3x slower than this without prefetch and
// only tied it with prefetch; an AVX-512 build was 10-20 % slower than AVX2 on that CPU.

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "spmm_cpu.h"

namespace mtd_fast {
namespace cpu {
namespace MTD_KERNEL_NS {

// Row range [r0, r1) of part k of `parts`, balancing nnz + rows (degrees are heavily
// skewed in item graphs, so equal row counts would leave threads idle).
template <typename P>
inline int64_t split_point(const P* indptr, int64_t n, int64_t k, int64_t parts) {
  if (k <= 0) return 0;
  if (k >= parts) return n;
  const int64_t total = static_cast<int64_t>(indptr[n]) + n;
  const int64_t target = total / parts * k + total % parts * k / parts;  // total * k / parts, no overflow
  int64_t lo = 0, hi = n;  // smallest r with indptr[r] + r >= target
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(indptr[mid]) + mid < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// How many nonzeros ahead to prefetch X rows: far enough to cover memory latency at
// ~15 ns per nonzero, near enough that the lines are still in L1/L2 when used
// (2, 4, 8, 16 measured: 16 best, 8 within 10 %).
constexpr int64_t kPrefetchDistance = 16;
constexpr int64_t kChunksPerThread = 8;

inline void prefetch_row(const void* p, int64_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const char* q = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(q + o, 0, 3);
  __builtin_prefetch(q + bytes - 1, 0, 3);  // the last line when the row is not line-aligned
#else
  (void)p;
  (void)bytes;
#endif
}

// Rows [r0, r1) of Y. Returns false if it skipped an index outside [0, n_cols).
template <typename T, typename P, typename I, bool HV, bool HC>
bool rows(int64_t r0, int64_t r1, const P* __restrict indptr, const I* __restrict idx,
          const T* __restrict vals, const T* __restrict rs, const T* __restrict cs,
          const T* __restrict x, T* __restrict y, int64_t d, int64_t n_cols) {
  const int64_t pend = static_cast<int64_t>(indptr[r1]);  // prefetch inside this range only
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  const uint64_t ncols = static_cast<uint64_t>(n_cols);  // negative indices wrap to huge
  bool ok = true;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = static_cast<int64_t>(indptr[r]), e = static_cast<int64_t>(indptr[r + 1]);
    T* __restrict yr = y + r * d;
    const T sr = rs ? rs[r] : T(1);
    for (int64_t k = 0; k < d; ++k) yr[k] = T(0);
    int64_t p = b;
    for (; p + 1 < e; p += 2) {
      // prefetching a wild address is harmless: prefetches never fault
      if (p + kPrefetchDistance + 1 < pend) {
        prefetch_row(x + static_cast<int64_t>(idx[p + kPrefetchDistance]) * d, row_bytes);
        prefetch_row(x + static_cast<int64_t>(idx[p + kPrefetchDistance + 1]) * d, row_bytes);
      }
      const int64_t c0 = static_cast<int64_t>(idx[p]), c1 = static_cast<int64_t>(idx[p + 1]);
      if (static_cast<uint64_t>(c0) >= ncols || static_cast<uint64_t>(c1) >= ncols) {
        ok = false;
        continue;
      }
      T w0 = sr, w1 = sr;
      if (HV) { w0 *= vals[p]; w1 *= vals[p + 1]; }
      if (HC) { w0 *= cs[c0]; w1 *= cs[c1]; }
      const T* __restrict x0 = x + c0 * d;
      const T* __restrict x1 = x + c1 * d;
      for (int64_t k = 0; k < d; ++k) yr[k] += w0 * x0[k] + w1 * x1[k];
    }
    if (p < e) {
      const int64_t c = static_cast<int64_t>(idx[p]);
      if (static_cast<uint64_t>(c) >= ncols) {
        ok = false;
        continue;
      }
      T w = sr;
      if (HV) w *= vals[p];
      if (HC) w *= cs[c];
      const T* __restrict xr = x + c * d;
      for (int64_t k = 0; k < d; ++k) yr[k] += w * xr[k];
    }
  }
  return ok;
}

template <typename T, typename P, typename I, bool HV, bool HC>
bool run_typed(const SpmmArgs& a) {
  const P* indptr = static_cast<const P*>(a.indptr);
  const I* idx = static_cast<const I*>(a.indices);
  const T* vals = static_cast<const T*>(a.values);
  const T* rs = static_cast<const T*>(a.row_scale);
  const T* cs = static_cast<const T*>(a.col_scale);
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.out);
  const int64_t n = a.n_rows, d = a.dim;
  if (n == 0) return true;
  if (d == 0) {  // nothing to compute, but the indices must still be valid
    const uint64_t ncols = static_cast<uint64_t>(a.n_cols);
    const int64_t nnz = static_cast<int64_t>(indptr[n]);
    for (int64_t p = 0; p < nnz; ++p)
      if (static_cast<uint64_t>(static_cast<int64_t>(idx[p])) >= ncols) return false;
    return true;
  }
  const int64_t nnz = static_cast<int64_t>(indptr[n]);
  int nt = a.num_threads < 1 ? 1 : a.num_threads;
  // below ~64k multiply-adds a thread team costs more than it saves
  if ((nnz + n) * d < (int64_t(1) << 16)) nt = 1;
#ifdef _OPENMP
  if (nt > 1) {
    // kChunksPerThread chunks of equal nnz + rows per thread, handed out dynamically: on a
    // shared machine a descheduled thread would otherwise hold the whole team at the
    // barrier (2 threads at a load of 6 on 2 cores, Diginetica d = 100: best 63 -> 46 ms,
    // median 70 -> 65 ms against one static half per thread).
    const int64_t want = static_cast<int64_t>(nt) * kChunksPerThread;
    const int64_t chunks = n < want ? n : want;
    int bad = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) reduction(| : bad)
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t r0 = split_point(indptr, n, k, chunks), r1 = split_point(indptr, n, k + 1, chunks);
      bad |= rows<T, P, I, HV, HC>(r0, r1, indptr, idx, vals, rs, cs, x, y, d, a.n_cols) ? 0 : 1;
    }
    return bad == 0;
  }
#endif
  return rows<T, P, I, HV, HC>(0, n, indptr, idx, vals, rs, cs, x, y, d, a.n_cols);
}

template <typename T, typename P, typename I>
bool run_flags(const SpmmArgs& a) {
  const bool hv = a.values != nullptr, hc = a.col_scale != nullptr;
  if (hv && hc) return run_typed<T, P, I, true, true>(a);
  if (hv) return run_typed<T, P, I, true, false>(a);
  if (hc) return run_typed<T, P, I, false, true>(a);
  return run_typed<T, P, I, false, false>(a);
}

template <typename T>
bool run_index(const SpmmArgs& a) {
  if (a.indptr_i64) {
    return a.indices_i64 ? run_flags<T, int64_t, int64_t>(a) : run_flags<T, int64_t, int32_t>(a);
  }
  return a.indices_i64 ? run_flags<T, int32_t, int64_t>(a) : run_flags<T, int32_t, int32_t>(a);
}

inline bool run(const SpmmArgs& a) { return a.f64 ? run_index<double>(a) : run_index<float>(a); }

}  // namespace MTD_KERNEL_NS
}  // namespace cpu
}  // namespace mtd_fast
