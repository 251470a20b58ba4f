// CPU kernels of the mtd_fast SpMM extension: plain C++ over raw buffers, no Python,
// no torch. `csrc/spmm.cpp` validates every input before calling in here; these
// functions assume valid input (indices in range, indptr monotone, sizes consistent).
#pragma once

#include <cstdint>

namespace mtd_fast {
namespace cpu {

// Y (n_rows, dim) = diag(row_scale) * A * diag(col_scale) * X, A the CSR
// (indptr, indices, values). values == nullptr means every stored entry is 1 (binary);
// row_scale / col_scale == nullptr mean 1. values, scales, x and out share the scalar
// type (float when f64 is false, double otherwise). The normalized GCN products are
// all of this form, so no normalized value array is ever materialized:
//   sym:  row_scale = col_scale = D^-1/2;  mean: row_scale = D^-1;  none: neither;
//   mean on the transposed CSR (its backward): col_scale = D^-1.
struct SpmmArgs {
  const void* indptr = nullptr;  // (n_rows + 1,) int32 or int64
  bool indptr_i64 = true;
  const void* indices = nullptr;  // (nnz,) int32 or int64
  bool indices_i64 = false;
  const void* values = nullptr;  // (nnz,) or nullptr
  const void* row_scale = nullptr;  // (n_rows,) or nullptr
  const void* col_scale = nullptr;  // (n_cols,) or nullptr
  const void* x = nullptr;  // (n_cols, dim) row-major
  void* out = nullptr;  // (n_rows, dim) row-major, fully overwritten
  int64_t n_rows = 0;
  int64_t n_cols = 0;  // rows of x: indices outside [0, n_cols) are caught in the kernel
  int64_t dim = 0;
  bool f64 = false;
  int num_threads = 1;
};

// The kernel checks every index against [0, n_cols) as it reads it (one compare per
// nonzero, instead of a separate pass over the indices before the product) and skips the
// ones outside; it returns false when it met any, and the output is then unspecified.
// indptr must already be known monotone with indptr[0] == 0 and indptr[n_rows] == nnz.
//
// Runs the kernel variant selected by `set_spmm_isa` (by default the widest one that
// was compiled in and that this CPU supports: "avx2" or "baseline").
bool spmm(const SpmmArgs& args);

// Name of the variant `spmm` uses now.
const char* spmm_isa();
// Variants usable on this CPU, widest first, comma-separated.
const char* spmm_isas();
// Select a variant by name ("auto" = widest usable); false if it is not usable here.
// For tests (every variant must agree) and benches; not thread-safe against running spmm.
bool set_spmm_isa(const char* name);

// One variant per translation unit (compiled with different target flags).
bool spmm_baseline(const SpmmArgs& args);
#ifdef MTD_FAST_HAVE_AVX2_TU
bool spmm_avx2(const SpmmArgs& args);
#endif

// CSR transpose by a stable counting sort: the output rows are the input columns and
// indices within each output row come out ascending. out_indptr has n_cols + 1 int64
// entries; out_indices has the index type of the input; out_values (if values given)
// the value type (value_bytes = 4 or 8).
struct TransposeArgs {
  const void* indptr = nullptr;
  bool indptr_i64 = true;
  const void* indices = nullptr;
  bool indices_i64 = false;
  const void* values = nullptr;
  int value_bytes = 4;
  int64_t n_rows = 0;
  int64_t n_cols = 0;
  int64_t* out_indptr = nullptr;
  void* out_indices = nullptr;
  void* out_values = nullptr;
};
void csr_transpose(const TransposeArgs& args);

// Whether OpenMP was compiled in, and how many threads it would use by default.
bool has_openmp();
int max_threads();

}  // namespace cpu
}  // namespace mtd_fast
