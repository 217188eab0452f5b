// Shared by the backend forward tests (tests/gpu/test_gpu_forward.cpp,
// tests/libtorch/test_libtorch_forward.cpp): a toy checkpoint, the fixture prompts, and how a
// backend's ForwardResult is compared with the golden CPU reference.
#pragma once

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "opensci/forward.hpp"
#include "opensci/harness/toy.hpp"

namespace opensci::backend_test {

// The toy of `config` (toy_configs/*.json) with seed 1, written under `work` (rebuilt each run).
inline std::filesystem::path build_toy(const std::filesystem::path& config, const std::filesystem::path& work) {
  harness::ToyOptions o;
  o.config = config;
  o.seed = 1;
  o.out = work / config.stem();
  std::filesystem::remove_all(o.out);
  harness::build_toy(o);
  return o.out;
}

// fixtures/tokens: one unpadded row, and a left-padded batch of three rows.
inline std::vector<std::pair<std::string, TokenBatch>> fixture_prompts(const std::filesystem::path& source_dir) {
  std::vector<std::pair<std::string, TokenBatch>> out;
  for (const char* name : {"single", "padded-batch"})
    out.emplace_back(name,
                     TokenBatch::from_json_file(source_dir / "fixtures" / "tokens" / (std::string(name) + ".json")));
  return out;
}

// Logit agreement over the non-pad positions (pad positions are undefined in transformers and
// skipped by every comparison of this project).
struct Agreement {
  double max_abs = 0;         // max |got - ref|
  double rel_norm = 0;        // ||got - ref|| / ||ref||
  int64_t positions = 0;      // non-pad positions compared
  int64_t argmax_equal = 0;   // positions whose argmax agrees
  double max_hidden_rel = 0;  // max over captured hidden states of their relative norm
  bool same_hidden_names = true;
};

inline Agreement compare(const ForwardResult& got, const ForwardResult& ref, const TokenBatch& tok) {
  Agreement a;
  const int64_t V = ref.vocab, H = ref.hidden;
  double num = 0, den = 0;
  for (int64_t p = 0; p < tok.batch * tok.seq; ++p) {
    if (tok.attention_mask[static_cast<size_t>(p)] == 0) continue;
    ++a.positions;
    const float* g = got.logits.data() + p * V;
    const float* r = ref.logits.data() + p * V;
    for (int64_t v = 0; v < V; ++v) {
      const double d = static_cast<double>(g[v]) - r[v];
      a.max_abs = std::max(a.max_abs, std::isfinite(d) ? std::abs(d) : INFINITY);
      num += d * d;
      den += static_cast<double>(r[v]) * r[v];
    }
    a.argmax_equal += (std::max_element(g, g + V) - g) == (std::max_element(r, r + V) - r) ? 1 : 0;
  }
  a.rel_norm = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  a.same_hidden_names = got.hiddens.size() == ref.hiddens.size();
  for (size_t i = 0; a.same_hidden_names && i < ref.hiddens.size(); ++i) {
    a.same_hidden_names = got.hiddens[i].first == ref.hiddens[i].first;
    double hn = 0, hd = 0;
    for (int64_t p = 0; p < tok.batch * tok.seq; ++p) {
      if (tok.attention_mask[static_cast<size_t>(p)] == 0) continue;
      for (int64_t j = 0; j < H; ++j) {
        const size_t at = static_cast<size_t>(p * H + j);
        const double d = static_cast<double>(got.hiddens[i].second[at]) - ref.hiddens[i].second[at];
        hn += d * d;
        hd += static_cast<double>(ref.hiddens[i].second[at]) * ref.hiddens[i].second[at];
      }
    }
    a.max_hidden_rel = std::max(a.max_hidden_rel, hd > 0 ? std::sqrt(hn / hd) : std::sqrt(hn));
  }
  return a;
}

inline std::string describe(const Agreement& a) {
  return fmt::format("max|dlogit| {:.3e}, rel norm {:.3e}, argmax {}/{}, max hidden rel {:.3e}{}", a.max_abs,
                     a.rel_norm, a.argmax_equal, a.positions, a.max_hidden_rel,
                     a.same_hidden_names ? "" : ", HIDDEN NAMES DIFFER");
}

}  // namespace opensci::backend_test
