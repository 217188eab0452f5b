// Internal to the converter: writes one safetensors shard while its tensors are produced.
// The header (names, dtypes, shapes, offsets) is known up front, so payload bytes go straight
// to the file in name order; nothing of the shard is held in memory. The file is written
// under a temporary name and renamed when every declared byte has arrived. The bytes are the
// same as SafetensorsWriter's for the same tensors (sorted names, header padded to 8 bytes).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "opensci/safetensors.hpp"

namespace opensci::convert {

struct ShardEntry {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
};

class ShardWriter {
 public:
  // `entries` in any order; they are written sorted by name.
  ShardWriter(std::filesystem::path path, std::vector<ShardEntry> entries,
              const std::map<std::string, std::string>& metadata);
  ~ShardWriter();  // removes the temporary file unless finish() succeeded
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  const std::vector<ShardEntry>& entries() const { return entries_; }  // sorted: the write order
  // Starts the next tensor; its name must be the next in order.
  void begin(const std::string& name);
  void write(std::span<const std::byte> bytes);  // appends to the current tensor
  void finish();                                 // checks every byte arrived, renames into place
  uint64_t payload_bytes() const { return total_; }

 private:
  void end_current();
  void flush();
  void raw_write(const std::byte* data, size_t size);

  std::filesystem::path path_, tmp_;
  std::vector<ShardEntry> entries_;
  std::vector<uint64_t> sizes_;
  int fd_ = -1;
  size_t next_ = 0;           // index of the next tensor to begin
  uint64_t remaining_ = 0;    // bytes still owed to the current tensor
  uint64_t total_ = 0;
  bool in_tensor_ = false, finished_ = false;
  std::vector<std::byte> buffer_;
  size_t buffered_ = 0;
};

}  // namespace opensci::convert
