// pybind11 bindings of the SpMM extension (module mtd_fast._spmm_cpp).
//
// Buffers come in as NumPy arrays (the Python wrapper passes torch tensors as zero-copy
// `.numpy()` views), so nothing here needs torch at build time. Every entry point checks
// its inputs before touching memory and raises TypeError (wrong dtype or type) or
// ValueError (layout, shape, range, monotonicity, degree) with a message naming the
// broken constraint: bad input must raise, never crash. Checks run with the GIL held;
// the kernels run with it released.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/spmm_cpu.h"

namespace py = pybind11;
using mtd_fast::cpu::SpmmArgs;
using mtd_fast::cpu::TransposeArgs;

namespace {

[[noreturn]] void fail_type(const std::string& op, const std::string& msg) { throw py::type_error(op + ": " + msg); }
[[noreturn]] void fail_value(const std::string& op, const std::string& msg) { throw py::value_error(op + ": " + msg); }

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

std::string strides_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.strides(i);
  s << ")";
  return s.str();
}

template <typename T>
bool is(const py::array& a) { return a.dtype().equal(py::dtype::of<T>()); }

py::array as_array(const std::string& op, const py::object& obj, const char* name) {
  if (!py::isinstance<py::array>(obj))
    fail_type(op, std::string(name) + " must be a NumPy array, got " + py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  return py::reinterpret_borrow<py::array>(obj);
}

void check_layout(const std::string& op, const py::array& a, const char* name, py::ssize_t ndim) {
  if (a.ndim() != ndim)
    fail_value(op, std::string(name) + " must be " + std::to_string(ndim) + "-D, got shape " + shape_str(a));
  if (!(a.flags() & py::array::c_style))
    fail_value(op, std::string(name) + " must be C-contiguous (row-major, no gaps), got shape " + shape_str(a) +
                       " with byte strides " + strides_str(a) + "; pass a contiguous copy");
  if (reinterpret_cast<std::uintptr_t>(a.data()) % static_cast<std::uintptr_t>(a.itemsize()) != 0)
    fail_value(op, std::string(name) + " must be aligned to its item size");
}

// An index array (indptr or indices): int32 or int64, 1-D, contiguous. Returns is-int64.
bool check_index(const std::string& op, const py::array& a, const char* name) {
  if (!is<int32_t>(a) && !is<int64_t>(a)) fail_type(op, std::string(name) + " must be int32 or int64, got " + dtype_name(a));
  check_layout(op, a, name, 1);
  return is<int64_t>(a);
}

template <typename P>
int64_t at(const void* p, int64_t i) { return static_cast<int64_t>(static_cast<const P*>(p)[i]); }

struct Csr {
  const void* indptr;
  bool p64;
  const void* indices;
  bool i64;
  int64_t n_rows;
  int64_t nnz;
  int64_t ptr(int64_t i) const { return p64 ? at<int64_t>(indptr, i) : at<int32_t>(indptr, i); }
};

template <typename P>
int64_t first_non_monotone(const P* ptr, int64_t n) {
  // smallest r with ptr[r + 1] < ptr[r], or n when none
  int64_t bad = n;
#ifdef _OPENMP
#pragma omp parallel for reduction(min : bad) if (n > (1 << 16))
#endif
  for (int64_t r = 0; r < n; ++r)
    if (ptr[r + 1] < ptr[r] && r < bad) bad = r;
  return bad;
}

template <typename I>
int64_t first_out_of_range(const I* idx, int64_t nnz, int64_t n_cols) {
  int64_t bad = nnz;
#ifdef _OPENMP
#pragma omp parallel for reduction(min : bad) if (nnz > (1 << 16))
#endif
  for (int64_t p = 0; p < nnz; ++p) {
    const int64_t c = static_cast<int64_t>(idx[p]);
    if ((c < 0 || c >= n_cols) && p < bad) bad = p;
  }
  return bad;
}

[[noreturn]] void fail_index(const std::string& op, const Csr& c, int64_t p, int64_t n_cols) {
  const int64_t v = c.i64 ? at<int64_t>(c.indices, p) : at<int32_t>(c.indices, p);
  fail_value(op, "indices out of range: indices[" + std::to_string(p) + "] = " + std::to_string(v) +
                     " is not in [0, " + std::to_string(n_cols) + ")");
}

void check_indices_in_range(const std::string& op, const Csr& c, int64_t n_cols) {
  const int64_t p = c.i64 ? first_out_of_range(static_cast<const int64_t*>(c.indices), c.nnz, n_cols)
                          : first_out_of_range(static_cast<const int32_t*>(c.indices), c.nnz, n_cols);
  if (p < c.nnz) fail_index(op, c, p, n_cols);
}

// Structure of a CSR with n_cols columns: index dtypes and layout, indptr[0] == 0,
// indptr[-1] == nnz, indptr monotone, and (when check_indices) 0 <= indices < n_cols.
// The products pass check_indices = false: their kernel checks each index as it reads
// it, which saves a pass over the indices (about 0.5 ms a call on Diginetica).
Csr check_csr(const std::string& op, const py::array& indptr, const py::array& indices, int64_t n_cols_or_neg,
              bool check_indices = true) {
  Csr c{};
  c.p64 = check_index(op, indptr, "indptr");
  c.i64 = check_index(op, indices, "indices");
  if (indptr.shape(0) < 1) fail_value(op, "indptr must have n_rows + 1 >= 1 entries, got shape " + shape_str(indptr));
  c.indptr = indptr.data();
  c.indices = indices.data();
  c.n_rows = indptr.shape(0) - 1;
  c.nnz = indices.shape(0);
  const int64_t n_cols = n_cols_or_neg < 0 ? c.n_rows : n_cols_or_neg;
  if (c.ptr(0) != 0) fail_value(op, "indptr[0] must be 0, got " + std::to_string(c.ptr(0)));
  if (c.ptr(c.n_rows) != c.nnz)
    fail_value(op, "indptr[-1] = " + std::to_string(c.ptr(c.n_rows)) + " must equal nnz = len(indices) = " +
                       std::to_string(c.nnz));
  const int64_t r = c.p64 ? first_non_monotone(static_cast<const int64_t*>(c.indptr), c.n_rows)
                          : first_non_monotone(static_cast<const int32_t*>(c.indptr), c.n_rows);
  if (r < c.n_rows)
    fail_value(op, "indptr must be non-decreasing (monotone), but indptr[" + std::to_string(r) + "] = " +
                       std::to_string(c.ptr(r)) + " > indptr[" + std::to_string(r + 1) + "] = " + std::to_string(c.ptr(r + 1)));
  if (check_indices) check_indices_in_range(op, c, n_cols);
  return c;
}

// x: float32/float64, 2-D, contiguous, x.shape[0] == n_cols. Returns is-float64.
bool check_x(const std::string& op, const py::array& x, int64_t n_cols) {
  if (!is<float>(x) && !is<double>(x)) fail_type(op, "x must be float32 or float64, got " + dtype_name(x));
  check_layout(op, x, "x", 2);
  if (x.shape(0) != n_cols)
    fail_value(op, "x must have shape (n_cols, dim) = (" + std::to_string(n_cols) + ", dim) to match the CSR, got " +
                       shape_str(x));
  return is<double>(x);
}

// values: None, or same dtype as x, 1-D (nnz,), contiguous.
const void* check_values(const std::string& op, const py::object& obj, const py::array& x, int64_t nnz) {
  if (obj.is_none()) return nullptr;
  py::array v = as_array(op, obj, "values");
  if (!v.dtype().equal(x.dtype()))
    fail_type(op, "values must have the dtype of x (" + dtype_name(x) + "), got " + dtype_name(v));
  check_layout(op, v, "values", 1);
  if (v.shape(0) != nnz)
    fail_value(op, "values must have shape (nnz,) = (" + std::to_string(nnz) + ",), got " + shape_str(v));
  return v.data();
}

bool overlaps(const py::array& a, const py::array& b) {
  const char* a0 = static_cast<const char*>(a.data());
  const char* b0 = static_cast<const char*>(b.data());
  const char* a1 = a0 + a.nbytes();
  const char* b1 = b0 + b.nbytes();
  return a.nbytes() > 0 && b.nbytes() > 0 && a0 < b1 && b0 < a1;
}

// out: None (allocate) or writeable, (n_rows, dim), dtype of x, contiguous, disjoint from x.
py::array prepare_out(const std::string& op, const py::object& obj, const py::array& x, int64_t n_rows,
                      const py::object& values) {
  const int64_t d = x.shape(1);
  if (obj.is_none()) return py::array(x.dtype(), std::vector<py::ssize_t>{n_rows, d});
  py::array out = as_array(op, obj, "out");
  if (!out.dtype().equal(x.dtype())) fail_type(op, "out must have the dtype of x (" + dtype_name(x) + "), got " + dtype_name(out));
  check_layout(op, out, "out", 2);
  if (out.shape(0) != n_rows || out.shape(1) != d)
    fail_value(op, "out must have shape (n_rows, dim) = (" + std::to_string(n_rows) + ", " + std::to_string(d) +
                       "), got " + shape_str(out));
  if (!out.writeable()) fail_value(op, "out must be writeable");
  if (overlaps(out, x)) fail_value(op, "out must not overlap x (the product cannot run in place)");
  if (!values.is_none() && overlaps(out, py::reinterpret_borrow<py::array>(values)))
    fail_value(op, "out must not overlap values");
  return out;
}

int resolve_threads(int num_threads) {
#ifdef _OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

template <typename T, typename D>
void make_scales(const D* deg, int64_t n, bool sqrt_, std::vector<T>& out) {
  out.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const double g = static_cast<double>(deg[i]);
    // entries of zero-degree nodes are never used (checked by the caller)
    out[static_cast<size_t>(i)] = g > 0 ? static_cast<T>(sqrt_ ? 1.0 / std::sqrt(g) : 1.0 / g) : T(0);
  }
}

template <typename D, typename I>
void check_degrees_typed(const std::string& op, const std::string& norm, const D* deg, const Csr& c, bool rows,
                         bool cols) {
  // A degree is divided by when its row has entries (rows) or its column is referenced
  // (cols). Common case first: every degree positive is one O(N) pass, and then neither
  // the rows nor the O(nnz) column scan is needed (that scan cost ~2 ms a call on the
  // Diginetica graph, 15 % of the product).
  const int64_t n = c.n_rows;
  int64_t first_bad = n;
  for (int64_t i = 0; i < n; ++i)
    if (!(deg[i] > 0)) { first_bad = i; break; }
  if (first_bad == n) return;
  int64_t bad = std::numeric_limits<int64_t>::max();
  if (rows) {
    for (int64_t r = first_bad; r < n; ++r) {
      if (c.ptr(r + 1) > c.ptr(r) && !(deg[r] > 0)) { bad = r; break; }
    }
  }
  if (cols) {
    check_indices_in_range(op, c, n);  // deg[indices[p]] below must be in bounds
    const I* idx = static_cast<const I*>(c.indices);
    const int64_t nnz = c.nnz;
    int64_t badc = bad;
#ifdef _OPENMP
#pragma omp parallel for reduction(min : badc) if (nnz > (1 << 16))
#endif
    for (int64_t p = 0; p < nnz; ++p) {
      const int64_t j = static_cast<int64_t>(idx[p]);
      if (!(deg[j] > 0) && j < badc) badc = j;
    }
    bad = badc;
  }
  if (bad != std::numeric_limits<int64_t>::max()) {
    std::ostringstream s;
    s << "degrees[" << bad << "] = " << static_cast<double>(deg[bad]) << " must be > 0: norm='" << norm
      << "' divides by the degree of node " << bad << " (every degree of a row with entries"
      << (cols ? " and of a referenced column" : "") << " must be positive)";
    fail_value(op, s.str());
  }
}

// Run the product without the GIL; if the kernel met an index out of range, name the first.
void run_checked(const std::string& op, const SpmmArgs& a, const Csr& c) {
  bool ok;
  {
    py::gil_scoped_release nogil;
    ok = mtd_fast::cpu::spmm(a);
  }
  if (!ok) {
    check_indices_in_range(op, c, a.n_cols);
    fail_value(op, "indices out of range");  // not reached: the scan above finds it
  }
}

// The kernel's arguments for the checked CSR `c` times x (n_cols rows) into out.
SpmmArgs spmm_args(const Csr& c, const void* vals, const py::array& x, py::array& out, int64_t n_cols, bool f64,
                   int num_threads) {
  SpmmArgs a;
  a.indptr = c.indptr;
  a.indptr_i64 = c.p64;
  a.indices = c.indices;
  a.indices_i64 = c.i64;
  a.values = vals;
  a.x = x.data();
  a.out = out.mutable_data();
  a.n_rows = c.n_rows;
  a.n_cols = n_cols;
  a.dim = x.shape(1);
  a.f64 = f64;
  a.num_threads = resolve_threads(num_threads);
  return a;
}

py::object spmm_norm(const py::object& indptr_o, const py::object& indices_o, const py::object& values_o,
                     const py::object& degrees_o, const py::object& x_o, const py::object& out_o, const std::string& norm,
                     bool transposed, int num_threads) {
  const std::string op = "spmm";
  if (norm != "sym" && norm != "mean" && norm != "none")
    fail_value(op, "unknown norm '" + norm + "': use 'sym', 'mean' or 'none'");
  py::array indptr = as_array(op, indptr_o, "indptr");
  py::array indices = as_array(op, indices_o, "indices");
  py::array x = as_array(op, x_o, "x");
  const Csr c = check_csr(op, indptr, indices, -1, false);  // square: n_cols == n_rows
  const bool f64 = check_x(op, x, c.n_rows);
  const void* vals = check_values(op, values_o, x, c.nnz);
  std::vector<float> sf;
  std::vector<double> sd;
  if (norm != "none") {
    if (degrees_o.is_none()) fail_value(op, "degrees is required for norm='" + norm + "'");
    py::array deg = as_array(op, degrees_o, "degrees");
    if (!is<float>(deg) && !is<double>(deg)) fail_type(op, "degrees must be float32 or float64, got " + dtype_name(deg));
    check_layout(op, deg, "degrees", 1);
    if (deg.shape(0) != c.n_rows)
      fail_value(op, "degrees must have shape (n_rows,) = (" + std::to_string(c.n_rows) + ",), got " + shape_str(deg));
    // sym scales rows and columns; mean scales rows, or columns on the transposed CSR
    const bool sym = norm == "sym";
    const bool rows = sym || !transposed, cols = sym || transposed;
    if (is<float>(deg)) {
      const float* g = static_cast<const float*>(deg.data());
      if (c.i64) check_degrees_typed<float, int64_t>(op, norm, g, c, rows, cols);
      else check_degrees_typed<float, int32_t>(op, norm, g, c, rows, cols);
      if (f64) make_scales(g, c.n_rows, sym, sd); else make_scales(g, c.n_rows, sym, sf);
    } else {
      const double* g = static_cast<const double*>(deg.data());
      if (c.i64) check_degrees_typed<double, int64_t>(op, norm, g, c, rows, cols);
      else check_degrees_typed<double, int32_t>(op, norm, g, c, rows, cols);
      if (f64) make_scales(g, c.n_rows, sym, sd); else make_scales(g, c.n_rows, sym, sf);
    }
  } else if (!degrees_o.is_none()) {
    as_array(op, degrees_o, "degrees");  // unused for norm='none', but must still be an array
  }
  py::array out = prepare_out(op, out_o, x, c.n_rows, values_o);

  SpmmArgs a = spmm_args(c, vals, x, out, c.n_rows, f64, num_threads);
  if (norm != "none") {
    const void* s = f64 ? static_cast<const void*>(sd.data()) : static_cast<const void*>(sf.data());
    const bool sym = norm == "sym";
    a.row_scale = (sym || !transposed) ? s : nullptr;
    a.col_scale = (sym || transposed) ? s : nullptr;
  }
  run_checked(op, a, c);
  return std::move(out);
}

py::object csr_spmm(const py::object& indptr_o, const py::object& indices_o, const py::object& values_o,
                    const py::object& x_o, const py::object& out_o, int num_threads) {
  const std::string op = "csr_spmm";
  py::array indptr = as_array(op, indptr_o, "indptr");
  py::array indices = as_array(op, indices_o, "indices");
  py::array x = as_array(op, x_o, "x");
  if (!is<float>(x) && !is<double>(x)) fail_type(op, "x must be float32 or float64, got " + dtype_name(x));
  check_layout(op, x, "x", 2);
  const Csr c = check_csr(op, indptr, indices, x.shape(0), false);  // n_cols is x's row count
  const bool f64 = check_x(op, x, x.shape(0));
  const void* vals = check_values(op, values_o, x, c.nnz);
  py::array out = prepare_out(op, out_o, x, c.n_rows, values_o);
  SpmmArgs a = spmm_args(c, vals, x, out, x.shape(0), f64, num_threads);
  run_checked(op, a, c);
  return std::move(out);
}

py::tuple csr_transpose(const py::object& indptr_o, const py::object& indices_o, const py::object& values_o,
                        int64_t n_cols) {
  const std::string op = "csr_transpose";
  if (n_cols < 0) fail_value(op, "n_cols must be >= 0, got " + std::to_string(n_cols));
  py::array indptr = as_array(op, indptr_o, "indptr");
  py::array indices = as_array(op, indices_o, "indices");
  const Csr c = check_csr(op, indptr, indices, n_cols);
  if (!c.i64 && c.n_rows > std::numeric_limits<int32_t>::max())
    fail_value(op, "int32 indices cannot hold the row numbers of " + std::to_string(c.n_rows) + " rows");
  py::object out_vals = py::none();
  const void* vals = nullptr;
  int vbytes = 4;
  if (!values_o.is_none()) {
    py::array v = as_array(op, values_o, "values");
    if (!is<float>(v) && !is<double>(v)) fail_type(op, "values must be float32 or float64, got " + dtype_name(v));
    check_layout(op, v, "values", 1);
    if (v.shape(0) != c.nnz)
      fail_value(op, "values must have shape (nnz,) = (" + std::to_string(c.nnz) + ",), got " + shape_str(v));
    vals = v.data();
    vbytes = static_cast<int>(v.itemsize());
    out_vals = py::array(v.dtype(), std::vector<py::ssize_t>{c.nnz});
  }
  py::array_t<int64_t> out_ptr(std::vector<py::ssize_t>{n_cols + 1});
  py::array out_idx(indices.dtype(), std::vector<py::ssize_t>{c.nnz});
  TransposeArgs a;
  a.indptr = c.indptr;
  a.indptr_i64 = c.p64;
  a.indices = c.indices;
  a.indices_i64 = c.i64;
  a.values = vals;
  a.value_bytes = vbytes;
  a.n_rows = c.n_rows;
  a.n_cols = n_cols;
  a.out_indptr = out_ptr.mutable_data();
  a.out_indices = out_idx.mutable_data();
  a.out_values = vals ? py::reinterpret_borrow<py::array>(out_vals).mutable_data() : nullptr;
  {
    py::gil_scoped_release nogil;
    mtd_fast::cpu::csr_transpose(a);
  }
  return py::make_tuple(out_ptr, out_idx, out_vals);
}

}  // namespace

PYBIND11_MODULE(_spmm_cpp, m) {
  m.doc() = "CPU SpMM kernels of mtd_fast over NumPy buffers (use mtd_fast.ops.spmm_cpp for torch tensors)";
  m.def("spmm_norm", &spmm_norm, py::arg("indptr"), py::arg("indices"), py::arg("values"), py::arg("degrees"),
        py::arg("x"), py::arg("out") = py::none(), py::arg("norm") = "sym", py::arg("transposed") = false,
        py::arg("num_threads") = 0,
        R"doc(Y = A_hat @ X for the normalized adjacency of the unnormalized square CSR (indptr, indices, values).

indptr (N+1,) and indices (nnz,) int32 or int64; values (nnz,) with x's dtype, or None (binary);
degrees (N,) float32/float64 row sums (unused for norm='none'); x (N, dim) float32/float64;
out: optional preallocated (N, dim) array of x's dtype (returned).
norm: 'sym' D^-1/2 A D^-1/2, 'mean' D^-1 A, 'none' A. transposed=True says the CSR holds A^T
of the matrix whose degrees are given and computes A_hat^T @ X (for 'mean': A^T D^-1 X).
num_threads <= 0: OpenMP default.)doc");
  m.def("csr_spmm", &csr_spmm, py::arg("indptr"), py::arg("indices"), py::arg("values"), py::arg("x"),
        py::arg("out") = py::none(), py::arg("num_threads") = 0,
        "Y = A @ X for a CSR A of shape (N, x.shape[0]); values None means binary.");
  m.def("csr_transpose", &csr_transpose, py::arg("indptr"), py::arg("indices"), py::arg("values"), py::arg("n_cols"),
        "(indptr int64 (n_cols+1,), indices (nnz,), values or None) of the transpose; indices sorted within rows.");
  m.def("has_openmp", &mtd_fast::cpu::has_openmp, "Whether the extension was built with OpenMP.");
  m.def("max_threads", &mtd_fast::cpu::max_threads, "OpenMP's default thread count (1 without OpenMP).");
  m.def("isa", &mtd_fast::cpu::spmm_isa, "Kernel variant in use: 'avx2' or 'baseline'.");
  m.def("isas", [] {
    py::list out;
    std::string s = mtd_fast::cpu::spmm_isas();
    size_t i = 0;
    while (i <= s.size()) {
      size_t j = s.find(',', i);
      if (j == std::string::npos) j = s.size();
      if (j > i) out.append(s.substr(i, j - i));
      i = j + 1;
    }
    return out;
  }, "Kernel variants usable on this CPU, widest first.");
  m.def("set_isa", [](const std::string& name) {
    if (!mtd_fast::cpu::set_spmm_isa(name.c_str()))
      throw py::value_error("set_isa: variant '" + name + "' is not usable here; usable: " + mtd_fast::cpu::spmm_isas());
  }, py::arg("name"), "Select the kernel variant ('auto' = widest usable); for tests and benches.");
}
