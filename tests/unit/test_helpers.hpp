// Shared helpers of the unit tests: scratch directories and error-message matching.
#pragma once

#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>

namespace opensci::test {

// A fresh directory under the system temp dir, removed when the test ends.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& tag) {
    path_ = std::filesystem::temp_directory_path() /
            ("opensci-test-" + tag + "-" + std::to_string(std::random_device{}()));
    std::filesystem::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

inline void write_text(const std::filesystem::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << text;
}

inline std::filesystem::path source_dir() { return OPENSCI_SOURCE_DIR; }

}  // namespace opensci::test

// REQUIRE that `expr` throws opensci::Error whose message contains every given fragment.
#define REQUIRE_ERROR_MENTIONS(expr, ...)                                                        \
  do {                                                                                           \
    bool thrown_ = false;                                                                        \
    try {                                                                                        \
      (void)(expr);                                                                              \
    } catch (const opensci::Error& e_) {                                                         \
      thrown_ = true;                                                                            \
      const std::string what_ = e_.what();                                                       \
      INFO("message: " << what_);                                                                \
      for (const std::string frag_ : {__VA_ARGS__}) CHECK(what_.find(frag_) != std::string::npos); \
    }                                                                                            \
    REQUIRE(thrown_);                                                                            \
  } while (0)
