// The SpMM kernel compiled with -mavx2 -mfma (CMake adds the flags to this file only);
// `spmm_cpu.cpp` calls it only after checking that the CPU supports both.
#define MTD_KERNEL_NS avx2
#include "spmm_kernel.inl"

namespace mtd_fast {
namespace cpu {
bool spmm_avx2(const SpmmArgs& args) { return avx2::run(args); }
}  // namespace cpu
}  // namespace mtd_fast
