// Diagnosis: from evidence in a capture (provenance, error report, loaded state dict,
// per-position and per-layer differences) to a named hazard of ../shared/HAZARDS.md.
// Every finding cites its evidence; the verdict names a hazard only when evidence matches one.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "opensci/checkpoint.hpp"
#include "opensci/harness/compare.hpp"

namespace opensci::harness {

struct Finding {
  std::string hazard;    // "H3", ... or "" when the evidence names no known hazard
  std::string title;     // short: "RoPE inv_freq not initialised"
  std::string evidence;  // what was measured
};

struct Diagnosis {
  std::vector<Finding> findings;
  std::optional<std::string> hazard() const;  // the first finding that names a hazard
  nlohmann::json to_json() const;
};

// An exception raised in the capture process (error.json: stage, type, message) -> hazard.
std::optional<Finding> diagnose_error(const std::string& stage, const std::string& type, const std::string& message);

// Parameters after loading (state_dict.safetensors) against the checkpoint: catches
// randomly initialised or overwritten weights (H5, H8, H9) and garbage inv_freq (H3).
std::vector<Finding> diagnose_loaded_weights(const Checkpoint& checkpoint, const std::filesystem::path& state_dict,
                                             const std::string& capture_dtype);

// Numeric pattern of a comparison, plus provenance (effective dtype, H6).
std::vector<Finding> diagnose_comparison(const Comparison& cmp, const Tolerance& tol, const ModelConfig& config,
                                         const nlohmann::json& provenance, const std::string& requested_dtype);

}  // namespace opensci::harness
