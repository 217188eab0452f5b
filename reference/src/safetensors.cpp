#include "opensci/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "opensci/error.hpp"

namespace opensci {
namespace {

constexpr size_t kMaxHeaderBytes = 100u << 20;  // the format's own limit (100 MB)

struct DTypeRow {
  DType dtype;
  std::string_view name;
  size_t size;
};
constexpr DTypeRow kDTypes[] = {
    {DType::F64, "F64", 8}, {DType::F32, "F32", 4}, {DType::F16, "F16", 2},  {DType::BF16, "BF16", 2},
    {DType::I64, "I64", 8}, {DType::I32, "I32", 4}, {DType::I16, "I16", 2},  {DType::I8, "I8", 1},
    {DType::U8, "U8", 1},   {DType::BOOL, "BOOL", 1},
};

// Elements [first, first + count) of a tensor (flattened), converted to Out.
template <typename Out>
std::vector<Out> convert_floats(const SafetensorsFile& file, const TensorInfo& info, int64_t first, int64_t count) {
  const auto total = element_count(info.shape);
  if (first < 0 || count < 0 || first > total || count > total - first)
    fail("{}: tensor '{}' {}: elements [{}, {}) are out of range ({} elements)", file.path().string(), info.name,
         shape_str(info.shape), first, first + count, total);
  const auto bytes = file.bytes(info);
  const auto n = static_cast<size_t>(count);
  const auto at = static_cast<size_t>(first);
  std::vector<Out> out(n);
  switch (info.dtype) {
    case DType::F32:
      for (size_t i = 0; i < n; ++i) {
        float v;
        std::memcpy(&v, bytes.data() + (at + i) * 4, 4);
        out[i] = static_cast<Out>(v);
      }
      break;
    case DType::F64:
      for (size_t i = 0; i < n; ++i) {
        double v;
        std::memcpy(&v, bytes.data() + (at + i) * 8, 8);
        out[i] = static_cast<Out>(v);
      }
      break;
    case DType::BF16:
    case DType::F16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, bytes.data() + (at + i) * 2, 2);
        out[i] = static_cast<Out>(info.dtype == DType::BF16 ? bf16_to_f32(v) : f16_to_f32(v));
      }
      break;
    default:
      fail("{}: tensor '{}' has dtype {}, expected a floating-point dtype (F32, F16, BF16, F64)",
           file.path().string(), info.name, dtype_name(info.dtype));
  }
  return out;
}

}  // namespace

std::string_view dtype_name(DType dtype) {
  for (const auto& row : kDTypes)
    if (row.dtype == dtype) return row.name;
  return "?";
}

DType dtype_from_name(std::string_view name) {
  for (const auto& row : kDTypes)
    if (row.name == name) return row.dtype;
  fail("unknown safetensors dtype '{}'", name);
}

size_t dtype_size(DType dtype) {
  for (const auto& row : kDTypes)
    if (row.dtype == dtype) return row.size;
  return 0;
}

int64_t element_count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open safetensors file: {}", path.string(), std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail("{}: cannot stat: {}", path.string(), std::strerror(errno));
  }
  map_size_ = static_cast<size_t>(st.st_size);
  if (map_size_ < 8) {
    ::close(fd);
    fail("{}: truncated safetensors file: {} bytes, expected at least 8 (header length)", path.string(), map_size_);
  }
  void* p = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) fail("{}: mmap failed: {}", path.string(), std::strerror(errno));
  map_ = static_cast<const std::byte*>(p);

  try {
    uint64_t header_len = 0;
    std::memcpy(&header_len, map_, 8);  // little-endian u64 by the format
    static_assert(std::endian::native == std::endian::little, "safetensors is little-endian; big-endian hosts need byte swaps");
    if (header_len > kMaxHeaderBytes || header_len > map_size_ - 8)
      fail("{}: truncated or malformed safetensors file: header claims {} bytes, file has {} bytes after the length",
           path.string(), header_len, map_size_ - 8);
    data_begin_ = 8 + header_len;
    const size_t data_size = map_size_ - data_begin_;
    const auto* h = reinterpret_cast<const char*>(map_ + 8);
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(h, h + header_len);
    } catch (const nlohmann::json::exception& e) {
      fail("{}: malformed safetensors header (not JSON): {}", path.string(), e.what());
    }
    if (!header.is_object()) fail("{}: malformed safetensors header: expected a JSON object", path.string());
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        if (!entry.is_object()) fail("{}: __metadata__ must be an object of strings", path.string());
        for (const auto& [k, v] : entry.items()) {
          if (!v.is_string()) fail("{}: __metadata__ value '{}' is not a string", path.string(), k);
          metadata_[k] = v.get<std::string>();
        }
        continue;
      }
      if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
          !entry.contains("data_offsets"))
        fail("{}: tensor '{}': header entry needs dtype, shape and data_offsets", path.string(), name);
      TensorInfo info;
      info.name = name;
      if (!entry["dtype"].is_string()) fail("{}: tensor '{}': dtype is not a string", path.string(), name);
      try {
        info.dtype = dtype_from_name(entry["dtype"].get<std::string>());
      } catch (const Error& e) {
        fail("{}: tensor '{}': {}", path.string(), name, e.what());
      }
      if (!entry["shape"].is_array()) fail("{}: tensor '{}': shape is not an array", path.string(), name);
      for (const auto& d : entry["shape"]) {
        if (!d.is_number_integer() || d.get<int64_t>() < 0)
          fail("{}: tensor '{}': shape {} has a non-integer or negative dimension", path.string(), name,
               entry["shape"].dump());
        info.shape.push_back(d.get<int64_t>());
      }
      const auto& off = entry["data_offsets"];
      if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
        fail("{}: tensor '{}': data_offsets must be two non-negative integers", path.string(), name);
      const auto b = off[0].get<uint64_t>();
      const auto e = off[1].get<uint64_t>();
      if (b > e || e > data_size)
        fail("{}: truncated or malformed safetensors file: tensor '{}' {} occupies bytes [{}, {}) but the data "
             "section has {} bytes",
             path.string(), name, shape_str(info.shape), b, e, data_size);
      const auto expected = static_cast<uint64_t>(element_count(info.shape)) * dtype_size(info.dtype);
      if (e - b != expected)
        fail("{}: tensor '{}' {} {} needs {} bytes, data_offsets give {}", path.string(), name,
             dtype_name(info.dtype), shape_str(info.shape), expected, e - b);
      info.begin = data_begin_ + b;
      info.size = e - b;
      tensors_.push_back(std::move(info));
    }
    std::sort(tensors_.begin(), tensors_.end(), [](const auto& a, const auto& b) { return a.begin < b.begin; });
    for (size_t i = 1; i < tensors_.size(); ++i)
      if (tensors_[i].begin < tensors_[i - 1].begin + tensors_[i - 1].size)
        fail("{}: malformed safetensors file: tensors '{}' and '{}' overlap", path.string(), tensors_[i - 1].name,
             tensors_[i].name);
    std::sort(tensors_.begin(), tensors_.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  } catch (...) {
    ::munmap(const_cast<std::byte*>(map_), map_size_);
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(const_cast<std::byte*>(map_), map_size_);
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)),
      map_(std::exchange(other.map_, nullptr)),
      map_size_(std::exchange(other.map_size_, 0)),
      data_begin_(other.data_begin_),
      tensors_(std::move(other.tensors_)),
      metadata_(std::move(other.metadata_)) {}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                             [](const TensorInfo& t, std::string_view n) { return t.name < n; });
  return (it != tensors_.end() && it->name == name) ? &*it : nullptr;
}

const TensorInfo& SafetensorsFile::at(std::string_view name) const {
  if (const auto* info = find(name)) return *info;
  fail("{}: tensor '{}' not found ({} tensors in file)", path_.string(), name, tensors_.size());
}

std::span<const std::byte> SafetensorsFile::bytes(const TensorInfo& info) const {
  return {map_ + info.begin, info.size};
}

void SafetensorsFile::check_shape(std::string_view name, const std::vector<int64_t>& expected) const {
  const auto& info = at(name);
  if (info.shape != expected)
    fail("{}: tensor '{}' has shape {}, expected {} from the config", path_.string(), name, shape_str(info.shape),
         shape_str(expected));
}

std::vector<float> SafetensorsFile::read_f32(std::string_view name) const {
  const auto& info = at(name);
  return convert_floats<float>(*this, info, 0, element_count(info.shape));
}
std::vector<double> SafetensorsFile::read_f64(std::string_view name) const {
  const auto& info = at(name);
  return convert_floats<double>(*this, info, 0, element_count(info.shape));
}
std::vector<float> SafetensorsFile::read_f32_range(std::string_view name, int64_t first, int64_t count) const {
  return convert_floats<float>(*this, at(name), first, count);
}
std::vector<double> SafetensorsFile::read_f64_range(std::string_view name, int64_t first, int64_t count) const {
  return convert_floats<double>(*this, at(name), first, count);
}
std::vector<float> SafetensorsFile::read_f32(std::string_view name, const std::vector<int64_t>& expected) const {
  check_shape(name, expected);
  return read_f32(name);
}
std::vector<double> SafetensorsFile::read_f64(std::string_view name, const std::vector<int64_t>& expected) const {
  check_shape(name, expected);
  return read_f64(name);
}

std::vector<int64_t> SafetensorsFile::read_i64(std::string_view name) const {
  const auto& info = at(name);
  if (info.dtype != DType::I64)
    fail("{}: tensor '{}' is {}, expected I64", path_.string(), name, dtype_name(info.dtype));
  std::vector<int64_t> out(info.size / 8);
  std::memcpy(out.data(), map_ + info.begin, info.size);
  return out;
}

std::span<const float> SafetensorsFile::view_f32(std::string_view name) const {
  const auto& info = at(name);
  if (info.dtype != DType::F32)
    fail("{}: tensor '{}' is {}, a zero-copy view needs F32", path_.string(), name, dtype_name(info.dtype));
  if (info.begin % alignof(float) != 0)
    fail("{}: tensor '{}' payload is not 4-byte aligned (offset {})", path_.string(), name, info.begin);
  return {reinterpret_cast<const float*>(map_ + info.begin), info.size / 4};
}

void SafetensorsWriter::add(std::string name, DType dtype, std::vector<int64_t> shape, std::vector<std::byte> payload) {
  const auto expected = static_cast<size_t>(element_count(shape)) * dtype_size(dtype);
  if (payload.size() != expected)
    fail("safetensors writer: tensor '{}' {} {} needs {} bytes, got {}", name, dtype_name(dtype), shape_str(shape),
         expected, payload.size());
  if (name == "__metadata__") fail("safetensors writer: '__metadata__' is reserved");
  entries_[std::move(name)] = Entry{dtype, std::move(shape), std::move(payload)};
}

void SafetensorsWriter::add_f32(std::string name, std::vector<int64_t> shape, std::span<const float> values) {
  std::vector<std::byte> payload(values.size_bytes());
  std::memcpy(payload.data(), values.data(), payload.size());
  add(std::move(name), DType::F32, std::move(shape), std::move(payload));
}

void SafetensorsWriter::add_i64(std::string name, std::vector<int64_t> shape, std::span<const int64_t> values) {
  std::vector<std::byte> payload(values.size_bytes());
  std::memcpy(payload.data(), values.data(), payload.size());
  add(std::move(name), DType::I64, std::move(shape), std::move(payload));
}

void SafetensorsWriter::write(const std::filesystem::path& path) const {
  nlohmann::json header = nlohmann::json::object();
  size_t offset = 0;
  for (const auto& [name, e] : entries_) {
    header[name] = {{"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {offset, offset + e.payload.size()}}};
    offset += e.payload.size();
  }
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  std::string text = header.dump();
  // Pad with spaces so the payload starts 8-byte aligned (zero-copy views stay aligned).
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');
  const auto tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail("{}: cannot open for writing", tmp);
    const uint64_t len = text.size();
    out.write(reinterpret_cast<const char*>(&len), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const auto& [name, e] : entries_)
      out.write(reinterpret_cast<const char*>(e.payload.data()), static_cast<std::streamsize>(e.payload.size()));
    if (!out) fail("{}: write failed", tmp);
  }
  std::filesystem::rename(tmp, path);
}

float bf16_to_f32(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  return std::bit_cast<float>(u);
}

uint16_t f32_to_bf16(float value) {
  uint32_t u = std::bit_cast<uint32_t>(value);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // keep NaN a NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp - 15 + 127) << 23) | (mant << 13);
  }
  return std::bit_cast<float>(bits);
}

}  // namespace opensci
