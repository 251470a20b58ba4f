// Baseline build of the SpMM kernel, the instruction-set dispatch, the CSR transpose
// and OpenMP queries.
#define MTD_KERNEL_NS baseline
#include "spmm_kernel.inl"

#include <cstring>
#include <string>
#include <vector>

namespace mtd_fast {
namespace cpu {

bool spmm_baseline(const SpmmArgs& args) { return baseline::run(args); }

namespace {

using Kernel = bool (*)(const SpmmArgs&);

struct Variant {
  const char* name;
  Kernel fn;
  bool usable;
};

bool cpu_has(const char* feature) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  // __builtin_cpu_supports needs a literal; map the few names used here
  if (std::strcmp(feature, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  (void)feature;
  return false;
}

std::vector<Variant>& variants() {
  static std::vector<Variant> v = [] {
    std::vector<Variant> out;
#ifdef MTD_FAST_HAVE_AVX2_TU
    out.push_back({"avx2", &spmm_avx2, cpu_has("avx2")});
#endif
    out.push_back({"baseline", &spmm_baseline, true});
    return out;
  }();
  return v;
}

const Variant* best() {
  for (const Variant& v : variants())
    if (v.usable) return &v;
  return &variants().back();
}

const Variant*& current() {
  static const Variant* cur = best();
  return cur;
}

}  // namespace

bool spmm(const SpmmArgs& args) { return current()->fn(args); }

const char* spmm_isa() { return current()->name; }

const char* spmm_isas() {
  static std::string names = [] {
    std::string s;
    for (const Variant& v : variants())
      if (v.usable) s += (s.empty() ? "" : ",") + std::string(v.name);
    return s;
  }();
  return names.c_str();
}

bool set_spmm_isa(const char* name) {
  if (std::strcmp(name, "auto") == 0) {
    current() = best();
    return true;
  }
  for (const Variant& v : variants()) {
    if (v.usable && std::strcmp(v.name, name) == 0) {
      current() = &v;
      return true;
    }
  }
  return false;
}

namespace {

template <typename P, typename I, typename V>
void transpose_typed(const TransposeArgs& a) {
  const P* indptr = static_cast<const P*>(a.indptr);
  const I* idx = static_cast<const I*>(a.indices);
  const V* vals = static_cast<const V*>(a.values);
  I* out_idx = static_cast<I*>(a.out_indices);
  V* out_vals = static_cast<V*>(a.out_values);
  int64_t* out_ptr = a.out_indptr;
  const int64_t n = a.n_rows, m = a.n_cols;
  const int64_t nnz = n > 0 ? static_cast<int64_t>(indptr[n]) : 0;
  // counting sort over columns; walking rows in order keeps each output row sorted.
  // Serial on purpose: it runs once per graph (the result is cached by the caller);
  // 825k nonzeros take a few milliseconds.
  std::memset(out_ptr, 0, sizeof(int64_t) * static_cast<size_t>(m + 1));
  for (int64_t p = 0; p < nnz; ++p) ++out_ptr[static_cast<int64_t>(idx[p]) + 1];
  for (int64_t c = 0; c < m; ++c) out_ptr[c + 1] += out_ptr[c];
  std::vector<int64_t> next(out_ptr, out_ptr + m);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t p = static_cast<int64_t>(indptr[r]); p < static_cast<int64_t>(indptr[r + 1]); ++p) {
      const int64_t c = static_cast<int64_t>(idx[p]);
      const int64_t q = next[c]++;
      out_idx[q] = static_cast<I>(r);
      if (vals) out_vals[q] = vals[p];
    }
  }
}

template <typename P, typename I>
void transpose_values(const TransposeArgs& a) {
  if (a.value_bytes == 8) transpose_typed<P, I, double>(a); else transpose_typed<P, I, float>(a);
}

}  // namespace

void csr_transpose(const TransposeArgs& a) {
  if (a.indptr_i64) {
    if (a.indices_i64) transpose_values<int64_t, int64_t>(a); else transpose_values<int64_t, int32_t>(a);
  } else {
    if (a.indices_i64) transpose_values<int32_t, int64_t>(a); else transpose_values<int32_t, int32_t>(a);
  }
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace cpu
}  // namespace mtd_fast
