#include "opensci/harness/compare.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>

#include "opensci/error.hpp"
#include "opensci/safetensors.hpp"

namespace opensci::harness {
namespace fs = std::filesystem;
namespace {

bool finite(double v) { return std::isfinite(v); }

}  // namespace

Tolerance load_tolerance(const fs::path& file, const std::string& name) {
  std::ifstream in(file);
  if (!in) fail("{}: cannot open tolerance file", file.string());
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON: {}", file.string(), e.what());
  }
  if (!j.contains(name)) fail("{}: no tolerance named '{}'", file.string(), name);
  const auto& t = j[name];
  if (!t.contains("reason") || !t["reason"].is_string() || t["reason"].get<std::string>().empty())
    fail("{}: tolerance '{}' has no 'reason': every tolerance carries its reason", file.string(), name);
  Tolerance tol;
  tol.name = name;
  tol.logits_max_abs = t.value("logits_max_abs", tol.logits_max_abs);
  tol.logits_rel_l2_max = t.value("logits_rel_l2_max", tol.logits_rel_l2_max);
  tol.logsoftmax_max_abs = t.value("logsoftmax_max_abs", tol.logsoftmax_max_abs);
  tol.hidden_max_abs = t.value("hidden_max_abs", tol.hidden_max_abs);
  tol.top1_agreement_min = t.value("top1_agreement_min", tol.top1_agreement_min);
  tol.reason = t["reason"].get<std::string>();
  return tol;
}

std::vector<std::string> layer_order(const std::vector<std::string>& names) {
  // key: (layer index, slot) with embed = (-1, 0), attn.i = (i, 0), mlp.i = (i, 1),
  // hidden.layer.i = (i, 2), final_norm = (inf, 0).
  std::vector<std::pair<std::pair<int64_t, int>, std::string>> keyed;
  for (const auto& n : names) {
    auto index_after = [&](std::string_view prefix) { return std::stoll(n.substr(prefix.size())); };
    if (n == "hidden.embed")
      keyed.push_back({{-1, 0}, n});
    else if (n == "hidden.final_norm")
      keyed.push_back({{INT64_MAX, 0}, n});
    else if (n.starts_with("attn."))
      keyed.push_back({{index_after("attn."), 0}, n});
    else if (n.starts_with("mlp."))
      keyed.push_back({{index_after("mlp."), 1}, n});
    else if (n.starts_with("hidden.layer."))
      keyed.push_back({{index_after("hidden.layer."), 2}, n});
  }
  std::sort(keyed.begin(), keyed.end());
  std::vector<std::string> out;
  for (auto& [k, n] : keyed) out.push_back(n);
  return out;
}

Comparison compare_outputs(const fs::path& a_path, const fs::path& b_path, const Tolerance& tol) {
  const SafetensorsFile a(a_path), b(b_path);
  const auto& la = a.at("logits");
  const auto& lb = b.at("logits");
  if (la.shape.size() != 3) fail("{}: 'logits' has shape {}, expected [batch, seq, vocab]", a_path.string(), shape_str(la.shape));
  if (la.shape != lb.shape)
    fail("logits shapes differ: {} has {}, {} has {}", a_path.string(), shape_str(la.shape), b_path.string(),
         shape_str(lb.shape));
  Comparison c;
  c.batch = la.shape[0];
  c.seq = la.shape[1];
  c.vocab = la.shape[2];
  const int64_t rows = c.batch * c.seq;

  std::vector<int64_t> mask(static_cast<size_t>(rows), 1);
  if (a.contains("attention_mask") || b.contains("attention_mask")) {
    const auto ma = a.contains("attention_mask") ? a.read_i64("attention_mask") : mask;
    const auto mb = b.contains("attention_mask") ? b.read_i64("attention_mask") : mask;
    if (ma != mb || ma.size() != mask.size())
      fail("attention_mask differs between {} and {}: the outputs are not for the same batch", a_path.string(),
           b_path.string());
    mask = ma;
  }
  if (a.contains("input_ids") && b.contains("input_ids") && a.read_i64("input_ids") != b.read_i64("input_ids"))
    fail("input_ids differ between {} and {}: the outputs are not for the same prompt", a_path.string(), b_path.string());

  // Per-position maxima are indexed by position id (a left-padded row's first token is
  // position 0), so RoPE faults show as "position 0 exact, later positions off".
  std::vector<int64_t> positions(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) positions[static_cast<size_t>(r)] = r % c.seq;
  if (b.contains("position_ids")) positions = b.read_i64("position_ids");
  if (positions.size() != static_cast<size_t>(rows))
    fail("{}: position_ids has {} entries, expected {}", b_path.string(), positions.size(), rows);
  const int64_t max_position = *std::max_element(positions.begin(), positions.end());

  const auto A = a.read_f64("logits");
  const auto B = b.read_f64("logits");
  c.per_position_max_abs.assign(static_cast<size_t>(max_position + 1), 0.0);
  double diff2 = 0, ref2 = 0, dot = 0, a2 = 0, kl_sum = 0;
  int64_t top1_same = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const double* ar = A.data() + r * c.vocab;
    const double* br = B.data() + r * c.vocab;
    for (int64_t v = 0; v < c.vocab; ++v) {
      c.nonfinite_a += !finite(ar[v]);
      c.nonfinite_b += !finite(br[v]);
    }
    if (mask[static_cast<size_t>(r)] == 0) continue;
    ++c.positions;
    const int64_t pos = positions[static_cast<size_t>(r)];
    double row_max = 0, amax = -INFINITY, bmax = -INFINITY;
    int64_t aarg = 0, barg = 0;
    for (int64_t v = 0; v < c.vocab; ++v) {
      const double d = std::abs(ar[v] - br[v]);
      row_max = std::max(row_max, std::isnan(d) ? INFINITY : d);
      c.max_rel = std::max(c.max_rel, d / std::max(std::abs(br[v]), 1e-6));
      diff2 += d * d;
      ref2 += br[v] * br[v];
      a2 += ar[v] * ar[v];
      dot += ar[v] * br[v];
      if (ar[v] > amax) amax = ar[v], aarg = v;
      if (br[v] > bmax) bmax = br[v], barg = v;
    }
    c.max_abs = std::max(c.max_abs, row_max);
    auto& pm = c.per_position_max_abs[static_cast<size_t>(pos)];
    pm = std::max(pm, row_max);
    top1_same += aarg == barg;
    // log-softmax of each row, then KL(p_b || p_a).
    double za = 0, zb = 0;
    for (int64_t v = 0; v < c.vocab; ++v) {
      za += std::exp(ar[v] - amax);
      zb += std::exp(br[v] - bmax);
    }
    const double lza = amax + std::log(za), lzb = bmax + std::log(zb);
    double kl = 0;
    for (int64_t v = 0; v < c.vocab; ++v) {
      const double lsa = ar[v] - lza, lsb = br[v] - lzb;
      const double d = std::abs(lsa - lsb);
      c.logsoftmax_max_abs = std::max(c.logsoftmax_max_abs, std::isnan(d) ? INFINITY : d);
      kl += std::exp(lsb) * (lsb - lsa);
    }
    kl_sum += kl;
    c.kl_max = std::max(c.kl_max, std::isnan(kl) ? INFINITY : kl);
  }
  if (c.positions == 0) fail("no non-pad positions to compare ({} is all padding)", a_path.string());
  const auto n = static_cast<double>(c.positions * c.vocab);
  c.rmse = std::sqrt(diff2 / n);
  c.rel_l2 = std::sqrt(diff2 / std::max(ref2, 1e-300));
  c.cosine = dot / std::sqrt(std::max(a2 * ref2, 1e-300));
  c.top1_agreement = static_cast<double>(top1_same) / static_cast<double>(c.positions);
  c.kl_mean = kl_sum / static_cast<double>(c.positions);
  for (int64_t p = 0; p <= max_position; ++p)
    if (c.per_position_max_abs[static_cast<size_t>(p)] > tol.logits_max_abs) {
      c.first_divergent_position = p;
      break;
    }

  // Per-layer tensors present in both files, in forward order.
  std::vector<std::string> common;
  for (const auto& t : a.tensors())
    if (b.contains(t.name)) common.push_back(t.name);
  for (const auto& name : layer_order(common)) {
    if (a.at(name).shape != b.at(name).shape)
      fail("tensor '{}' has shape {} in {} but {} in {}", name, shape_str(a.at(name).shape), a_path.string(),
           shape_str(b.at(name).shape), b_path.string());
    const auto ha = a.read_f64(name), hb = b.read_f64(name);
    const int64_t width = static_cast<int64_t>(ha.size()) / rows;
    LayerDiff ld{name};
    double d2 = 0, r2 = 0;
    for (int64_t r = 0; r < rows; ++r) {
      if (mask[static_cast<size_t>(r)] == 0) continue;
      for (int64_t k = 0; k < width; ++k) {
        const double x = ha[static_cast<size_t>(r * width + k)], y = hb[static_cast<size_t>(r * width + k)];
        double d = std::abs(x - y);
        if (std::isnan(d)) d = INFINITY;
        if (d > ld.max_abs) ld.max_abs = d, ld.worst_position = positions[static_cast<size_t>(r)];
        d2 += d * d;
        r2 += y * y;
      }
    }
    ld.rel_l2 = std::sqrt(d2 / std::max(r2, 1e-300));
    if (!c.first_divergent_layer && ld.max_abs > tol.hidden_max_abs) c.first_divergent_layer = name;
    c.layers.push_back(ld);
  }

  if (c.nonfinite_a || c.nonfinite_b)
    c.failures.push_back(fmt::format("non-finite logits: {} in candidate, {} in reference", c.nonfinite_a, c.nonfinite_b));
  if (tol.logits_rel_l2_max > 0 && !(c.rel_l2 <= tol.logits_rel_l2_max))
    c.failures.push_back(fmt::format("rel L2 of logits {:.3e} > {:.1e}", c.rel_l2, tol.logits_rel_l2_max));
  if (!(c.max_abs <= tol.logits_max_abs))
    c.failures.push_back(fmt::format("max |Δlogit| {:.3e} > {:.1e}", c.max_abs, tol.logits_max_abs));
  if (!(c.logsoftmax_max_abs <= tol.logsoftmax_max_abs))
    c.failures.push_back(fmt::format("max |Δlog_softmax| {:.3e} > {:.1e}", c.logsoftmax_max_abs, tol.logsoftmax_max_abs));
  if (!(c.top1_agreement >= tol.top1_agreement_min))
    c.failures.push_back(fmt::format("top-1 agreement {:.4f} < {:.4f}", c.top1_agreement, tol.top1_agreement_min));
  return c;
}

nlohmann::json to_json(const Comparison& c, const Tolerance& tol) {
  nlohmann::json layers = nlohmann::json::array();
  for (const auto& l : c.layers)
    layers.push_back({{"name", l.name}, {"max_abs", l.max_abs}, {"rel_l2", l.rel_l2}, {"worst_position", l.worst_position}});
  auto num = [](double v) -> nlohmann::json { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(fmt::format("{}", v)); };
  nlohmann::json j = {
      {"shape", {c.batch, c.seq, c.vocab}},
      {"positions_compared", c.positions},
      {"max_abs", num(c.max_abs)},
      {"max_rel", num(c.max_rel)},
      {"rel_l2", num(c.rel_l2)},
      {"rmse", num(c.rmse)},
      {"cosine", num(c.cosine)},
      {"top1_agreement", c.top1_agreement},
      {"logsoftmax_max_abs", num(c.logsoftmax_max_abs)},
      {"kl_mean", num(c.kl_mean)},
      {"kl_max", num(c.kl_max)},
      {"nonfinite", {{"candidate", c.nonfinite_a}, {"reference", c.nonfinite_b}}},
      {"per_position_max_abs", [&] {
         nlohmann::json p = nlohmann::json::array();
         for (double v : c.per_position_max_abs) p.push_back(num(v));
         return p;
       }()},
      {"layers", layers},
      {"first_divergent_layer", c.first_divergent_layer ? nlohmann::json(*c.first_divergent_layer) : nlohmann::json()},
      {"first_divergent_position",
       c.first_divergent_position ? nlohmann::json(*c.first_divergent_position) : nlohmann::json()},
      {"tolerance",
       {{"name", tol.name},
        {"logits_max_abs", tol.logits_max_abs},
        {"logits_rel_l2_max", tol.logits_rel_l2_max},
        {"logsoftmax_max_abs", tol.logsoftmax_max_abs},
        {"hidden_max_abs", tol.hidden_max_abs},
        {"top1_agreement_min", tol.top1_agreement_min},
        {"reason", tol.reason}}},
      {"within_tolerance", c.passed()},
      {"failures", c.failures},
  };
  return j;
}

std::string format_comparison(const Comparison& c, const Tolerance& tol) {
  std::string s;
  s += fmt::format("logits [{}, {}, {}], {} positions compared (pads skipped)\n", c.batch, c.seq, c.vocab, c.positions);
  s += fmt::format("  max|Δ| {:.3e}  max rel {:.3e}  rel L2 {:.3e}  RMSE {:.3e}  cosine {:.9f}\n", c.max_abs, c.max_rel,
                   c.rel_l2, c.rmse, c.cosine);
  s += fmt::format("  top-1 agreement {:.4f}  max|Δlog_softmax| {:.3e}  KL mean {:.3e} max {:.3e}\n", c.top1_agreement,
                   c.logsoftmax_max_abs, c.kl_mean, c.kl_max);
  s += "  per-position max|Δ|:";
  for (double v : c.per_position_max_abs) s += fmt::format(" {:.1e}", v);
  s += "\n";
  if (!c.layers.empty()) {
    s += "  per-layer max|Δ| (rel L2):\n";
    for (const auto& l : c.layers)
      s += fmt::format("    {:<20} {:.3e} ({:.2e}) worst pos {}\n", l.name, l.max_abs, l.rel_l2, l.worst_position);
  }
  s += fmt::format("  first divergent layer: {}   first divergent position: {}\n",
                   c.first_divergent_layer.value_or("none"),
                   c.first_divergent_position ? std::to_string(*c.first_divergent_position) : "none");
  s += fmt::format("  tolerance '{}': {}\n", tol.name, tol.reason);
  s += c.passed() ? "  WITHIN TOLERANCE\n" : "  OUT OF TOLERANCE: " + fmt::format("{}", fmt::join(c.failures, "; ")) + "\n";
  return s;
}

}  // namespace opensci::harness
