// Value checks of a CSR row pointer, shared by the C++ CPU kernels that take a
// hand-made ordering (stoich conv plan, GATv2 edges, grouped softmax).
#pragma once

#include <ATen/ATen.h>

namespace stoichconv {

// ptr [rows + 1] must start at 0, end at `total` (called `total_name` in the
// message) and be non-decreasing, so that no row can index out of bounds.
inline void check_row_pointer(const char* op, const char* name, const int64_t* ptr, int64_t rows,
                              int64_t total, const char* total_name) {
  TORCH_CHECK(ptr[0] == 0 && ptr[rows] == total, op, ": `", name, "` must start at 0 and end at ",
              total_name, " = ", total);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(ptr[r] <= ptr[r + 1], op, ": `", name, "` must be non-decreasing");
}

}  // namespace stoichconv
