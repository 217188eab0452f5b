// overlay: a base environment that has torch plus a transformers source tree (its src/ dir) or a
// directory of wheels (extracted into the cache entry) put FIRST on PYTHONPATH, with optional
// extra dirs for pure-Python dependencies (e.g. a 0.x huggingface_hub). This is how a
// development snapshot of transformers is tested. Versions are discovered at every realise(),
// since a source tree changes under us.
#include <fmt/core.h>
#include <fmt/format.h>
#include <sys/stat.h>

#include <algorithm>

#include "opensci/error.hpp"
#include "providers.hpp"

namespace opensci::harness::detail {
namespace fs = std::filesystem;
namespace {

constexpr int kRecipe = 1;

class OverlayProvider final : public CachedProvider {
 public:
  OverlayProvider(const nlohmann::json& spec, fs::path cache_root, const ProviderOptions& options)
      : CachedProvider(std::move(cache_root)) {
    SpecReader r(spec, "overlay");
    r.check_keys({"base", "transformers_src", "transformers_wheels", "pythonpath"});
    base_ = make_provider(r.object("base"), options);
    src_ = r.str("transformers_src");
    wheels_ = r.str("transformers_wheels");
    pythonpath_ = r.str_list("pythonpath");
    if (src_.empty() == wheels_.empty())
      fail(
          "overlay environment spec: give exactly one of \"transformers_src\" (a transformers checkout or its src/ "
          "dir) and \"transformers_wheels\" (a directory of wheels); found {}",
          spec.dump());
  }

  std::string kind() const override { return "overlay"; }
  std::string id() const override {
    return "overlay-" + base_->id() + "-transformers-" + (src_.empty() ? "wheels" : "src");
  }
  nlohmann::json request() const override {
    std::string src_dir_problem;
    return {{"provider", "overlay"},
            {"base", base_->request()},
            {"transformers_src", src_.empty() ? "" : source_dir(src_dir_problem).string()},
            {"transformers_wheels", wheels_},
            {"wheel_files", wheel_listing()},
            {"pythonpath", pythonpath_},
            {"recipe", kRecipe}};
  }

  Availability probe() const override {
    const auto base = base_->probe();
    if (!base) return Availability::no(fmt::format("base environment {}: {}", base_->id(), base.reason));
    std::string what;
    if (!src_.empty()) {
      std::string problem;
      const auto dir = source_dir(problem);
      if (dir.empty()) return Availability::no(problem);
      what = "transformers from " + dir.string();
    } else {
      std::error_code ec;
      if (!fs::is_directory(wheels_, ec))
        return Availability::no(fmt::format("transformers_wheels {} is not a directory", wheels_));
      const auto wheels = wheel_listing();
      const bool has_tf = std::any_of(wheels.begin(), wheels.end(), [](const nlohmann::json& w) {
        return w.at("name").get<std::string>().rfind("transformers-", 0) == 0;
      });
      if (!has_tf) return Availability::no(fmt::format("transformers_wheels {} has no transformers-*.whl", wheels_));
      what = fmt::format("{} wheel(s) from {}", wheels.size(), wheels_);
    }
    for (const auto& p : pythonpath_) {
      std::error_code ec;
      if (!fs::is_directory(p, ec)) return Availability::no(fmt::format("pythonpath entry {} is not a directory", p));
    }
    return Availability::yes(fmt::format("{} on top of {} ({})", what, base_->id(),
                                         base.ready ? "base ready" : "the base is built first: " + base.reason),
                             base.ready && is_ready());
  }

  Environment realise(Progress& progress) override {
    const auto a = probe();
    if (!a) fail("environment {} is unavailable: {}", id(), a.reason);
    base_env_ = base_->realise(progress);
    Environment env = CachedProvider::realise(progress);
    discover_versions(env);
    progress.note("discovered: " + env.summary());
    return env;
  }

 protected:
  nlohmann::json build(const fs::path& partial, Progress& progress) override {
    progress.set_label("env " + id());
    std::vector<std::string> extracted;
    if (!wheels_.empty()) {
      const fs::path site = partial / "site";
      fs::create_directories(site);
      const auto run_env = private_run_env(partial / "tmp-run");
      for (const auto& w : wheel_listing()) {
        const fs::path wheel = fs::path(wheels_) / w.at("name").get<std::string>();
        // Extracted by the base interpreter itself (zipfile), so no host unzip is needed and a
        // rootfs base sees the paths through its bind mounts.
        auto spec = base_env_->python_args({"-m", "zipfile", "-e", wheel.string(), site.string()},
                                           {fs::absolute(wheels_), partial}, run_env, std::chrono::minutes(10));
        run_step(progress, "extract " + wheel.filename().string(), "into " + site.string(), spec,
                 partial / "logs" / ("extract-" + wheel.filename().string() + ".log"));
        extracted.push_back(wheel.filename().string());
      }
      std::error_code ec;
      fs::remove_all(partial / "tmp-run", ec);
    }
    return {{"base", base_env_->id},
            {"base_versions", versions_json(*base_env_)},
            {"extracted_wheels", extracted},
            {"layout", {{"site", wheels_.empty() ? "" : "site"}, {"logs", "logs"}}}};
  }

  Environment open(const fs::path& dir, const nlohmann::json& manifest) const override {
    if (!base_env_) fail("overlay {}: the base environment is not realised", id());
    Environment env = *base_env_;
    env.provider = kind();
    env.id = dir.filename().string();
    env.root = dir;
    env.manifest = manifest;
    std::string problem;
    std::vector<fs::path> path = {src_.empty() ? dir / "site" : source_dir(problem)};
    for (const auto& p : pythonpath_) path.push_back(fs::absolute(p));
    path.insert(path.end(), base_env_->python_path.begin(), base_env_->python_path.end());
    env.python_path = std::move(path);
    env.transformers_version.clear();
    env.torch_version.clear();
    env.import_errors.clear();
    return env;
  }

 private:
  // The dir that holds the transformers package: <src>/src or <src> itself.
  fs::path source_dir(std::string& problem) const {
    const fs::path root = fs::absolute(src_);
    std::error_code ec;
    for (const auto& candidate : {root / "src", root})
      if (fs::is_regular_file(candidate / "transformers" / "__init__.py", ec)) return candidate;
    problem = fmt::format(
        "no transformers package under {} (expected {}/src/transformers/__init__.py or "
        "{}/transformers/__init__.py)",
        root.string(), root.string(), root.string());
    return {};
  }

  nlohmann::json wheel_listing() const {
    nlohmann::json out = nlohmann::json::array();
    if (wheels_.empty()) return out;
    std::vector<fs::path> files;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(wheels_, ec))
      if (e.path().extension() == ".whl") files.push_back(e.path());
    std::sort(files.begin(), files.end());
    for (const auto& f : files) {
      struct stat st {};
      ::stat(f.c_str(), &st);
      out.push_back({{"name", f.filename().string()},
                     {"size", static_cast<int64_t>(st.st_size)},
                     {"mtime", static_cast<int64_t>(st.st_mtime)}});
    }
    return out;
  }

  std::unique_ptr<EnvironmentProvider> base_;
  std::optional<Environment> base_env_;
  std::string src_, wheels_;
  std::vector<std::string> pythonpath_;
};

}  // namespace

std::unique_ptr<EnvironmentProvider> make_overlay_provider(const nlohmann::json& spec, const fs::path& cache_root,
                                                           const ProviderOptions& options) {
  return std::make_unique<OverlayProvider>(spec, cache_root, options);
}

}  // namespace opensci::harness::detail
