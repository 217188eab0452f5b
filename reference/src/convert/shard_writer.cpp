#include "shard_writer.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "opensci/error.hpp"

namespace opensci::convert {
namespace {
constexpr size_t kBufferBytes = 4u << 20;  // small pieces (rows of a split matrix) are gathered here
}

ShardWriter::ShardWriter(std::filesystem::path path, std::vector<ShardEntry> entries,
                         const std::map<std::string, std::string>& metadata)
    : path_(std::move(path)), tmp_(path_.string() + ".tmp"), entries_(std::move(entries)) {
  std::sort(entries_.begin(), entries_.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  for (size_t i = 0; i < entries_.size(); ++i) {
    const auto& e = entries_[i];
    if (i > 0 && entries_[i - 1].name == e.name) fail("{}: tensor '{}' declared twice in one shard", path_.string(), e.name);
    const uint64_t size = static_cast<uint64_t>(element_count(e.shape)) * dtype_size(e.dtype);
    header[e.name] = {{"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {offset, offset + size}}};
    sizes_.push_back(size);
    offset += size;
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');  // payload 8-byte aligned, as SafetensorsWriter

  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail("{}: cannot open for writing: {}", tmp_.string(), std::strerror(errno));
  buffer_.resize(kBufferBytes);
  const uint64_t len = text.size();
  raw_write(reinterpret_cast<const std::byte*>(&len), 8);
  raw_write(reinterpret_cast<const std::byte*>(text.data()), text.size());
}

ShardWriter::~ShardWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!finished_) {
    std::error_code ec;
    std::filesystem::remove(tmp_, ec);
  }
}

void ShardWriter::raw_write(const std::byte* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(fd_, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("{}: write failed: {}", tmp_.string(), std::strerror(errno));
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
}

void ShardWriter::flush() {
  if (buffered_ > 0) raw_write(buffer_.data(), buffered_);
  buffered_ = 0;
}

void ShardWriter::end_current() {
  if (in_tensor_ && remaining_ != 0)
    fail("{}: tensor '{}' got {} bytes fewer than its declared {} {} needs", path_.string(), entries_[next_ - 1].name,
         remaining_, dtype_name(entries_[next_ - 1].dtype), shape_str(entries_[next_ - 1].shape));
  in_tensor_ = false;
}

void ShardWriter::begin(const std::string& name) {
  end_current();
  if (next_ >= entries_.size() || entries_[next_].name != name)
    fail("{}: tensor '{}' written out of order (expected '{}')", path_.string(), name,
         next_ < entries_.size() ? entries_[next_].name : std::string("<end of shard>"));
  remaining_ = sizes_[next_++];
  in_tensor_ = true;
}

void ShardWriter::write(std::span<const std::byte> bytes) {
  if (!in_tensor_ || bytes.size() > remaining_)
    fail("{}: tensor '{}' got more bytes than its shape needs", path_.string(),
         next_ > 0 ? entries_[next_ - 1].name : std::string("<none>"));
  remaining_ -= bytes.size();
  total_ += bytes.size();
  if (bytes.size() >= buffer_.size() / 2) {  // large: straight to the file
    flush();
    raw_write(bytes.data(), bytes.size());
    return;
  }
  if (buffered_ + bytes.size() > buffer_.size()) flush();
  std::memcpy(buffer_.data() + buffered_, bytes.data(), bytes.size());
  buffered_ += bytes.size();
}

void ShardWriter::finish() {
  end_current();
  if (next_ != entries_.size())
    fail("{}: shard finished with {} of {} tensors written (next: '{}')", path_.string(), next_, entries_.size(),
         entries_[next_].name);
  flush();
  if (::close(fd_) != 0) {
    fd_ = -1;
    fail("{}: close failed: {}", tmp_.string(), std::strerror(errno));
  }
  fd_ = -1;
  std::filesystem::rename(tmp_, path_);
  finished_ = true;
}

}  // namespace opensci::convert
