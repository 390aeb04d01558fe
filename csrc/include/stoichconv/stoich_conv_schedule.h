// The reduction schedule of the stoich conv's CSR rows: how the incidences of
// one row are split into partial sums and in which order those are combined.
// Shared by the CUDA kernels (csrc/cuda/stoich_conv_kernels.cu, which follow it
// for every row of both stages, both backward reductions and the degree norms)
// and the host (stoichconv._C._stoich_row_splits returns it to the CPU tests).
//
// The schedule of a row depends on its length (number of incidences) only:
// never on the vector width the launcher picks from pointer alignment, the
// number of heads or channels, the batch size, the samples or other rows a
// block handles, or the layout (shared topology or compacted).  So a row's
// result is bitwise the same whatever the storage offset of the inputs and
// however rows are packed into blocks (review findings 7 and 3).
//
// Order for a row of L incidences (positions i = 0 .. L-1 of the CSR row) and
// P = stoich_row_splits(L):
//   part[p] = sum over i = p, p + P, p + 2P, ... < L, in increasing i (from 0)
//   total   = ((part[0] + part[1]) + part[2]) + ... + part[P-1]
// then, per output row, total * scale (+ init), as documented by each kernel.
// P = 1 is the plain sequential sum of the CPU kernels.
#pragma once

#include <stdint.h>

#include "stoichconv/macros.h"

namespace stoichconv {

// Rows of at most this many incidences are summed by one thread (P = 1): the
// short rows of yeast-GEM (2-8 incidences) and of the compacted layout.
constexpr int64_t kScheduleSerialRow = 16;
// Target incidences per split of a longer row, and the most splits of a row.
constexpr int64_t kScheduleTargetPerSplit = 8;
constexpr int kScheduleMaxSplits = 16;

// The number of partial sums P of a CSR row of `row_length` incidences: 1 for
// rows of at most kScheduleSerialRow, else the smallest power of two >=
// ceil(row_length / kScheduleTargetPerSplit), clamped to [2, kScheduleMaxSplits].
SC_INLINE int stoich_row_splits(int64_t row_length) {
  if (row_length <= kScheduleSerialRow) return 1;
  const int64_t want = (row_length + kScheduleTargetPerSplit - 1) / kScheduleTargetPerSplit;
  int p = 2;
  while (p < kScheduleMaxSplits && p < want) p <<= 1;
  return p;
}

// The split that position i of a row with P splits goes to.
SC_INLINE int stoich_row_split_of(int64_t position, int splits) {
  return int(position % splits);
}

}  // namespace stoichconv
