// Which GPU a test may use: the one CTest allocated to it. A test with RESOURCE_GROUPS "gpus:1",
// run by `ctest --resource-spec-file gpus.json -j N`, gets its allocation in the environment:
//   CTEST_RESOURCE_GROUP_COUNT=1
//   CTEST_RESOURCE_GROUP_0=gpus                  (resource types of group 0, comma-separated)
//   CTEST_RESOURCE_GROUP_0_GPUS=id:3,slots:1     (';'-separated allocations of that type)
// and must run on device 3, not on device 0 with every other test. The ids of the spec file are
// runtime device ordinals (after CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES). Without a CTest
// allocation, OPENSCI_GPU_DEVICE=<n> picks a device by hand; otherwise device 0.
//
// Plain C++ (no GPU runtime): built in every configuration, so the parsing and the selection are
// unit-tested on machines without a GPU (tests/unit/test_resource_groups.cpp).
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace opensci::gpu {

struct ResourceAllocation {
  std::string id;
  int slots = 0;
};

// "id:3,slots:1;id:5,slots:2" -> {{"3", 1}, {"5", 2}}. `variable` names the text in errors.
std::vector<ResourceAllocation> parse_resource_allocations(std::string_view value, std::string_view variable);

struct GpuSelection {
  int device = 0;
  bool from_ctest = false;  // CTest allocated it (CTEST_RESOURCE_GROUP_<n>_GPUS)
  std::string source;       // "CTEST_RESOURCE_GROUP_0_GPUS=id:3,slots:1", "OPENSCI_GPU_DEVICE=1", "default device 0"
};

using EnvLookup = std::function<std::optional<std::string>(const std::string& name)>;

// The device for this process among `device_count` visible ones. Throws opensci::Error, naming
// the variable and its value, when the allocation is malformed or names a device that is not
// there (a spec file listing more GPUs than the machine has must not silently share device 0).
GpuSelection select_gpu(const EnvLookup& env, int device_count);
// The same with the process environment (getenv).
GpuSelection select_gpu_from_environment(int device_count);

}  // namespace opensci::gpu
