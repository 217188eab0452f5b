// The declarative matrix (matrix/matrix.json): models x environments x reference runs, each
// cell with an expected outcome. `emit_ctest` turns it into CTest tests:
//   toy/<model>                                  FIXTURES_SETUP toy.<model>
//   env/<env>                                    FIXTURES_SETUP env.<env>        (skip 77 = unavailable)
//   capture/<env>/<model>/<tokens>/<dtype>-<dev> FIXTURES_SETUP capture.<...>    (requires env + toy)
//   cell/<env>/<model>/<tokens>/<dtype>-<dev>/vs-<backend>-<precision>           (requires capture)
// Cells are labelled: matrix, cell, version (v5, v5.12), environment, provider, backend,
// dtype, sp<N>, ep<N>, and the model's labels (lineage, dense/moe).
#pragma once

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace opensci::harness {

struct MatrixModel {
  std::string name;
  std::filesystem::path config, remote_code;  // absolute
  uint64_t seed = 1;
  std::string toy_dtype = "f32";
  std::vector<std::string> labels;
};

struct MatrixEnvironment {
  std::string name;
  std::string transformers;  // "5.12.1", "4.57.6", "latest", ...
  nlohmann::json spec;       // provider spec (harness/include/opensci/harness/environment.hpp)
  std::vector<std::string> shims;              // runtime shims applied in the capture process
  std::map<std::string, std::string> expect;   // model -> "pass" | "xfail:<hazard>" (overrides the cell's)
  std::vector<std::string> version_labels() const;  // "5.12.1" -> {"v5", "v5.12"}
  std::string provider() const;
};

struct ReferenceRun {
  std::string backend = "cpu";     // cpu | libtorch | cuda | hip
  std::string precision = "fp64";  // fp64 (golden) | fp32 | bf16
  std::string tolerance;
};

struct MatrixCell {
  std::string name, capture_name;
  const MatrixEnvironment* env = nullptr;
  const MatrixModel* model = nullptr;
  std::string tokens_name;
  std::filesystem::path tokens;
  std::string dtype = "float32", device = "cpu";
  ReferenceRun reference;
  int sp = 1, ep = 1;
  std::string expect = "pass";
  std::vector<std::string> labels;
};

struct Matrix {
  std::filesystem::path file, source_dir, tolerances;
  std::map<std::string, MatrixModel> models;
  std::map<std::string, MatrixEnvironment> environments;
  std::vector<MatrixCell> cells;
};

// Paths in the file are relative to the repository root (the matrix file's parent's parent).
Matrix load_matrix(const std::filesystem::path& file);

struct EmitOptions {
  std::filesystem::path cli;   // the opensci-compat binary
  std::filesystem::path work;  // toys, captures and results go here
  std::string python_dir;      // harness/python
};
std::string emit_ctest(const Matrix& matrix, const EmitOptions& options);

// Where the pieces of a cell live under the work dir.
std::filesystem::path model_dir(const EmitOptions& o, const MatrixModel& m);
std::filesystem::path capture_dir(const EmitOptions& o, const MatrixCell& c);
std::filesystem::path result_file(const EmitOptions& o, const MatrixCell& c);

}  // namespace opensci::harness
