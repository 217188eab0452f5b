// safetensors I/O. Reading maps the file (no copy of the payload); every header field is
// validated against the file size before any byte is touched. Writing is deterministic:
// tensors sorted by name, header keys sorted, so equal inputs give equal bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace opensci {

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

std::string_view dtype_name(DType dtype);        // safetensors spelling: "F32", "BF16", ...
DType dtype_from_name(std::string_view name);    // throws on an unknown spelling
size_t dtype_size(DType dtype);                  // bytes per element

int64_t element_count(const std::vector<int64_t>& shape);

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  size_t begin = 0;  // byte offset of the payload inside the file
  size_t size = 0;   // payload bytes
};

// A read-only, memory-mapped safetensors file.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // sorted by name
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  bool contains(std::string_view name) const { return find(name) != nullptr; }
  const TensorInfo* find(std::string_view name) const;
  const TensorInfo& at(std::string_view name) const;  // throws naming the file

  std::span<const std::byte> bytes(const TensorInfo& info) const;

  // Copies a tensor converted to float / double. Accepts F32, F16, BF16, F64 payloads.
  std::vector<float> read_f32(std::string_view name) const;
  std::vector<double> read_f64(std::string_view name) const;
  // Like the above, and checks the shape first: "file: tensor 'x' has shape [..], expected [..]".
  std::vector<float> read_f32(std::string_view name, const std::vector<int64_t>& expected) const;
  std::vector<double> read_f64(std::string_view name, const std::vector<int64_t>& expected) const;
  // Elements [first, first + count) of the flattened tensor, converted; a range past the end is
  // an error naming file, tensor and shape (a shard's slice of a tensor).
  std::vector<float> read_f32_range(std::string_view name, int64_t first, int64_t count) const;
  std::vector<double> read_f64_range(std::string_view name, int64_t first, int64_t count) const;
  // Copies an I64 tensor (token ids, masks, positions); another dtype is an error naming the file.
  std::vector<int64_t> read_i64(std::string_view name) const;
  // Zero-copy view of an F32 tensor (throws if it is stored in another dtype).
  std::span<const float> view_f32(std::string_view name) const;
  void check_shape(std::string_view name, const std::vector<int64_t>& expected) const;

 private:
  std::filesystem::path path_;
  const std::byte* map_ = nullptr;
  size_t map_size_ = 0;
  size_t data_begin_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Collects tensors and writes them as one safetensors file.
class SafetensorsWriter {
 public:
  void add(std::string name, DType dtype, std::vector<int64_t> shape, std::vector<std::byte> payload);
  void add_f32(std::string name, std::vector<int64_t> shape, std::span<const float> values);
  void add_i64(std::string name, std::vector<int64_t> shape, std::span<const int64_t> values);
  void set_metadata(std::string key, std::string value) { metadata_[std::move(key)] = std::move(value); }
  // Writes to a temporary file beside `path` and renames it: readers never see half a file.
  void write(const std::filesystem::path& path) const;

 private:
  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<std::byte> payload;
  };
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Half-precision conversions (round-to-nearest-even on the way down).
float bf16_to_f32(uint16_t bits);
uint16_t f32_to_bf16(float value);
float f16_to_f32(uint16_t bits);

}  // namespace opensci
