# Dashboard step 3: run the tests (JUnit for the merge request page), count what really ran,
# submit, then fail the job if a test failed, no test was collected, or fewer than
# OPENSCI_MIN_LIVE_CELLS matrix cells really ran (a cell whose capture was Not Run or replayed
# from a golden file is not live).
#   ctest -S scripts/ci/dashboard/test.cmake -VV
include("${CMAKE_CURRENT_LIST_DIR}/common.cmake")

opensci_dashboard_start()
set(_args PARALLEL_LEVEL ${test_parallel} OUTPUT_JUNIT "${CTEST_BINARY_DIRECTORY}/junit.xml")
if(DEFINED ENV{OPENSCI_TEST_LABELS} AND NOT "$ENV{OPENSCI_TEST_LABELS}" STREQUAL "")
  list(APPEND _args INCLUDE_LABEL "$ENV{OPENSCI_TEST_LABELS}")
endif()
if(DEFINED ENV{OPENSCI_TEST_EXCLUDE_LABELS} AND NOT "$ENV{OPENSCI_TEST_EXCLUDE_LABELS}" STREQUAL "")
  list(APPEND _args EXCLUDE_LABEL "$ENV{OPENSCI_TEST_EXCLUDE_LABELS}")
endif()
if(DEFINED ENV{OPENSCI_RESOURCE_SPEC_FILE} AND NOT "$ENV{OPENSCI_RESOURCE_SPEC_FILE}" STREQUAL "")
  if(NOT EXISTS "$ENV{OPENSCI_RESOURCE_SPEC_FILE}")
    message(FATAL_ERROR "dashboard: OPENSCI_RESOURCE_SPEC_FILE=$ENV{OPENSCI_RESOURCE_SPEC_FILE} does not exist")
  endif()
  list(APPEND _args RESOURCE_SPEC_FILE "$ENV{OPENSCI_RESOURCE_SPEC_FILE}")
endif()
opensci_env(_timeout OPENSCI_TEST_TIMEOUT 3600)
set(CTEST_TEST_TIMEOUT ${_timeout})
set(CTEST_OUTPUT_ON_FAILURE ON)

ctest_test(${_args} RETURN_VALUE _test_rv CAPTURE_CMAKE_ERROR _test_err)

# What ran, from the Test.xml about to be submitted.
file(READ "${CTEST_BINARY_DIRECTORY}/Testing/TAG" _tag)
string(REGEX REPLACE "\n.*" "" _tag "${_tag}")
set(_test_xml "${CTEST_BINARY_DIRECTORY}/Testing/${_tag}/Test.xml")
find_program(_python NAMES python3 REQUIRED)
execute_process(COMMAND "${_python}" "${CMAKE_CURRENT_LIST_DIR}/summarize_tests.py" "${_test_xml}"
                        --min-live-cells ${min_live_cells}
                RESULT_VARIABLE _summary_rv OUTPUT_VARIABLE _summary ERROR_VARIABLE _summary)
string(STRIP "${_summary}" _summary)
message(NOTICE "dashboard: ${_summary}")

opensci_submit(Test Done)

set(_problems "")
if(NOT _test_rv EQUAL 0)
  string(APPEND _problems "tests failed (ctest_test returned ${_test_rv}); ")
endif()
if(NOT _summary_rv EQUAL 0)
  string(APPEND _problems "${_summary}")
elseif(NOT _test_err EQUAL 0)
  string(APPEND _problems "ctest_test reported an error (${_test_err})")
endif()
if(NOT _problems STREQUAL "")
  opensci_fail_step("test step: ${_problems}")
endif()
message(NOTICE "dashboard: test step passed")
