// system: an existing interpreter used as-is (e.g. /usr/bin/python3 or /opt/torch/.venv/bin/python).
// Nothing is built; versions are discovered by running it at every realise().
#include <fmt/core.h>
#include <unistd.h>

#include "opensci/error.hpp"
#include "providers.hpp"

namespace opensci::harness::detail {
namespace fs = std::filesystem;
namespace {

class SystemProvider final : public EnvironmentProvider {
 public:
  explicit SystemProvider(const nlohmann::json& spec) {
    SpecReader r(spec, "system");
    r.check_keys({"python"});
    given_ = r.required_str("python");
    if (const auto found = find_host_program(given_)) python_ = fs::absolute(*found);
  }

  std::string kind() const override { return "system"; }
  std::string id() const override { return "system-" + sanitize_id(python_.empty() ? given_ : python_.string()); }
  nlohmann::json request() const override {
    return {{"provider", "system"}, {"python", python_.empty() ? given_ : python_.string()}};
  }

  Availability probe() const override {
    if (python_.empty())
      return Availability::no(given_.find('/') != std::string::npos
                                  ? fmt::format("interpreter {} does not exist or is not executable", given_)
                                  : fmt::format("interpreter '{}' not found in PATH or the sbin/bin dirs", given_));
    return Availability::yes(fmt::format("interpreter {} (used as-is)", python_.string()), true);
  }

  Environment realise(Progress& progress) override {
    const auto a = probe();
    if (!a) fail("environment {} is unavailable: {}", id(), a.reason);
    Environment env;
    env.provider = kind();
    env.id = id();
    env.python_exe = python_;  // not resolved: a venv's bin/python must be run through its own path
    env.root = python_.parent_path().parent_path();
    env.path_var = python_.parent_path().string() + ":/usr/local/bin:/usr/bin:/bin";
    discover_versions(env);
    progress.note("discovered: " + env.summary());
    return env;
  }

 private:
  std::string given_;
  fs::path python_;
};

}  // namespace

std::unique_ptr<EnvironmentProvider> make_system_provider(const nlohmann::json& spec) {
  return std::make_unique<SystemProvider>(spec);
}

}  // namespace opensci::harness::detail
