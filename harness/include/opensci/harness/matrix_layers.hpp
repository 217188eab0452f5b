// The matrix on a user's model without editing the project: the default matrix/matrix.json with
// user layers over it, merged into one matrix JSON that load_matrix() reads like the default.
//
// Sources of layers (applied in this order):
//   - user matrix files (CMake -DOPENSCI_MATRIX_LAYERS="a.json;b.json", `run --layer`): the
//     matrix's own sections (tokens, patch_sets, environments, models, cells; paths relative
//     to the layer file), environments and patch sets merged by name (RFC 7386 merge patch),
//     cells appended, and user models:
//        "models": {"mine": {"from": "/path/dir" | "org/name[@rev]",
//                            "like": "<project model>",      cells copied from it (default: by lineage)
//                            "expect": "pass" | "like",      like: the project model's expectations too
//                            "toyify": {"layers": 3, ...},   toyify sizes (default: toyify's own)
//                            "seed": 1, "labels": [...], "patch_sets": [...], "environments": [...],
//                            "real": true}}                  the checkpoint as it is (download), no toyify
//   - models named on the command line (-DOPENSCI_MODELS="/path/a;org/name", `run --model`), as
//     {"from": <entry>} with the defaults above and `expect` from OPENSCI_MODELS_EXPECT.
// A user model runs in every environment its template ("like") runs in, with the template's
// patch sets, dtypes and reference backends, so its cells line up with the project model's in
// the report grid. Golden environments replay captures of the project's own models; a user
// model gets them only where a capture of that model was recorded (`_layers.notes` says which
// were left out). In the merged file every path is absolute.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "opensci/harness/matrix.hpp"

namespace opensci::harness {

struct MatrixLayers {
  std::filesystem::path base;                   // matrix/matrix.json
  std::vector<std::filesystem::path> layers;    // user matrix files
  std::vector<std::string> models;              // directories or ORG/NAME[@REV]
  std::string expect = "pass";                  // for `models`: "pass" | "like"
  std::string like;                             // for `models`: template model (default: by lineage)
  std::vector<std::string> patch_sets;          // for `models`: only these patch sets (empty: the template's)
  std::vector<std::string> environments;        // keep only these environments (empty: all)
  bool user_only = false;                       // only the user models' cells (`run --model`)
};

nlohmann::json merge_matrix(const MatrixLayers& layers);

// The step that builds a user model's directory (`toyify ...` or `download ...`), as CLI
// arguments, for emit_ctest and `run`. `model.build` holds {"toyify": {...}} or {"real": {...}}.
std::vector<std::string> user_model_command(const MatrixModel& model, const std::filesystem::path& out);

// A model directory holding only this file stands for a user model that cannot be had here (the
// Hub out of reach and nothing cached): patch, capture and cell report Not Run with its reason.
inline constexpr const char* kUnavailableMarker = "UNAVAILABLE";

}  // namespace opensci::harness
