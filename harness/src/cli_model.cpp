// `toy` and `forward`: deterministic checkpoints and the reference forward pass.
#include <fmt/core.h>

#include <map>
#include <memory>
#include <sstream>

#include "commands.hpp"
#include "opensci/error.hpp"
#include "opensci/forward.hpp"
#include "opensci/harness/backends.hpp"
#include "opensci/harness/toy.hpp"

namespace opensci::cli {
namespace {

std::vector<int64_t> parse_token_list(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      ids.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      fail("--tokens: '{}' is not an integer token id", item);
    }
  }
  if (ids.empty()) fail("--tokens: no token ids given");
  return ids;
}

}  // namespace

void add_toy_command(CLI::App& app) {
  auto toy = std::make_shared<harness::ToyOptions>();
  auto dtype = std::make_shared<std::string>("f32");
  auto* cmd = app.add_subcommand("toy", "Write a deterministic toy checkpoint for a config");
  cmd->add_option("--config", toy->config, "HF config.json")->required()->check(CLI::ExistingFile);
  cmd->add_option("--seed", toy->seed, "seed")->required();
  cmd->add_option("--out", toy->out, "output model directory")->required();
  cmd->add_option("--remote-code", toy->remote_code, "directory whose *.py files are copied next to the config");
  cmd->add_option("--dtype", *dtype, "checkpoint dtype")->check(CLI::IsMember({"f32", "bf16"}));
  cmd->callback([toy, dtype] {
    toy->dtype = *dtype == "bf16" ? DType::BF16 : DType::F32;
    harness::build_toy(*toy);
    fmt::print("wrote {}/config.json and model.safetensors (seed {})\n", toy->out.string(), toy->seed);
  });
}

void add_forward_command(CLI::App& app) {
  struct Args {
    std::string model, tokens, tokens_file, dtype = "fp64", out, backend = "cpu", defect;
    bool hidden = false;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand("forward", "Run the C++ reference forward pass");
  cmd->add_option("--model", a->model, "model directory")->required();
  auto* tok = cmd->add_option("--tokens", a->tokens, "comma-separated token ids (one row)");
  cmd->add_option("--tokens-file", a->tokens_file, "JSON with input_ids, attention_mask[, position_ids]")->excludes(tok);
  cmd->add_option("--dtype", a->dtype, "fp64 (golden), fp32 (fast) or bf16 (fast with bf16 storage; also libtorch/cuda/hip)")
      ->check(CLI::IsMember({"fp64", "fp32", "bf16"}));
  cmd->add_option("--backend", a->backend,
                  "cpu (the reference), libtorch, cuda or hip: those built into this binary (see kernels/README.md)");
  cmd->add_option("--out", a->out, "output safetensors")->required();
  cmd->add_flag("--hidden-states", a->hidden, "also write per-layer tensors");
  cmd->add_option("--inject-defect", a->defect,
                  "mutation tests only: drop-bias:<tensor>, theta-x2, skip-qk-norm, swap-rope-halves");
  cmd->callback([a] {
    if (a->tokens.empty() == a->tokens_file.empty()) fail("forward: give --tokens or --tokens-file");
    const auto batch =
        a->tokens_file.empty() ? TokenBatch::from_list(parse_token_list(a->tokens)) : TokenBatch::from_json_file(a->tokens_file);
    const Checkpoint ck(a->model);
    const auto result = harness::run_reference(a->backend, ck, batch, a->dtype, a->hidden, a->defect);
    std::map<std::string, std::string> metadata{
        {"producer", "opensci-compat reference"}, {"dtype", a->dtype}, {"backend", a->backend}};
    if (a->backend == "cpu") metadata["device"] = "cpu";
    write_forward_result(result, batch, a->out, metadata);
    fmt::print("wrote {} (logits [{}, {}, {}])\n", a->out, result.batch, result.seq, result.vocab);
  });
}

}  // namespace opensci::cli
