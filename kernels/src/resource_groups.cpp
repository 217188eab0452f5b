#include "opensci/gpu/resource_groups.hpp"

#include <fmt/format.h>

#include <cctype>
#include <charconv>
#include <cstdlib>

#include "opensci/error.hpp"

namespace opensci::gpu {
namespace {

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  size_t start = 0;
  while (true) {
    const size_t end = s.find(sep, start);
    out.push_back(s.substr(start, end == std::string_view::npos ? std::string_view::npos : end - start));
    if (end == std::string_view::npos) return out;
    start = end + 1;
  }
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

std::optional<int> to_int(std::string_view s) {
  int v = 0;
  const auto* end = s.data() + s.size();
  const auto r = std::from_chars(s.data(), end, v);
  if (s.empty() || r.ec != std::errc() || r.ptr != end || v < 0) return std::nullopt;
  return v;
}

}  // namespace

std::vector<ResourceAllocation> parse_resource_allocations(std::string_view value, std::string_view variable) {
  std::vector<ResourceAllocation> out;
  for (auto item : split(value, ';')) {
    item = trim(item);
    if (item.empty()) continue;
    ResourceAllocation a;
    bool has_id = false, has_slots = false;
    for (auto field : split(item, ',')) {
      field = trim(field);
      const auto colon = field.find(':');
      const auto key = trim(field.substr(0, colon));
      const auto val = colon == std::string_view::npos ? std::string_view() : trim(field.substr(colon + 1));
      if (key == "id" && !val.empty()) {
        a.id = std::string(val);
        has_id = true;
      } else if (key == "slots" && to_int(val)) {
        a.slots = *to_int(val);
        has_slots = true;
      } else {
        fail("{}='{}': cannot read '{}' (expected id:<id>,slots:<n> per allocation, ';' between allocations)", variable,
             value, field);
      }
    }
    if (!has_id || !has_slots)
      fail("{}='{}': allocation '{}' lacks {} (expected id:<id>,slots:<n>)", variable, value, item,
           has_id ? "slots" : "id");
    out.push_back(a);
  }
  return out;
}

GpuSelection select_gpu(const EnvLookup& env, int device_count) {
  const auto count_text = env("CTEST_RESOURCE_GROUP_COUNT");
  if (!count_text) {
    if (const auto manual = env("OPENSCI_GPU_DEVICE")) {
      const auto d = to_int(trim(*manual));
      if (!d) fail("OPENSCI_GPU_DEVICE='{}' is not a device index", *manual);
      if (*d >= device_count)
        fail("OPENSCI_GPU_DEVICE={} but the runtime sees {} device(s) (indices 0..{})", *d, device_count,
             device_count - 1);
      return {*d, false, fmt::format("OPENSCI_GPU_DEVICE={}", *d)};
    }
    return {0, false, "default device 0 (no CTest resource allocation)"};
  }
  const auto groups = to_int(trim(*count_text));
  if (!groups) fail("CTEST_RESOURCE_GROUP_COUNT='{}' is not a count", *count_text);
  for (int g = 0; g < *groups; ++g) {
    const auto types_var = fmt::format("CTEST_RESOURCE_GROUP_{}", g);
    const auto types = env(types_var);
    if (!types) fail("CTEST_RESOURCE_GROUP_COUNT={} but {} is not set", *groups, types_var);
    bool has_gpus = false;
    for (auto t : split(*types, ',')) has_gpus = has_gpus || trim(t) == "gpus";
    if (!has_gpus) continue;
    const auto var = types_var + "_GPUS";
    const auto value = env(var);
    if (!value) fail("{}={} names 'gpus' but {} is not set", types_var, *types, var);
    const auto allocations = parse_resource_allocations(*value, var);
    if (allocations.empty()) fail("{}='{}' allocates no GPU", var, *value);
    const auto device = to_int(allocations.front().id);
    if (!device)
      fail(
          "{}='{}': GPU id '{}' is not a device index (the resource spec file's gpu ids must be runtime device "
          "ordinals 0, 1, ...)",
          var, *value, allocations.front().id);
    if (*device >= device_count)
      fail(
          "{}='{}': CTest allocated GPU {} but the runtime sees {} device(s): the resource spec file lists GPUs this "
          "machine (or CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES) does not have",
          var, *value, *device, device_count);
    return {*device, true, fmt::format("{}={}", var, *value)};
  }
  return {0, false, fmt::format("default device 0 (CTest allocated {} resource group(s), none of type gpus)", *groups)};
}

GpuSelection select_gpu_from_environment(int device_count) {
  return select_gpu(
      [](const std::string& name) -> std::optional<std::string> {
        const char* v = std::getenv(name.c_str());
        if (v == nullptr) return std::nullopt;
        return std::string(v);
      },
      device_count);
}

}  // namespace opensci::gpu
