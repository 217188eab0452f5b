// The sharded reference forward: see sharded_forward.hpp for what lives where and why the
// golden path is bit-identical to reference/src/forward.cpp. The layer structure below follows
// forward.cpp line by line; what differs is which tokens, heads and experts a rank touches.
#include "opensci/parallel/sharded_forward.hpp"

#include <cblas.h>
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstring>
#include <ctime>
#include <thread>

#include "opensci/error.hpp"
#include "opensci/ops.hpp"
#include "opensci/param.hpp"

namespace opensci::parallel {

InjectedFault InjectedFault::parse(const std::string& spec) {
  InjectedFault f;
  if (spec.empty()) return f;
  const auto colon = spec.find(':');
  if (colon == std::string::npos) fail("--inject-fault '{}': expected RANK:KIND[@LAYER]", spec);
  try {
    f.rank = std::stoi(spec.substr(0, colon));
  } catch (const std::exception&) {
    fail("--inject-fault '{}': '{}' is not a rank number", spec, spec.substr(0, colon));
  }
  f.kind = spec.substr(colon + 1);
  if (const auto at = f.kind.find('@'); at != std::string::npos) {
    f.layer = std::stoll(f.kind.substr(at + 1));
    f.kind.resize(at);
  }
  static const char* kinds[] = {"crash", "abort", "hang", "exit", "error", "positions"};
  if (std::find(std::begin(kinds), std::end(kinds), f.kind) == std::end(kinds))
    fail("--inject-fault '{}': unknown kind '{}' (crash, abort, hang, exit, error, positions)", spec, f.kind);
  return f;
}

namespace {

// out[rows, outf] = x[rows, in] . w[outf, in]^T + b          (forward.cpp's linear)
template <typename Real>
void linear(Real* out, const Real* x, const Real* w, const Real* b, int64_t rows, int64_t in, int64_t outf) {
  if (rows == 0) return;
  if constexpr (std::is_same_v<Real, float>) {
    if (b) {
      for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * outf, b, sizeof(float) * static_cast<size_t>(outf));
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), static_cast<int>(outf),
                static_cast<int>(in), 1.0f, x, static_cast<int>(in), w, static_cast<int>(in), b ? 1.0f : 0.0f, out,
                static_cast<int>(outf));
  } else {
    ops::linear_loops(out, x, w, b, rows, in, outf);
  }
}

[[noreturn]] void hang_forever() {
  // A grandchild in this rank's process group, as a hung rank that started a helper would have.
  if (std::system("sleep 918273 &") != 0) std::fprintf(stderr, "could not start the grandchild sleep\n");
  for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
}

template <typename Real>
struct Sharded {
  const Checkpoint& ck;
  const ModelConfig& c;
  const TokenBatch& tok;
  const Layout& L;
  Communicator& world;
  Communicator& sp_comm;  // ranks of this dp group, sp rank order
  Communicator& ep_comm;  // ranks of this ep group, ep rank order
  const ShardedOptions& opt;
  ShardedResult& out;

  Range rows, pos;      // this rank's batch rows and sequence positions
  int64_t nb = 0, ns = 0, Tl = 0;  // local tokens: nb * ns, index (b - rows.begin) * ns + (s - pos.begin)
  std::vector<int64_t> positions;  // RoPE positions of the local tokens (global: the batch's position_ids)
  std::vector<std::pair<std::string, std::vector<float>>> local_hidden;

  static constexpr size_t es = sizeof(Real);

  void progress(const std::string& stage) {
    if (opt.progress) opt.progress(stage);
  }

  void record(std::string name, const std::vector<Real>& x) {
    if (!opt.forward.capture_hidden) return;
    local_hidden.emplace_back(std::move(name), std::vector<float>(x.begin(), x.end()));
  }

  void inject(int64_t layer) {
    const auto& f = opt.fault;
    if (!f.active_on(L.rank) || f.layer != layer || f.kind == "positions") return;
    std::fprintf(stderr, "rank %d: injecting fault '%s' in layer %lld\n", L.rank, f.kind.c_str(),
                 static_cast<long long>(layer));
    std::fflush(stderr);
    if (f.kind == "crash") std::raise(SIGSEGV);
    if (f.kind == "abort") std::abort();
    if (f.kind == "hang") hang_forever();
    if (f.kind == "exit") std::_Exit(0);
    if (f.kind == "error")
      fail("rank {}: injected error in layer {} (the fault tests' stand-in for a rank that raises)", L.rank, layer);
  }

  uint64_t peer_bytes(std::initializer_list<const char*> classes) const {
    uint64_t b = 0;
    for (const char* cls : classes)
      if (auto it = world.traffic().by_class.find(cls); it != world.traffic().by_class.end()) b += it->second.to_peers;
    return b;
  }
  uint64_t self_bytes(std::initializer_list<const char*> classes) const {
    uint64_t b = 0;
    for (const char* cls : classes)
      if (auto it = world.traffic().by_class.find(cls); it != world.traffic().by_class.end()) b += it->second.to_self;
    return b;
  }

  // --- attention (Ulysses) -------------------------------------------------------------------
  // q: [Tl, NH, D], k, v: [Tl, NKV, D] of the local tokens (after q/k norm and RoPE) -> att: [Tl, NH, D].
  void attention(std::vector<Real>& att, const std::vector<Real>& q, const std::vector<Real>& k,
                 const std::vector<Real>& v, int64_t layer) {
    const int64_t NH = c.num_heads, NKV = c.num_kv_heads, D = c.head_dim, S = tok.seq;
    const int P = L.sp, me = L.sp_rank();
    const Range my_q = L.heads(NH), my_kv = kv_heads_for(my_q, NH, NKV);
    const int64_t mq = my_q.size(), mkv = my_kv.size();

    // Send to sp rank j: my tokens' q heads of j, then k and v of the kv heads j's q heads read.
    std::vector<int64_t> send_counts(static_cast<size_t>(P)), recv_counts(static_cast<size_t>(P));
    std::vector<Real> send;
    uint64_t minimum = 0;
    for (int j = 0; j < P; ++j) {
      const Range qj = L.heads_of(NH, j), kvj = kv_heads_for(qj, NH, NKV);
      const size_t before = send.size();
      for (int64_t t = 0; t < Tl; ++t)
        send.insert(send.end(), q.begin() + (t * NH + qj.begin) * D, q.begin() + (t * NH + qj.end) * D);
      for (const auto* src : {&k, &v})
        for (int64_t t = 0; t < Tl; ++t)
          send.insert(send.end(), src->begin() + (t * NKV + kvj.begin) * D, src->begin() + (t * NKV + kvj.end) * D);
      send_counts[static_cast<size_t>(j)] = static_cast<int64_t>(send.size() - before);
      // Analytic: rank j needs q of its heads and k/v of the kv heads they read, for my tokens.
      if (j != me) minimum += static_cast<uint64_t>(Tl * (qj.size() + 2 * kvj.size()) * D) * es;
      const int64_t ns_j = L.positions_of(S, j).size();
      recv_counts[static_cast<size_t>(j)] = nb * ns_j * (mq + 2 * mkv) * D;
      // Analytic: the attention output of my heads goes back to every position's owner.
      if (j != me) minimum += static_cast<uint64_t>(nb * ns_j * mq * D) * es;
    }
    progress(fmt::format("layer {} attention all-to-all (sequence -> heads)", layer));
    std::vector<Real> recv;
    alltoallv(sp_comm, send, send_counts, recv, recv_counts, "sp.qkv");

    // Whole sequence of my dp rows, my heads:  qf [nb, S, mq, D], kf/vf [nb, S, mkv, D]
    std::vector<Real> qf(static_cast<size_t>(nb * S * mq * D)), kf(static_cast<size_t>(nb * S * mkv * D)),
        vf(static_cast<size_t>(nb * S * mkv * D));
    size_t at = 0;
    for (int i = 0; i < P; ++i) {
      const Range pi = L.positions_of(S, i);
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t s = pi.begin; s < pi.end; ++s, at += static_cast<size_t>(mq * D))
          std::copy_n(recv.begin() + static_cast<int64_t>(at), mq * D, qf.begin() + ((b * S + s) * mq) * D);
      for (auto* dst : {&kf, &vf})
        for (int64_t b = 0; b < nb; ++b)
          for (int64_t s = pi.begin; s < pi.end; ++s, at += static_cast<size_t>(mkv * D))
            std::copy_n(recv.begin() + static_cast<int64_t>(at), mkv * D, dst->begin() + ((b * S + s) * mkv) * D);
    }

    // Attention of each kv head with the query heads reading it (GQA), on the reference's own
    // kernel: per (row, head, query) the same loops in the same order as unsharded.
    std::vector<Real> af(static_cast<size_t>(nb * S * mq * D), Real(0));
    const int64_t group = NH / NKV;
    const int64_t* mask = tok.attention_mask.data() + rows.begin * S;
    for (int64_t kv = my_kv.begin; kv < my_kv.end && nb > 0; ++kv) {
      const int64_t h0 = std::max(my_q.begin, kv * group), h1 = std::min(my_q.end, (kv + 1) * group);
      const int64_t g = h1 - h0;
      std::vector<Real> qg(static_cast<size_t>(nb * S * g * D)), kg(static_cast<size_t>(nb * S * D)),
          vg(static_cast<size_t>(nb * S * D)), og(static_cast<size_t>(nb * S * g * D));
      for (int64_t r = 0; r < nb * S; ++r) {
        std::copy_n(qf.begin() + (r * mq + (h0 - my_q.begin)) * D, g * D, qg.begin() + r * g * D);
        std::copy_n(kf.begin() + (r * mkv + (kv - my_kv.begin)) * D, D, kg.begin() + r * D);
        std::copy_n(vf.begin() + (r * mkv + (kv - my_kv.begin)) * D, D, vg.begin() + r * D);
      }
      ops::causal_attention(og.data(), qg.data(), kg.data(), vg.data(), mask, nb, S, g, 1, D);
      for (int64_t r = 0; r < nb * S; ++r)
        std::copy_n(og.begin() + r * g * D, g * D, af.begin() + (r * mq + (h0 - my_q.begin)) * D);
    }

    // Back: the output of my heads for sp rank i's positions goes to i.
    std::vector<Real> send2;
    std::vector<int64_t> send2_counts(static_cast<size_t>(P)), recv2_counts(static_cast<size_t>(P));
    for (int i = 0; i < P; ++i) {
      const Range pi = L.positions_of(S, i);
      const size_t before = send2.size();
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t s = pi.begin; s < pi.end; ++s)
          send2.insert(send2.end(), af.begin() + ((b * S + s) * mq) * D, af.begin() + ((b * S + s) * mq + mq) * D);
      send2_counts[static_cast<size_t>(i)] = static_cast<int64_t>(send2.size() - before);
      recv2_counts[static_cast<size_t>(i)] = Tl * L.heads_of(NH, i).size() * D;
    }
    progress(fmt::format("layer {} attention all-to-all (heads -> sequence)", layer));
    std::vector<Real> recv2;
    alltoallv(sp_comm, send2, send2_counts, recv2, recv2_counts, "sp.out");
    att.assign(static_cast<size_t>(Tl * NH * D), Real(0));
    at = 0;
    for (int j = 0; j < P; ++j) {
      const Range qj = L.heads_of(NH, j);
      for (int64_t t = 0; t < Tl; ++t, at += static_cast<size_t>(qj.size() * D))
        std::copy_n(recv2.begin() + static_cast<int64_t>(at), qj.size() * D, att.begin() + (t * NH + qj.begin) * D);
    }
    out.layers.back().minimum += minimum;
  }

  // --- MLPs -----------------------------------------------------------------------------------
  void swiglu_mlp(Real* y, const Real* h, int64_t n, int64_t I, const Real* gate_w, const Real* up_w,
                  const Real* down_w, const Real* gate_b = nullptr, const Real* up_b = nullptr,
                  const Real* down_b = nullptr) {
    const int64_t H = c.hidden_size;
    std::vector<Real> gate(static_cast<size_t>(n * I)), up(static_cast<size_t>(n * I));
    linear(gate.data(), h, gate_w, gate_b, n, H, I);
    linear(up.data(), h, up_w, up_b, n, H, I);
    ops::swiglu(gate.data(), up.data(), n * I);
    linear(y, gate.data(), down_w, down_b, n, I, H);
  }

  void dense_mlp(Real* y, const Real* h, const std::string& pre) {
    const int64_t H = c.hidden_size, I = c.intermediate_size;
    const bool bias = c.mlp_bias;
    const auto gw = load_param<Real>(ck, pre + "gate_proj.weight", {I, H}),
               uw = load_param<Real>(ck, pre + "up_proj.weight", {I, H}),
               dw = load_param<Real>(ck, pre + "down_proj.weight", {H, I});
    const auto gb = load_param_optional<Real>(ck, bias, pre + "gate_proj.bias", {I}),
               ub = load_param_optional<Real>(ck, bias, pre + "up_proj.bias", {I}),
               db = load_param_optional<Real>(ck, bias, pre + "down_proj.bias", {H});
    swiglu_mlp(y, h, Tl, I, gw.data(), uw.data(), dw.data(), gb.data(), ub.data(), db.data());
  }

  // This rank's experts [e0, e1) in the fused v5 layout: gate_up [n, 2I, H] (gate rows, then up
  // rows), down [n, H, I]; a per-expert layer is assembled into it as the converter lays it out.
  struct LocalExperts {
    Param<Real> gate_up, down;
  };
  LocalExperts local_experts(const std::string& pre, ExpertLayout layout, Range ex) {
    const int64_t H = c.hidden_size, E = c.num_experts, I = c.moe_intermediate_size;
    LocalExperts le;
    if (layout == ExpertLayout::Fused) {
      le.gate_up = load_param_elements<Real>(ck, pre + "experts.gate_up_proj", {E, 2 * I, H}, ex.begin * 2 * I * H,
                                             ex.size() * 2 * I * H);
      le.down =
          load_param_elements<Real>(ck, pre + "experts.down_proj", {E, H, I}, ex.begin * H * I, ex.size() * H * I);
      return le;
    }
    le.gate_up.owned.resize(static_cast<size_t>(ex.size() * 2 * I * H));
    le.down.owned.resize(static_cast<size_t>(ex.size() * H * I));
    for (int64_t e = ex.begin; e < ex.end; ++e) {
      const auto x = fmt::format("{}experts.{}.", pre, e);
      const auto g = load_param<Real>(ck, x + "gate_proj.weight", {I, H}),
                 u = load_param<Real>(ck, x + "up_proj.weight", {I, H}),
                 d = load_param<Real>(ck, x + "down_proj.weight", {H, I});
      std::copy_n(g.data(), I * H, le.gate_up.owned.begin() + (e - ex.begin) * 2 * I * H);
      std::copy_n(u.data(), I * H, le.gate_up.owned.begin() + (e - ex.begin) * 2 * I * H + I * H);
      std::copy_n(d.data(), H * I, le.down.owned.begin() + (e - ex.begin) * H * I);
    }
    le.gate_up.ptr = le.gate_up.owned.data();
    le.down.ptr = le.down.owned.data();
    return le;
  }

  // Expert parallel MoE block (Qwen3-MoE): route locally, send each token once to every ep rank
  // holding one of its experts (with the list of those experts), run the experts there, send one
  // output per (token, expert) back, sum on the token's rank in increasing expert index.
  void moe_mlp(Real* y, const Real* h, const std::string& pre, ExpertLayout layout, int64_t layer) {
    const int64_t H = c.hidden_size, E = c.num_experts, I = c.moe_intermediate_size;
    const int P = L.ep, me = L.ep_rank();
    std::vector<Real> router(static_cast<size_t>(Tl * E));
    {
      const auto gw = load_param<Real>(ck, pre + "gate.weight", {E, H});
      linear(router.data(), h, gw.data(), static_cast<const Real*>(nullptr), Tl, H, E);
    }
    // routing[t]: k (expert, weight) pairs, sorted by expert index (the order they are summed in).
    std::vector<std::vector<std::pair<int64_t, Real>>> routing(static_cast<size_t>(Tl));
    for (int64_t t = 0; t < Tl; ++t) {
      routing[static_cast<size_t>(t)] =
          ops::topk_routing(router.data() + t * E, E, c.num_experts_per_tok, c.norm_topk_prob);
      std::sort(routing[static_cast<size_t>(t)].begin(), routing[static_cast<size_t>(t)].end(),
                [](const auto& a, const auto& b) { return a.first < b.first; });
    }
    auto owner = [&](int64_t e) { return static_cast<int>(block_of(E, P, e)); };

    // Dispatch: index stream per ep rank p: for each token sent, [n, e_1 .. e_n]; payload: its h.
    std::vector<int64_t> index, idx_counts(static_cast<size_t>(P)), pay_counts(static_cast<size_t>(P));
    std::vector<Real> payload;
    std::vector<std::vector<int64_t>> sent_tokens(static_cast<size_t>(P));  // per p: local tokens, in order
    uint64_t minimum = 0;
    for (int p = 0; p < P; ++p) {
      const size_t i0 = index.size(), p0 = payload.size();
      for (int64_t t = 0; t < Tl; ++t) {
        std::vector<int64_t> here;
        for (const auto& [e, w] : routing[static_cast<size_t>(t)])
          if (owner(e) == p) here.push_back(e);
        if (here.empty()) continue;
        sent_tokens[static_cast<size_t>(p)].push_back(t);
        index.push_back(static_cast<int64_t>(here.size()));
        index.insert(index.end(), here.begin(), here.end());
        payload.insert(payload.end(), h + t * H, h + (t + 1) * H);
        // Analytic: the token once to each other rank holding one of its experts.
        if (p != me) minimum += static_cast<uint64_t>(H) * es;
      }
      idx_counts[static_cast<size_t>(p)] = static_cast<int64_t>(index.size() - i0);
      pay_counts[static_cast<size_t>(p)] = static_cast<int64_t>(payload.size() - p0);
    }
    progress(fmt::format("layer {} moe dispatch all-to-all", layer));
    const auto ridx_counts = ep_comm.alltoall_counts(idx_counts);
    std::vector<int64_t> rindex;
    alltoallv(ep_comm, index, idx_counts, rindex, ridx_counts, "ep.index");
    // What each source sends follows from its index stream: one H vector per token listed.
    std::vector<int64_t> rpay_counts(static_cast<size_t>(P));
    std::vector<int64_t> rtokens;  // per received token: offset of its index entry
    {
      size_t at = 0;
      for (int q = 0; q < P; ++q) {
        const size_t end = at + static_cast<size_t>(ridx_counts[static_cast<size_t>(q)]);
        int64_t n = 0;
        while (at < end) {
          rtokens.push_back(static_cast<int64_t>(at));
          at += 1 + static_cast<size_t>(rindex[at]);
          ++n;
        }
        rpay_counts[static_cast<size_t>(q)] = n * H;
      }
    }
    std::vector<Real> rpayload;
    alltoallv(ep_comm, payload, pay_counts, rpayload, rpay_counts, "ep.dispatch");

    // Run my experts on the tokens routed to them; outputs in (received token, its experts) order.
    const Range mine = L.experts(E);
    const auto experts = local_experts(pre, layout, mine);
    std::vector<int64_t> pair_offset(rtokens.size() + 1, 0);  // output pairs before received token j
    for (size_t j = 0; j < rtokens.size(); ++j)
      pair_offset[j + 1] = pair_offset[j] + rindex[static_cast<size_t>(rtokens[j])];
    std::vector<Real> outputs(static_cast<size_t>(pair_offset.back() * H));
    for (int64_t e = mine.begin; e < mine.end; ++e) {
      std::vector<int64_t> picked, slots;
      for (size_t j = 0; j < rtokens.size(); ++j) {
        const auto at = static_cast<size_t>(rtokens[j]);
        for (int64_t x = 0; x < rindex[at]; ++x)
          if (rindex[at + 1 + static_cast<size_t>(x)] == e) {
            picked.push_back(static_cast<int64_t>(j));
            slots.push_back(pair_offset[j] + x);
          }
      }
      if (picked.empty()) continue;
      const auto n = static_cast<int64_t>(picked.size());
      std::vector<Real> xin(static_cast<size_t>(n * H)), yo(static_cast<size_t>(n * H));
      for (int64_t i = 0; i < n; ++i) std::copy_n(rpayload.begin() + picked[static_cast<size_t>(i)] * H, H, xin.begin() + i * H);
      const Real* gu = experts.gate_up.data() + (e - mine.begin) * 2 * I * H;
      swiglu_mlp(yo.data(), xin.data(), n, I, gu, gu + I * H, experts.down.data() + (e - mine.begin) * H * I);
      for (int64_t i = 0; i < n; ++i) std::copy_n(yo.begin() + i * H, H, outputs.begin() + slots[static_cast<size_t>(i)] * H);
    }

    // Combine: the outputs go back to the tokens' ranks in the order they came.
    std::vector<int64_t> out_counts(static_cast<size_t>(P)), back_counts(static_cast<size_t>(P));
    {
      size_t at = 0;
      for (int q = 0; q < P; ++q) {
        const size_t end = at + static_cast<size_t>(ridx_counts[static_cast<size_t>(q)]);
        int64_t pairs = 0;
        while (at < end) {
          pairs += rindex[at];
          at += 1 + static_cast<size_t>(rindex[at]);
        }
        out_counts[static_cast<size_t>(q)] = pairs * H;
        // Analytic: one output per (token, expert) goes back to each other rank's tokens.
        if (q != me) minimum += static_cast<uint64_t>(pairs * H) * es;
      }
      for (int p = 0; p < P; ++p) {
        int64_t pairs = 0;
        for (const auto t : sent_tokens[static_cast<size_t>(p)])
          for (const auto& [e, w] : routing[static_cast<size_t>(t)]) pairs += owner(e) == p ? 1 : 0;
        back_counts[static_cast<size_t>(p)] = pairs * H;
      }
    }
    progress(fmt::format("layer {} moe combine all-to-all", layer));
    std::vector<Real> back;
    alltoallv(ep_comm, outputs, out_counts, back, back_counts, "ep.combine");

    // y[t] = sum over t's experts in increasing index of weight * output, as forward.cpp sums.
    std::vector<std::vector<const Real*>> slot(static_cast<size_t>(Tl));  // per token, per routing entry
    for (int64_t t = 0; t < Tl; ++t) slot[static_cast<size_t>(t)].assign(routing[static_cast<size_t>(t)].size(), nullptr);
    size_t at = 0;
    for (int p = 0; p < P; ++p)
      for (const auto t : sent_tokens[static_cast<size_t>(p)]) {
        const auto& r = routing[static_cast<size_t>(t)];
        for (size_t x = 0; x < r.size(); ++x)
          if (owner(r[x].first) == p) {
            slot[static_cast<size_t>(t)][x] = back.data() + at;
            at += static_cast<size_t>(H);
          }
      }
    std::fill(y, y + Tl * H, Real(0));
    for (int64_t t = 0; t < Tl; ++t) {
      const auto& r = routing[static_cast<size_t>(t)];
      for (size_t x = 0; x < r.size(); ++x) {
        const Real* yo = slot[static_cast<size_t>(t)][x];
        for (int64_t d = 0; d < H; ++d) y[t * H + d] += r[x].second * yo[d];
      }
    }
    out.layers.back().minimum += minimum;
  }

  // --- the layers -----------------------------------------------------------------------------
  void run() {
    const int64_t H = c.hidden_size, D = c.head_dim, NH = c.num_heads, NKV = c.num_kv_heads, V = c.vocab_size;
    const int64_t S = tok.seq;
    const auto inv_freq = ops::rope_inv_freq(D, c.rope_theta);
    const auto layouts = detect_expert_layouts(ck);
    rows = L.rows(tok.batch);
    pos = L.positions(S);
    nb = rows.size();
    ns = pos.size();
    Tl = nb * ns;
    const bool local_positions = opt.fault.active_on(L.rank) && opt.fault.kind == "positions";
    for (int64_t b = rows.begin; b < rows.end; ++b)
      for (int64_t s = pos.begin; s < pos.end; ++s)
        positions.push_back(local_positions ? s - pos.begin : tok.position_ids[static_cast<size_t>(b * S + s)]);

    std::vector<Real> x(static_cast<size_t>(Tl * H));
    {
      const auto emb = load_param<Real>(ck, "model.embed_tokens.weight", {V, H});
      int64_t t = 0;
      for (int64_t b = rows.begin; b < rows.end; ++b)
        for (int64_t s = pos.begin; s < pos.end; ++s, ++t)
          std::copy_n(emb.data() + tok.input_ids[static_cast<size_t>(b * S + s)] * H, H, x.data() + t * H);
    }
    record("hidden.embed", x);

    std::vector<Real> h(static_cast<size_t>(Tl * H)), q(static_cast<size_t>(Tl * NH * D)),
        k(static_cast<size_t>(Tl * NKV * D)), v(static_cast<size_t>(Tl * NKV * D)), att, block(static_cast<size_t>(Tl * H));
    for (int64_t l = 0; l < c.num_layers; ++l) {
      const auto pre = fmt::format("model.layers.{}.", l);
      const auto sa = pre + "self_attn.";
      progress(fmt::format("layer {} attention", l));
      inject(l);
      out.layers.push_back({l, "attention", 0, 0, 0});
      const auto sent0 = peer_bytes({"sp.qkv", "sp.out"}), self0 = self_bytes({"sp.qkv", "sp.out"});
      ops::rms_norm(h.data(), x.data(), load_param<Real>(ck, pre + "input_layernorm.weight", {H}).data(), Tl, H,
                    c.rms_norm_eps);
      const bool ab = c.attention_bias;
      {
        const auto qw = load_param<Real>(ck, sa + "q_proj.weight", {NH * D, H}),
                   kw = load_param<Real>(ck, sa + "k_proj.weight", {NKV * D, H}),
                   vw = load_param<Real>(ck, sa + "v_proj.weight", {NKV * D, H});
        const auto qb = load_param_optional<Real>(ck, ab, sa + "q_proj.bias", {NH * D}),
                   kb = load_param_optional<Real>(ck, ab, sa + "k_proj.bias", {NKV * D}),
                   vb = load_param_optional<Real>(ck, ab, sa + "v_proj.bias", {NKV * D});
        linear(q.data(), h.data(), qw.data(), qb.data(), Tl, H, NH * D);
        linear(k.data(), h.data(), kw.data(), kb.data(), Tl, H, NKV * D);
        linear(v.data(), h.data(), vw.data(), vb.data(), Tl, H, NKV * D);
      }
      if (c.qk_norm) {
        ops::rms_norm(q.data(), q.data(), load_param<Real>(ck, sa + c.q_norm_name() + ".weight", {D}).data(), Tl * NH,
                      D, c.rms_norm_eps);
        ops::rms_norm(k.data(), k.data(), load_param<Real>(ck, sa + c.k_norm_name() + ".weight", {D}).data(), Tl * NKV,
                      D, c.rms_norm_eps);
      }
      ops::rope(q.data(), positions.data(), Tl, NH, D, inv_freq);
      ops::rope(k.data(), positions.data(), Tl, NKV, D, inv_freq);
      attention(att, q, k, v, l);
      linear(block.data(), att.data(), load_param<Real>(ck, sa + "o_proj.weight", {H, NH * D}).data(),
             load_param_optional<Real>(ck, ab, sa + "o_proj.bias", {H}).data(), Tl, NH * D, H);
      out.layers.back().sent = peer_bytes({"sp.qkv", "sp.out"}) - sent0;
      out.layers.back().to_self = self_bytes({"sp.qkv", "sp.out"}) - self0;
      record(fmt::format("attn.{}", l), block);
      ops::add_inplace(x.data(), block.data(), Tl * H);

      ops::rms_norm(h.data(), x.data(), load_param<Real>(ck, pre + "post_attention_layernorm.weight", {H}).data(), Tl,
                    H, c.rms_norm_eps);
      if (c.is_sparse_layer(l)) {
        progress(fmt::format("layer {} moe", l));
        out.layers.push_back({l, "moe", 0, 0, 0});
        const auto m0 = peer_bytes({"ep.dispatch", "ep.combine"}), s0 = self_bytes({"ep.dispatch", "ep.combine"});
        moe_mlp(block.data(), h.data(), pre + "mlp.", layouts[static_cast<size_t>(l)], l);
        out.layers.back().sent = peer_bytes({"ep.dispatch", "ep.combine"}) - m0;
        out.layers.back().to_self = self_bytes({"ep.dispatch", "ep.combine"}) - s0;
      } else {
        dense_mlp(block.data(), h.data(), pre + "mlp.");
      }
      record(fmt::format("mlp.{}", l), block);
      ops::add_inplace(x.data(), block.data(), Tl * H);
      record(fmt::format("hidden.layer.{}", l), x);
    }
    ops::rms_norm(h.data(), x.data(), load_param<Real>(ck, "model.norm.weight", {H}).data(), Tl, H, c.rms_norm_eps);
    record("hidden.final_norm", h);
    std::vector<Real> logits(static_cast<size_t>(Tl * V));
    const auto head_name = c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
    linear(logits.data(), h.data(), load_param<Real>(ck, head_name, {V, H}).data(), static_cast<const Real*>(nullptr),
           Tl, H, V);

    progress("gather logits and hidden states on rank 0");
    out.result.batch = tok.batch;
    out.result.seq = S;
    out.result.vocab = V;
    out.result.hidden = H;
    out.result.logits = gather(std::vector<float>(logits.begin(), logits.end()), V);
    for (auto& [name, values] : local_hidden) {
      auto full = gather(values, H);
      if (L.rank == 0) out.result.hiddens.emplace_back(name, std::move(full));
    }
    if (L.rank != 0) out.result.logits.clear();
  }

  // Local [Tl, width] of every rank -> [batch, seq, width] on rank 0 (empty elsewhere).
  std::vector<float> gather(const std::vector<float>& local, int64_t width) {
    std::vector<std::byte> all;
    const auto counts = world.gatherv(local.data(), static_cast<int64_t>(local.size()), all, Elem::F32, 0, "gather");
    if (L.rank != 0) return {};
    const int64_t S = tok.seq;
    std::vector<float> full(static_cast<size_t>(tok.batch * S * width));
    size_t at = 0;
    for (int r = 0; r < L.world; ++r) {
      const auto lr = Layout::make(L.world, L.sp, L.ep, r);
      const Range rr = lr.rows(tok.batch), pr = lr.positions(S);
      if (counts[static_cast<size_t>(r)] != rr.size() * pr.size() * width)
        fail("gather: rank {} sent {} values, expected {} ({} rows x {} positions x {})", r,
             counts[static_cast<size_t>(r)], rr.size() * pr.size() * width, rr.size(), pr.size(), width);
      for (int64_t b = rr.begin; b < rr.end; ++b)
        for (int64_t s = pr.begin; s < pr.end; ++s, at += static_cast<size_t>(width) * sizeof(float))
          std::memcpy(full.data() + (b * S + s) * width, all.data() + at, static_cast<size_t>(width) * sizeof(float));
    }
    return full;
  }
};

}  // namespace

ShardedResult sharded_forward(const Checkpoint& ck, const TokenBatch& tokens, const Layout& layout, Communicator& world,
                              const ShardedOptions& options) {
  const auto& c = ck.config();
  if (world.size() != layout.world || world.rank() != layout.rank)
    fail("sharded forward: layout says rank {} of {}, the communicator rank {} of {}", layout.rank, layout.world,
         world.rank(), world.size());
  validate_checkpoint(ck);
  tokens.validate(c.vocab_size, ck.dir().string());
  if (layout.ep > 1 && !c.is_moe())
    fail("{}: ep {} asks to partition experts, but this {} model has none", ck.dir().string(), layout.ep,
         lineage_name(c.lineage));
  auto sp_comm = world.split(layout.dp_rank(), layout.sp_rank());
  auto ep_comm = world.split(layout.ep_group(), layout.ep_rank());
  if (sp_comm->size() != layout.sp || ep_comm->size() != layout.ep)
    fail("sharded forward: sp group has {} ranks (want {}), ep group {} (want {})", sp_comm->size(), layout.sp,
         ep_comm->size(), layout.ep);
  ShardedResult r;
  const auto cpu = [] {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  };
  const double c0 = cpu();
  const auto t0 = std::chrono::steady_clock::now();
  if (options.forward.precision == Precision::Golden)
    Sharded<double>{ck, c, tokens, layout, world, *sp_comm, *ep_comm, options, r, {}, {}, 0, 0, 0, {}, {}}.run();
  else
    Sharded<float>{ck, c, tokens, layout, world, *sp_comm, *ep_comm, options, r, {}, {}, 0, 0, 0, {}, {}}.run();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.cpu_seconds = cpu() - c0;
  r.traffic = world.traffic();
  return r;
}

}  // namespace opensci::parallel
