// SHA-256 (FIPS 180-4) of bytes and files, as lower-case hex: golden fixtures record the hash of
// every file they hold, and a replay checks them before trusting the capture.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

namespace opensci::harness {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  std::string hex();  // finishes the hash; the object is spent afterwards

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buffered_ = 0;
  uint64_t bytes_ = 0;
};

std::string sha256_hex(std::string_view bytes);
std::string sha256_file(const std::filesystem::path& file);  // throws opensci::Error when unreadable

}  // namespace opensci::harness
