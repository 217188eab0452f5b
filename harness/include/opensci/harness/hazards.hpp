// The hazard table (matrix/hazards.json): one row per transformers version hazard with its
// kind, how it shows (an exception signature, or which evidence detectors name it), and the fix
// that repairs it (runtime shims, a static patch). It is the single source for the diagnosis
// (error signatures, evidence -> hazard), for the matrix (an expected outcome must name a known
// hazard; an expected numeric failure is proven by a counterfactual capture with the fix) and
// for the patch rules and shims (each names a hazard listed here).
#pragma once

#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace opensci::harness {

struct Hazard {
  std::string id;     // "H3"
  std::string name;   // "inv-freq-garbage"
  std::string title;  // "RoPE inv_freq is not initialised"
  std::string versions, what;
  std::string kind;  // "error" (an exception stops the capture), "numeric" (wrong numbers), "dtype"
  // kind "error": the exception that shows it (type in `types`, message / traceback regexes).
  std::vector<std::string> error_types;
  std::string message_regex, traceback_regex;
  // kind "numeric" / "dtype": the evidence detectors that name it (see diagnosis.hpp), and the
  // patterns its failure must be consistent with (e.g. position 0 matching for RoPE faults).
  std::vector<std::string> evidence, consistent_with;
  std::vector<std::string> fix_shims;  // runtime shims that repair it (harness/python/shims.py)
  std::string fix_static;              // a static patch that repairs it (matrix/patches/*.json), if any

  // An expected failure with this hazard can be proven by re-running the capture with the fix.
  bool counterfactual() const { return kind == "numeric" && !fix_shims.empty(); }
};

class HazardTable {
 public:
  // Throws opensci::Error naming the file and the key for a malformed table.
  static HazardTable load(const std::filesystem::path& file);
  static std::filesystem::path default_file();  // <source dir>/matrix/hazards.json

  const std::filesystem::path& file() const { return file_; }
  const Hazard* find(const std::string& id) const;
  // Fails with "<where>: unknown hazard 'H99' (known: H1, ...; see <file>)".
  const Hazard& at(const std::string& id, const std::string& where) const;
  std::vector<std::string> ids() const;  // in table order (H1, H2, ..., H16)
  // The hazard an evidence detector names ("inv_freq_garbage" -> "H3"); "" when none.
  std::string hazard_for_evidence(const std::string& detector) const;
  // Every hazard whose exception signature matches (type and message, and traceback when the
  // signature has one).
  std::vector<std::string> error_matches(const std::string& type, const std::string& message,
                                         const std::string& traceback) const;
  // Every shim named as a fix ("kwargs-alias" -> "H1").
  std::map<std::string, std::string> fix_shims() const;

 private:
  std::filesystem::path file_;
  std::vector<Hazard> hazards_;
};

// The variant name of a counterfactual capture: "<patch set>+fix-<hazard>".
std::string counterfactual_suffix(const std::string& hazard);

}  // namespace opensci::harness
