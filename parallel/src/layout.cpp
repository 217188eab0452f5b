#include "opensci/parallel/layout.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "opensci/error.hpp"

namespace opensci::parallel {

Range block(int64_t n, int64_t parts, int64_t part) {
  const int64_t base = n / parts, rem = n % parts;
  const int64_t begin = part * base + std::min(part, rem);
  return {begin, begin + base + (part < rem ? 1 : 0)};
}

int64_t block_of(int64_t n, int64_t parts, int64_t i) {
  for (int64_t p = 0; p < parts; ++p)
    if (block(n, parts, p).contains(i)) return p;
  fail("block_of: item {} is outside [0, {})", i, n);
}

Layout Layout::make(int world, int sp, int ep, int rank) {
  if (world < 1 || sp < 1 || ep < 1) fail("parallel layout: world {}, sp {}, ep {} must all be >= 1", world, sp, ep);
  if (world % sp != 0) fail("parallel layout: sp {} does not divide the {} ranks", sp, world);
  if (world % ep != 0) fail("parallel layout: ep {} does not divide the {} ranks", ep, world);
  if (rank < 0 || rank >= world) fail("parallel layout: rank {} outside [0, {})", rank, world);
  return Layout{world, sp, ep, rank};
}

std::string Layout::describe() const {
  return fmt::format("rank {} of {}: dp {}/{} sp {}/{} ep {}/{}", rank, world, dp_rank(), dp(), sp_rank(), sp,
                     ep_rank(), ep);
}

Range kv_heads_for(Range q, int64_t heads, int64_t kv_heads) {
  if (q.size() == 0) return {0, 0};
  const int64_t group = heads / kv_heads;
  return {q.begin / group, (q.end - 1) / group + 1};
}

}  // namespace opensci::parallel
