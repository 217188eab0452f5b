// Diagnosis: from evidence in a capture (provenance, error report, loaded state dict,
// per-position and per-layer differences) to the hazards of the hazard table
// (matrix/hazards.json, harness/include/opensci/harness/hazards.hpp).
//
// Every finding cites what was measured and says on what basis it names a hazard:
//   evidence  a measured fact that names the hazard on its own: the exception matches the
//             hazard's signature, the loaded state dict shows its damage (garbage inv_freq,
//             re-initialised norms, an untied head), the provenance shows its dtype;
//   pattern   a numeric pattern that is only consistent with a hazard (position 0 exact and
//             later positions off: some RoPE fault). Patterns never confirm an expected failure;
//   note      context (first divergent layer, libtorch vs reference).
// Evidence detectors have stable names (the hazard table maps them to hazards):
//   inv_freq_garbage, inv_freq_wrong_theta, loaded_params_reinitialised, lm_head_untied,
//   effective_dtype_differs; consistency checks: position0_matches, hidden_states_match.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "opensci/checkpoint.hpp"
#include "opensci/harness/compare.hpp"
#include "opensci/harness/hazards.hpp"

namespace opensci::harness {

struct Finding {
  std::string hazard;    // "H3", ... or "" when it names no known hazard
  std::string title;     // short: "RoPE inv_freq is not initialised"
  std::string evidence;  // what was measured
  std::string basis = "note";  // "evidence" | "pattern" | "note"
  std::string detector;        // evidence detector name, "" for patterns and notes
  // inv_freq_garbage only: some entries are non-finite or so large that position x inv_freq
  // overflows fp32 (NaN/Inf keys, which reach even position 0 through the masked scores).
  bool overflows_fp32 = false;
};

struct Diagnosis {
  std::vector<Finding> findings;
  // Distinct hazards named by evidence, in finding order: what the verdict relies on.
  std::vector<std::string> hazards() const;
  // Hazards named only by patterns (suspects, never a confirmation).
  std::vector<std::string> suspects() const;
  std::optional<std::string> hazard() const;  // the first of hazards()
  nlohmann::json to_json() const;             // {hazard, hazards, suspects, findings: [...]}
};

// An exception raised in the capture process (error.json: stage, type, message, traceback):
// one evidence finding per hazard whose signature matches (two = ambiguous), else a note.
std::vector<Finding> diagnose_error(const HazardTable& table, const std::string& stage, const std::string& type,
                                    const std::string& message, const std::string& traceback);

// Parameters after loading (state_dict.safetensors) against the checkpoint: re-initialised or
// overwritten weights (H8), an untied head (H5), garbage or wrong-theta inv_freq (H3, H7).
std::vector<Finding> diagnose_loaded_weights(const HazardTable& table, const Checkpoint& checkpoint,
                                             const std::filesystem::path& state_dict,
                                             const std::string& capture_dtype);

// Provenance (effective dtype: H6, evidence) and the numeric pattern of a comparison (patterns).
std::vector<Finding> diagnose_comparison(const HazardTable& table, const Comparison& cmp, const Tolerance& tol,
                                         const ModelConfig& config, const nlohmann::json& provenance,
                                         const std::string& requested_dtype);

// A consistency check of hazards.json ("position0_matches", "hidden_states_match") on a failing
// comparison; false with `why` set when the failure contradicts it. Unknown names throw.
bool consistent_with(const std::string& check, const Comparison& cmp, const Tolerance& tol, std::string& why);

}  // namespace opensci::harness
