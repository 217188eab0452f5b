// A stand-in GPU test for tests/dashboard/check_resource_groups.py: selects its device exactly as
// the GPU tests do (opensci::gpu::select_gpu_from_environment, from the variables CTest sets for
// RESOURCE_GROUPS), holds it for a while, and records what it got and when:
//   gpu_select_probe <visible devices> <log dir> <hold seconds>
// writes <log dir>/<pid>.json {"device", "from_ctest", "source", "start", "end"}; a malformed or
// impossible allocation prints FAIL and exits 1.
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>

#include "opensci/gpu/resource_groups.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    fmt::print(stderr, "usage: gpu_select_probe <visible devices> <log dir> <hold seconds>\n");
    return 2;
  }
  const auto now = [] {
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  };
  const double start = now();
  opensci::gpu::GpuSelection s;
  try {
    s = opensci::gpu::select_gpu_from_environment(std::atoi(argv[1]));
  } catch (const std::exception& e) {
    fmt::print("FAIL gpu_select_probe: {}\n", e.what());
    return 1;
  }
  fmt::print("device {} ({})\n", s.device, s.source);
  std::this_thread::sleep_for(std::chrono::duration<double>(std::atof(argv[3])));
  std::ofstream(fmt::format("{}/{}.json", argv[2], getpid()))
      << fmt::format(R"({{"device": {}, "from_ctest": {}, "source": "{}", "start": {:.6f}, "end": {:.6f}}})", s.device,
                     s.from_ctest ? "true" : "false", s.source, start, now())
      << "\n";
  return 0;
}
