// GPU selection from CTest's resource allocation, with fake allocations (no GPU needed): the
// variables CTest sets for a test with RESOURCE_GROUPS "gpus:1" map to the device it must use.
#include <map>

#include "opensci/error.hpp"
#include "opensci/gpu/resource_groups.hpp"
#include "opensci/harness/capture.hpp"
#include "test_helpers.hpp"

using namespace opensci::gpu;

namespace {

EnvLookup fake(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

}  // namespace

TEST_CASE("resource allocations parse as CTest writes them") {
  const auto one = parse_resource_allocations("id:3,slots:1", "V");
  REQUIRE(one.size() == 1);
  CHECK(one[0].id == "3");
  CHECK(one[0].slots == 1);
  const auto two = parse_resource_allocations("id:0,slots:2;id:gpu-b,slots:1;", "V");
  REQUIRE(two.size() == 2);
  CHECK(two[1].id == "gpu-b");
  CHECK(two[1].slots == 1);
  CHECK(parse_resource_allocations("", "V").empty());
  REQUIRE_ERROR_MENTIONS(parse_resource_allocations("id:3", "CTEST_RESOURCE_GROUP_0_GPUS"),
                         "CTEST_RESOURCE_GROUP_0_GPUS", "lacks slots");
  REQUIRE_ERROR_MENTIONS(parse_resource_allocations("id:3,slots:x", "V"), "V='id:3,slots:x'", "slots:x");
  REQUIRE_ERROR_MENTIONS(parse_resource_allocations("gpu3", "V"), "'gpu3'");
}

TEST_CASE("the GPU CTest allocated is the device a test uses") {
  const auto s = select_gpu(fake({{"CTEST_RESOURCE_GROUP_COUNT", "1"},
                                  {"CTEST_RESOURCE_GROUP_0", "gpus"},
                                  {"CTEST_RESOURCE_GROUP_0_GPUS", "id:3,slots:1"}}),
                            8);
  CHECK(s.device == 3);
  CHECK(s.from_ctest);
  CHECK(s.source == "CTEST_RESOURCE_GROUP_0_GPUS=id:3,slots:1");

  // The gpus group need not be the first, and a group may hold several resource types.
  const auto later = select_gpu(fake({{"CTEST_RESOURCE_GROUP_COUNT", "2"},
                                      {"CTEST_RESOURCE_GROUP_0", "licenses"},
                                      {"CTEST_RESOURCE_GROUP_0_LICENSES", "id:l0,slots:1"},
                                      {"CTEST_RESOURCE_GROUP_1", "mem,gpus"},
                                      {"CTEST_RESOURCE_GROUP_1_MEM", "id:m,slots:4"},
                                      {"CTEST_RESOURCE_GROUP_1_GPUS", "id:6,slots:1"}}),
                                8);
  CHECK(later.device == 6);
  CHECK(later.from_ctest);

  // CTest's allocation wins over the manual override.
  CHECK(select_gpu(fake({{"CTEST_RESOURCE_GROUP_COUNT", "1"},
                         {"CTEST_RESOURCE_GROUP_0", "gpus"},
                         {"CTEST_RESOURCE_GROUP_0_GPUS", "id:1,slots:1"},
                         {"OPENSCI_GPU_DEVICE", "5"}}),
                   8)
            .device == 1);
}

TEST_CASE("without a CTest allocation: OPENSCI_GPU_DEVICE, else device 0") {
  const auto none = select_gpu(fake({}), 2);
  CHECK(none.device == 0);
  CHECK_FALSE(none.from_ctest);
  CHECK(none.source.find("default device 0") != std::string::npos);
  CHECK(select_gpu(fake({{"OPENSCI_GPU_DEVICE", "1"}}), 2).device == 1);
  REQUIRE_ERROR_MENTIONS(select_gpu(fake({{"OPENSCI_GPU_DEVICE", "2"}}), 2), "OPENSCI_GPU_DEVICE=2", "2 device(s)");
  REQUIRE_ERROR_MENTIONS(select_gpu(fake({{"OPENSCI_GPU_DEVICE", "one"}}), 2), "'one'");
  // Resource groups of other types only: not a GPU test.
  const auto other = select_gpu(fake({{"CTEST_RESOURCE_GROUP_COUNT", "1"}, {"CTEST_RESOURCE_GROUP_0", "licenses"}}), 2);
  CHECK(other.device == 0);
  CHECK_FALSE(other.from_ctest);
}

TEST_CASE("an allocation naming a missing or non-numeric GPU is an error, never device 0") {
  auto env = [](const std::string& gpus) {
    return fake({{"CTEST_RESOURCE_GROUP_COUNT", "1"},
                 {"CTEST_RESOURCE_GROUP_0", "gpus"},
                 {"CTEST_RESOURCE_GROUP_0_GPUS", gpus}});
  };
  REQUIRE_ERROR_MENTIONS(select_gpu(env("id:3,slots:1"), 2), "CTEST_RESOURCE_GROUP_0_GPUS='id:3,slots:1'", "GPU 3",
                         "2 device(s)");
  REQUIRE_ERROR_MENTIONS(select_gpu(env("id:gpu0,slots:1"), 2), "'gpu0' is not a device index");
  REQUIRE_ERROR_MENTIONS(select_gpu(env(""), 2), "allocates no GPU");
  REQUIRE_ERROR_MENTIONS(select_gpu(fake({{"CTEST_RESOURCE_GROUP_COUNT", "1"}}), 2),
                         "CTEST_RESOURCE_GROUP_0 is not set");
  REQUIRE_ERROR_MENTIONS(select_gpu(fake({{"CTEST_RESOURCE_GROUP_COUNT", "1"}, {"CTEST_RESOURCE_GROUP_0", "gpus"}}), 2),
                         "CTEST_RESOURCE_GROUP_0_GPUS is not set");
  REQUIRE_ERROR_MENTIONS(select_gpu(fake({{"CTEST_RESOURCE_GROUP_COUNT", "x"}}), 2), "CTEST_RESOURCE_GROUP_COUNT='x'");
}

TEST_CASE("a CUDA capture runs on the GPU CTest allocated to its test (CUDA_VISIBLE_DEVICES)") {
  using opensci::harness::capture_gpu_env;
  const auto allocated = fake({{"CTEST_RESOURCE_GROUP_COUNT", "1"},
                               {"CTEST_RESOURCE_GROUP_0", "gpus"},
                               {"CTEST_RESOURCE_GROUP_0_GPUS", "id:5,slots:1"}});
  std::string why;
  const auto env = capture_gpu_env("cuda", allocated, &why);
  CHECK(env.at("CUDA_VISIBLE_DEVICES") == "5");
  CHECK(env.at("HIP_VISIBLE_DEVICES") == "5");
  CHECK(why == "CTEST_RESOURCE_GROUP_0_GPUS=id:5,slots:1");
  // CPU captures are untouched, and without an allocation the capture sees every GPU.
  CHECK(capture_gpu_env("cpu", allocated).empty());
  CHECK(capture_gpu_env("cuda", fake({})).empty());
  CHECK(capture_gpu_env("cuda", fake({{"OPENSCI_GPU_DEVICE", "2"}})).at("CUDA_VISIBLE_DEVICES") == "2");
  // A malformed allocation, or an explicit other device beside an allocation, is an error.
  REQUIRE_ERROR_MENTIONS(capture_gpu_env("cuda", fake({{"CTEST_RESOURCE_GROUP_COUNT", "1"},
                                                         {"CTEST_RESOURCE_GROUP_0", "gpus"},
                                                         {"CTEST_RESOURCE_GROUP_0_GPUS", "id:x,slots:1"}})),
                         "CTEST_RESOURCE_GROUP_0_GPUS", "not a device index");
  REQUIRE_ERROR_MENTIONS(capture_gpu_env("cuda:1", allocated), "cuda:1", "ask for 'cuda'");
}
