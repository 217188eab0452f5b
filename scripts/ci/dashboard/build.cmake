# Dashboard step 2: build (warnings as errors), appended to the dashboard configure.cmake started.
#   ctest -S scripts/ci/dashboard/build.cmake -VV
include("${CMAKE_CURRENT_LIST_DIR}/common.cmake")

opensci_dashboard_start()
opensci_env(_jobs OPENSCI_JOBS "${_nproc}")
set(CTEST_BUILD_FLAGS "-j${_jobs}")
ctest_build(NUMBER_ERRORS _errors NUMBER_WARNINGS _warnings RETURN_VALUE _build_rv CAPTURE_CMAKE_ERROR _build_err)
opensci_submit(Build)
if(NOT _build_rv EQUAL 0 OR NOT _build_err EQUAL 0 OR _errors GREATER 0)
  opensci_fail_step("build failed (return ${_build_rv}, ${_errors} errors, ${_warnings} warnings)")
endif()
message(NOTICE "dashboard: build ok (${_warnings} warnings)")
