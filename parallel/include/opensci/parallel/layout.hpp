// Where every token, head and expert of a sharded forward lives.
//
// World of W ranks, sequence-parallel size sp, expert-parallel size ep (both divide W):
//   dp = W / sp data-parallel groups; dp group d = ranks [d*sp, (d+1)*sp) (the sp group), each
//   holding a contiguous block of batch rows; inside it sp rank j holds sequence positions
//   block j. Batch rows, sequence positions, query heads and experts are split in contiguous
//   blocks whose sizes differ by at most one, larger blocks first (so 10 positions over 4 ranks
//   are 3,3,2,2, and 3 rows over 4 groups leave one group empty).
//   ep groups are the columns of the (ep, W/ep) grid of ranks, as VeOmni's ep x ep_fsdp mesh:
//   ep group g = {g, g + W/ep, g + 2W/ep, ...}; ep rank i of a group holds experts block i. With
//   W = sp * ep (the default) an ep group holds the ranks of one sp position across dp groups.
//   Example sp2 x ep2, W = 4: sp groups {0,1} {2,3}, ep groups {0,2} {1,3}.
// SP (Ulysses): before attention an all-to-all inside the sp group trades the sequence split for
// a head split: sp rank j gets every position of its dp rows for query heads block j and the key/
// value heads those query heads read (GQA: kv head = q head / (heads / kv_heads); a kv head needed
// by several ranks, as when kv_heads < sp, is sent to each of them). After attention the inverse
// all-to-all brings the heads back to the positions' owners.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace opensci::parallel {

struct Range {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
  bool contains(int64_t i) const { return i >= begin && i < end; }
};

// Block `part` of `n` items split into `parts` contiguous blocks (sizes differ by at most one).
Range block(int64_t n, int64_t parts, int64_t part);
// The block holding item i.
int64_t block_of(int64_t n, int64_t parts, int64_t i);

struct Layout {
  int world = 1, sp = 1, ep = 1, rank = 0;

  // Throws naming the sizes when sp or ep does not divide world.
  static Layout make(int world, int sp, int ep, int rank);
  int dp() const { return world / sp; }
  int dp_rank() const { return rank / sp; }
  int sp_rank() const { return rank % sp; }
  int ep_group() const { return rank % (world / ep); }  // color of this rank's ep group
  int ep_rank() const { return rank / (world / ep); }
  int world_rank_of_sp(int dp_rank, int sp_rank) const { return dp_rank * sp + sp_rank; }

  Range rows(int64_t batch) const { return block(batch, dp(), dp_rank()); }
  Range positions(int64_t seq) const { return block(seq, sp, sp_rank()); }
  Range positions_of(int64_t seq, int sp_rank_) const { return block(seq, sp, sp_rank_); }
  Range heads(int64_t heads) const { return block(heads, sp, sp_rank()); }
  Range heads_of(int64_t heads, int sp_rank_) const { return block(heads, sp, sp_rank_); }
  Range experts(int64_t experts) const { return block(experts, ep, ep_rank()); }
  std::string describe() const;  // "rank 1 of 4: dp 0/2 sp 1/2 ep 0/2"
};

// The kv heads that query heads [q.begin, q.end) read: [q.begin / group, (q.end - 1) / group].
Range kv_heads_for(Range q_heads, int64_t heads, int64_t kv_heads);

}  // namespace opensci::parallel
