// `env workers`: the capture workers (harness/python/worker.py, one per environment).
//   env workers [--dir D]          list them: key, pid, state, environment, captures served
//   env workers --stop [--dir D]   stop all of them (running captures are killed), remove stale
//                                  sockets and info files; exit 0 unless one survived SIGKILL
// D defaults to $OPENSCI_WORKER_DIR or <cache root>/workers.
#include <fmt/core.h>

#include <memory>

#include "commands.hpp"
#include "opensci/harness/capture_worker.hpp"

namespace opensci::cli {

void add_worker_command(CLI::App& app) {
  auto* env = app.get_subcommand("env");
  struct Args {
    std::string dir;
    bool stop = false;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = env->add_subcommand("workers", "List (or --stop) the capture workers: one warm python per environment");
  cmd->add_option("--dir", a->dir, "worker dir (default: $OPENSCI_WORKER_DIR or <cache root>/workers)");
  cmd->add_flag("--stop", a->stop, "stop every worker (running captures are killed)");
  cmd->callback([a] {
    const std::filesystem::path dir = a->dir.empty() ? harness::default_worker_dir() : std::filesystem::path(a->dir);
    if (a->stop) {
      const auto lines = harness::stop_workers(dir);
      bool survivor = false;
      for (const auto& line : lines) {
        fmt::print("{}\n", line);
        survivor = survivor || line.find("still alive") != std::string::npos;
      }
      fmt::print("{} worker(s) under {} handled\n", lines.size(), dir.string());
      if (survivor) throw CLI::RuntimeError(1);
      return;
    }
    const auto workers = harness::list_workers(dir);
    for (const auto& w : workers)
      fmt::print("{}  pid {}  {}  started {}  served {}  imports {:.1f} s  {}\n", w.key, w.pid, w.state,
                 w.status.value("started_at", "?"), w.status.value("captures_served", 0),
                 w.status.value("import_seconds", 0.0), w.status.value("python", ""));
    fmt::print("{} worker(s) under {}\n", workers.size(), dir.string());
  });
}

}  // namespace opensci::cli
