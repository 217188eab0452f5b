# CDash settings, read by include(CTest) at configure time and by ctest_start() in the dashboard
# scripts (scripts/ci/dashboard/*.cmake, one `ctest -S` script per CI step).
set(CTEST_PROJECT_NAME "opensci-compat")
# Nightly dashboards open at 01:00 UTC: the scheduled pipeline starts after it, so a night's
# CUDA, ROCm and CPU runs land on the same dashboard day.
set(CTEST_NIGHTLY_START_TIME "01:00:00 UTC")
set(CTEST_DROP_SITE_CDASH TRUE)

# Where results go: -DOPENSCI_CDASH_SUBMIT_URL=... (a cache variable at configure time, a -D
# definition for `ctest -S`), else the environment variable of the same name, e.g.
#   https://cdash.example.org/submit.php?project=opensci-compat
# Empty (the default): nothing is submitted and the scripts say so. There is deliberately no
# default server: a dead URL would make every run try, time out and look broken.
if(NOT DEFINED OPENSCI_CDASH_SUBMIT_URL)
  set(OPENSCI_CDASH_SUBMIT_URL "$ENV{OPENSCI_CDASH_SUBMIT_URL}")
endif()
if(NOT OPENSCI_CDASH_SUBMIT_URL STREQUAL "")
  set(CTEST_SUBMIT_URL "${OPENSCI_CDASH_SUBMIT_URL}")
endif()
