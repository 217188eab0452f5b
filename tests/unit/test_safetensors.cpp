#include <cstring>

#include "opensci/error.hpp"
#include "opensci/safetensors.hpp"
#include "test_helpers.hpp"

using namespace opensci;
using opensci::test::ScratchDir;

namespace {

std::filesystem::path write_sample(const ScratchDir& dir) {
  SafetensorsWriter w;
  const std::vector<float> a{1.f, -2.f, 3.5f, 0.25f, 8.f, -0.f};
  const std::vector<int64_t> ids{7, 8, 9};
  w.add_f32("b.weight", {2, 3}, a);
  w.add_i64("a.ids", {3}, ids);
  w.set_metadata("format", "pt");
  const auto p = dir / "sample.safetensors";
  w.write(p);
  return p;
}

// Rewrites the header of a valid file with `header` (keeps the payload).
std::filesystem::path with_header(const ScratchDir& dir, const std::filesystem::path& src, const std::string& header) {
  const auto bytes = opensci::test::read_text(src);
  uint64_t old_len;
  std::memcpy(&old_len, bytes.data(), 8);
  const std::string payload = bytes.substr(8 + old_len);
  std::string out(8, '\0');
  const uint64_t len = header.size();
  std::memcpy(out.data(), &len, 8);
  out += header + payload;
  const auto p = dir / "edited.safetensors";
  opensci::test::write_text(p, out);
  return p;
}

}  // namespace

TEST_CASE("safetensors round trip keeps names and shapes and values and metadata") {
  ScratchDir dir("st");
  const SafetensorsFile f(write_sample(dir));
  REQUIRE(f.tensors().size() == 2);
  CHECK(f.tensors()[0].name == "a.ids");  // sorted by name
  CHECK(f.at("b.weight").shape == std::vector<int64_t>{2, 3});
  CHECK(f.read_f32("b.weight") == std::vector<float>{1.f, -2.f, 3.5f, 0.25f, 8.f, -0.f});
  CHECK(f.view_f32("b.weight")[2] == 3.5f);
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.at("b.weight").begin % 8 == 0);  // payload aligned for zero-copy views
}

TEST_CASE("safetensors writer is deterministic") {
  ScratchDir dir("st");
  const auto p1 = write_sample(dir);
  const auto first = opensci::test::read_text(p1);
  const auto second = opensci::test::read_text(write_sample(dir));
  CHECK(first == second);
}

TEST_CASE("truncated safetensors file is rejected naming file and tensor") {
  ScratchDir dir("st");
  const auto p = write_sample(dir);
  auto bytes = opensci::test::read_text(p);
  opensci::test::write_text(dir / "cut.safetensors", bytes.substr(0, bytes.size() - 5));
  REQUIRE_ERROR_MENTIONS(SafetensorsFile(dir / "cut.safetensors"), "cut.safetensors", "truncated", "b.weight");
  opensci::test::write_text(dir / "tiny.safetensors", bytes.substr(0, 5));
  REQUIRE_ERROR_MENTIONS(SafetensorsFile(dir / "tiny.safetensors"), "tiny.safetensors", "truncated");
  opensci::test::write_text(dir / "nohdr.safetensors", bytes.substr(0, 20));
  REQUIRE_ERROR_MENTIONS(SafetensorsFile(dir / "nohdr.safetensors"), "nohdr.safetensors", "header claims");
}

TEST_CASE("malformed safetensors headers are rejected with the reason") {
  ScratchDir dir("st");
  const auto p = write_sample(dir);
  REQUIRE_ERROR_MENTIONS(SafetensorsFile(with_header(dir, p, "{not json")), "edited.safetensors", "not JSON");
  REQUIRE_ERROR_MENTIONS(SafetensorsFile(with_header(dir, p, R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})")),
                         "'x'", "[2]", "needs 8 bytes");
  REQUIRE_ERROR_MENTIONS(SafetensorsFile(with_header(dir, p, R"({"x": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}})")),
                         "'x'", "Q4");
  REQUIRE_ERROR_MENTIONS(SafetensorsFile(with_header(dir, p, R"({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})")),
                         "'x'", "negative");
  REQUIRE_ERROR_MENTIONS(SafetensorsFile(with_header(dir, p, R"({"x": {"dtype": "F32", "shape": [1]}})")), "'x'",
                         "data_offsets");
  REQUIRE_ERROR_MENTIONS(
      SafetensorsFile(with_header(dir, p,
                                  R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                      "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})")),
      "overlap");
}

TEST_CASE("reading checks shapes and dtypes") {
  ScratchDir dir("st");
  const SafetensorsFile f(write_sample(dir));
  REQUIRE_ERROR_MENTIONS(f.read_f32("b.weight", {3, 2}), "sample.safetensors", "'b.weight'", "[2, 3]", "[3, 2]");
  REQUIRE_ERROR_MENTIONS(f.read_f32("a.ids"), "'a.ids'", "I64");
  REQUIRE_ERROR_MENTIONS(f.at("missing"), "sample.safetensors", "'missing'", "not found");
}

TEST_CASE("a range of a tensor is read converted, and a range past its end names file, tensor and shape") {
  ScratchDir dir("st");
  SafetensorsWriter w;
  const std::vector<float> a{1.f, -2.f, 3.5f, 0.25f, 8.f, -0.5f};
  std::vector<std::byte> bf(a.size() * 2);
  for (size_t i = 0; i < a.size(); ++i) {
    const uint16_t v = f32_to_bf16(a[i]);
    std::memcpy(bf.data() + i * 2, &v, 2);
  }
  w.add_f32("f.weight", {2, 3}, a);
  w.add("h.weight", DType::BF16, {3, 2}, bf);
  w.write(dir / "range.safetensors");
  const SafetensorsFile f(dir / "range.safetensors");
  CHECK(f.read_f32_range("f.weight", 2, 3) == std::vector<float>{3.5f, 0.25f, 8.f});
  CHECK(f.read_f64_range("h.weight", 4, 2) == std::vector<double>{8.0, -0.5});  // exact in bf16
  CHECK(f.read_f32_range("h.weight", 6, 0).empty());
  REQUIRE_ERROR_MENTIONS(f.read_f32_range("f.weight", 4, 3), "range.safetensors", "'f.weight'", "[2, 3]", "[4, 7)",
                         "6 elements");
  REQUIRE_ERROR_MENTIONS(f.read_f64_range("h.weight", -1, 2), "'h.weight'", "out of range");
}

TEST_CASE("bf16 and f16 conversions") {
  CHECK(bf16_to_f32(f32_to_bf16(1.0f)) == 1.0f);
  CHECK(bf16_to_f32(f32_to_bf16(-3.140625f)) == -3.140625f);
  CHECK(f32_to_bf16(1.00390625f) == 0x3f80);  // halfway 1 + 2^-8 rounds to even (1.0)
  CHECK(f32_to_bf16(1.01171875f) == 0x3f82);  // halfway 1 + 3*2^-8 rounds to even (1 + 2^-6)
  CHECK(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
  CHECK(f16_to_f32(0x3c00) == 1.0f);
  CHECK(f16_to_f32(0xc000) == -2.0f);
  CHECK(f16_to_f32(0x0001) == Approx(5.960464477539063e-08));
  CHECK(std::isinf(f16_to_f32(0x7c00)));
}
