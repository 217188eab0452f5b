// `convert`: streaming checkpoint conversion between hf-per-expert, hf-fused and megatron
// layouts (reference/include/opensci/convert.hpp describes the formats and guarantees).
#include <fmt/core.h>
#include <fmt/ranges.h>

#include <memory>

#include "commands.hpp"
#include "opensci/convert.hpp"
#include "opensci/error.hpp"

namespace opensci::cli {
namespace {

// "512M", "2G", "1048576" -> bytes
uint64_t parse_size(const std::string& text) {
  if (text.empty()) fail("--max-shard-size: empty size");
  size_t used = 0;
  unsigned long long value = 0;
  try {
    value = std::stoull(text, &used);
  } catch (const std::exception&) {
    fail("--max-shard-size: '{}' is not a size (examples: 1048576, 512M, 2G)", text);
  }
  const auto suffix = text.substr(used);
  uint64_t scale = 1;
  if (suffix == "K" || suffix == "KB") scale = 1ull << 10;
  else if (suffix == "M" || suffix == "MB") scale = 1ull << 20;
  else if (suffix == "G" || suffix == "GB") scale = 1ull << 30;
  else if (!suffix.empty()) fail("--max-shard-size: unknown unit '{}' in '{}' (use K, M or G)", suffix, text);
  return value * scale;
}

}  // namespace

void add_convert_command(CLI::App& app) {
  struct Args {
    convert::ConvertOptions options;
    std::string to = "hf-fused", experts = "sequential", max_shard, fused_input = "auto";
  };
  auto a = std::make_shared<Args>();
  auto* cmd = app.add_subcommand(
      "convert",
      "Convert a checkpoint between hf-per-expert, hf-fused (transformers 5.x MoE layout) and megatron (TP ranks); "
      "streams shard by shard, bit-exact");
  cmd->add_option("--in", a->options.input, "input model directory (HF, or Megatron with mp_rank_XX/)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--out", a->options.output, "output directory (created; must be new or empty)")->required();
  cmd->add_option("--to", a->to, "output format")
      ->check(CLI::IsMember({"hf-per-expert", "hf-fused", "megatron"}))
      ->required();
  cmd->add_option("--tp", a->options.tp, "tensor-parallel size of a megatron output")->check(CLI::PositiveNumber);
  cmd->add_option("--megatron-experts", a->experts,
                  "expert naming of a megatron output: sequential (local_experts.{j}.linear_fc1) or grouped "
                  "(linear_fc1.weight{j})")
      ->check(CLI::IsMember({"sequential", "grouped"}));
  cmd->add_option("--config", a->options.config, "HF config.json (default: <in>/config.json)")
      ->check(CLI::ExistingFile);
  cmd->add_option("--fused-input", a->fused_input,
                  "layout of fused expert tensors in the input: auto (by shape), v5 [E,2I,H] or transposed [E,H,2I]; "
                  "needed only when 2I == H or I == H")
      ->check(CLI::IsMember({"auto", "v5", "transposed"}));
  cmd->add_option("--max-shard-size", a->max_shard,
                  "split an output shard above this size (e.g. 512M); default: one output shard per input shard");
  cmd->callback([a] {
    a->options.to = convert::format_from_name(a->to);
    a->options.megatron_experts =
        a->experts == "grouped" ? convert::MegatronExperts::Grouped : convert::MegatronExperts::Sequential;
    if (!a->max_shard.empty()) a->options.max_shard_bytes = parse_size(a->max_shard);
    a->options.fused_input = a->fused_input == "v5"           ? convert::FusedInput::V5
                             : a->fused_input == "transposed" ? convert::FusedInput::Transposed
                                                              : convert::FusedInput::Auto;
    const auto r = convert::convert_checkpoint(a->options);
    fmt::print("converted {} -> {}: {} -> {}\n", a->options.input.string(), a->options.output.string(), r.from, r.to);
    fmt::print("  input:  {} tensors, {} bytes, {} shard file(s), tp {}\n", r.input_tensors, r.input_bytes,
               r.input_shards, r.input_tp);
    fmt::print("  output: {} tensors, {} bytes, {} shard file(s), tp {}\n", r.output_tensors, r.output_bytes,
               r.output_shards, r.output_tp);
    for (const auto& n : r.notes) fmt::print("  note: {}\n", n);
    for (const auto& d : r.dropped) fmt::print("  dropped: {}\n", d);
  });
}

}  // namespace opensci::cli
