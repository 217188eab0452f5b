# Shared by the dashboard steps, one `ctest -S` script per CI step (as CMake's own CI does it):
#
#   ctest -S scripts/ci/dashboard/configure.cmake   ctest_start (new dashboard), configure, submit
#   ctest -S scripts/ci/dashboard/build.cmake       ctest_start APPEND, build, submit
#   ctest -S scripts/ci/dashboard/test.cmake        ctest_start APPEND, test (+ JUnit), submit
#
# Each step submits its part even when the step failed, then fails the job (FATAL_ERROR, ctest
# exits non-zero). A submission that fails (server down, HTTP error, timeout, CDash rejecting
# the file) is reported loudly and written to <build>/dashboard-submit.txt, but never changes the
# job's result: a red run stays red and a green run stays green.
#
# Settings (environment variables; GitLab CI sets them per job, README "Dashboards"):
#   OPENSCI_DASHBOARD_MODEL     Nightly | Experimental | Continuous (default: from the pipeline kind)
#   OPENSCI_DASHBOARD_GROUP     CDash group (default: from CI_PIPELINE_SOURCE: "Nightly",
#                               "Merge requests", "Continuous", else "Experimental")
#   OPENSCI_BACKEND             cpu | cuda | hip (default cpu): configure options and build name
#   OPENSCI_BUILD_DIR           binary directory (default <source>/build)
#   OPENSCI_CONFIGURE_OPTIONS   extra configure arguments, ';'-separated (-DOPENSCI_WITH_LIBTORCH=ON;...)
#   OPENSCI_TEST_LABELS         ctest -L regex; OPENSCI_TEST_EXCLUDE_LABELS ctest -LE regex
#   OPENSCI_TEST_PARALLEL       ctest -j (default: the number of processors)
#   OPENSCI_RESOURCE_SPEC_FILE  ctest --resource-spec-file (GPU runners: tests get their own GPU)
#   OPENSCI_MIN_LIVE_CELLS      the test step fails below this many cells that really ran (default 1)
#   OPENSCI_DASHBOARD_TRANSFORMERS  transformers range in the build name (default: the matrix's)
#   OPENSCI_DASHBOARD_NAME_SUFFIX   appended to the build name
#   OPENSCI_CDASH_SUBMIT_URL    CDash submit.php URL; empty: no submission (see CTestConfig.cmake)
#   OPENSCI_CDASH_TIMEOUT       seconds of no transfer before a submission is abandoned (default 60)
#   OPENSCI_CDASH_RETRY_COUNT / _DELAY  retries of a failed submission (default 1, 10 s)
cmake_minimum_required(VERSION 3.25)

get_filename_component(CTEST_SOURCE_DIRECTORY "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)

function(opensci_env out name default)
  if(DEFINED ENV{${name}} AND NOT "$ENV{${name}}" STREQUAL "")
    set(${out} "$ENV{${name}}" PARENT_SCOPE)
  else()
    set(${out} "${default}" PARENT_SCOPE)
  endif()
endfunction()

# Pipeline kind -> dashboard model and CDash group.
opensci_env(_source CI_PIPELINE_SOURCE "")
if(_source STREQUAL "schedule")
  set(_model Nightly)
  set(_group Nightly)
elseif(_source STREQUAL "merge_request_event")
  set(_model Experimental)
  set(_group "Merge requests")
elseif(_source STREQUAL "push")
  set(_model Continuous)
  set(_group Continuous)
else()
  set(_model Experimental)
  set(_group Experimental)
endif()
opensci_env(dashboard_model OPENSCI_DASHBOARD_MODEL "${_model}")
opensci_env(dashboard_group OPENSCI_DASHBOARD_GROUP "${_group}")
if(NOT dashboard_model MATCHES "^(Nightly|Experimental|Continuous)$")
  message(FATAL_ERROR "dashboard: OPENSCI_DASHBOARD_MODEL='${dashboard_model}' is not Nightly, Experimental or Continuous")
endif()

opensci_env(backend OPENSCI_BACKEND cpu)
if(NOT backend MATCHES "^(cpu|cuda|hip)$")
  message(FATAL_ERROR "dashboard: OPENSCI_BACKEND='${backend}' is not cpu, cuda or hip")
endif()
opensci_env(CTEST_BINARY_DIRECTORY OPENSCI_BUILD_DIR "${CTEST_SOURCE_DIRECTORY}/build")
get_filename_component(CTEST_BINARY_DIRECTORY "${CTEST_BINARY_DIRECTORY}" ABSOLUTE BASE_DIR "${CTEST_SOURCE_DIRECTORY}")
set(CTEST_CMAKE_GENERATOR Ninja)
cmake_host_system_information(RESULT _nproc QUERY NUMBER_OF_LOGICAL_CORES)
opensci_env(test_parallel OPENSCI_TEST_PARALLEL "${_nproc}")
opensci_env(min_live_cells OPENSCI_MIN_LIVE_CELLS 1)
opensci_env(CTEST_SUBMIT_INACTIVITY_TIMEOUT OPENSCI_CDASH_TIMEOUT 60)
opensci_env(submit_retry_count OPENSCI_CDASH_RETRY_COUNT 1)
opensci_env(submit_retry_delay OPENSCI_CDASH_RETRY_DELAY 10)

# Site: the runner.
opensci_env(CTEST_SITE CI_RUNNER_DESCRIPTION "")
if(CTEST_SITE STREQUAL "")
  cmake_host_system_information(RESULT CTEST_SITE QUERY HOSTNAME)
endif()

# Build name: backend, compiler, GPU architectures, transformers range, e.g.
#   cpu-gcc-12.2.0-tf4.48.0..5.12.1+latest      cuda-gcc-12.2.0-sm80+90-tf5.17
opensci_env(_cxx CXX c++)
execute_process(COMMAND ${_cxx} --version OUTPUT_VARIABLE _cxx_banner ERROR_QUIET RESULT_VARIABLE _cxx_rc)
execute_process(COMMAND ${_cxx} -dumpfullversion -dumpversion OUTPUT_VARIABLE _cxx_version ERROR_QUIET
                OUTPUT_STRIP_TRAILING_WHITESPACE)
if(_cxx_banner MATCHES "clang")
  set(_compiler "clang-${_cxx_version}")
elseif(_cxx_rc EQUAL 0)
  set(_compiler "gcc-${_cxx_version}")
else()
  set(_compiler "${_cxx}-unknown")
endif()
set(_arch "")
if(backend STREQUAL "cuda")
  opensci_env(_archs OPENSCI_CUDA_ARCHITECTURES "80;90")
  string(REPLACE ";" "+" _arch "-sm${_archs}")
elseif(backend STREQUAL "hip")
  opensci_env(_archs OPENSCI_HIP_ARCHITECTURES "gfx90a;gfx942")
  string(REPLACE ";" "+" _arch "-${_archs}")
endif()

# The transformers versions the matrix declares, lowest..highest (release order), +latest.
function(opensci_transformers_range out)
  file(READ "${CTEST_SOURCE_DIRECTORY}/matrix/matrix.json" _matrix)
  string(JSON _envs GET "${_matrix}" environments)
  string(JSON _n LENGTH "${_envs}")
  set(_lo "")
  set(_hi "")
  set(_latest "")
  math(EXPR _last "${_n} - 1")
  foreach(_i RANGE ${_last})
    string(JSON _name MEMBER "${_envs}" ${_i})
    string(JSON _v ERROR_VARIABLE _err GET "${_envs}" "${_name}" transformers)
    if(_err OR _v STREQUAL "")
      continue()
    endif()
    if(NOT _v MATCHES "^[0-9]+(\\.[0-9]+)*")
      set(_latest "+${_v}")
    elseif(_lo STREQUAL "" OR _v VERSION_LESS _lo)
      set(_lo "${_v}")
    endif()
    if(_v MATCHES "^[0-9]+(\\.[0-9]+)*" AND (_hi STREQUAL "" OR _v VERSION_GREATER _hi))
      set(_hi "${_v}")
    endif()
  endforeach()
  if(_lo STREQUAL _hi)
    set(${out} "tf${_lo}${_latest}" PARENT_SCOPE)
  else()
    set(${out} "tf${_lo}..${_hi}${_latest}" PARENT_SCOPE)
  endif()
endfunction()
if(DEFINED ENV{OPENSCI_DASHBOARD_TRANSFORMERS} AND NOT "$ENV{OPENSCI_DASHBOARD_TRANSFORMERS}" STREQUAL "")
  set(_tf "tf$ENV{OPENSCI_DASHBOARD_TRANSFORMERS}")
else()
  opensci_transformers_range(_tf)
endif()
# One name for all steps of a build (the cpu-build and cpu-test jobs land on one CDash build);
# OPENSCI_DASHBOARD_NAME_SUFFIX tells apart builds that would otherwise share it.
set(CTEST_BUILD_NAME "${backend}-${_compiler}${_arch}-${_tf}$ENV{OPENSCI_DASHBOARD_NAME_SUFFIX}")

# Starts the dashboard (configure step) or joins the one a previous step started (APPEND).
macro(opensci_dashboard_start)
  set(_append "")
  if(EXISTS "${CTEST_BINARY_DIRECTORY}/Testing/TAG" AND NOT "${ARGN}" STREQUAL "NEW")
    set(_append APPEND)
  endif()
  ctest_start(${dashboard_model} "${CTEST_SOURCE_DIRECTORY}" "${CTEST_BINARY_DIRECTORY}" GROUP "${dashboard_group}" ${_append})
  message(NOTICE "dashboard: ${dashboard_model} '${CTEST_BUILD_NAME}' on '${CTEST_SITE}', group '${dashboard_group}', "
                 "build dir ${CTEST_BINARY_DIRECTORY}")
endmacro()

# Submits the named parts. Never fails the job: a failed submission is reported (message,
# <build>/dashboard-submit.txt) and the step's own result decides the exit status.
function(opensci_submit)
  set(_status_file "${CTEST_BINARY_DIRECTORY}/dashboard-submit.txt")
  string(JOIN " " _parts ${ARGN})
  if(NOT CTEST_SUBMIT_URL)
    message(NOTICE "dashboard: not submitting ${_parts}: no CDash URL (set OPENSCI_CDASH_SUBMIT_URL)")
    file(APPEND "${_status_file}" "${_parts}: not submitted (no OPENSCI_CDASH_SUBMIT_URL)\n")
    return()
  endif()
  file(GLOB _logs_before "${CTEST_BINARY_DIRECTORY}/Testing/Temporary/LastSubmit_*.log")
  foreach(_log IN LISTS _logs_before)
    file(REMOVE "${_log}")  # the check below reads this submission's log only
  endforeach()
  ctest_submit(PARTS ${ARGN} RETRY_COUNT ${submit_retry_count} RETRY_DELAY ${submit_retry_delay}
               RETURN_VALUE _rv CAPTURE_CMAKE_ERROR _err BUILD_ID _build_id)
  # ctest_submit returns 0 when CDash answered 200 with <status>ERROR</status>; its log says so.
  file(GLOB _logs "${CTEST_BINARY_DIRECTORY}/Testing/Temporary/LastSubmit_*.log")
  set(_log_text "")
  foreach(_log IN LISTS _logs)
    file(READ "${_log}" _t)
    string(APPEND _log_text "${_t}")
  endforeach()
  string(REGEX REPLACE "\\?.*" "" _where "${CTEST_SUBMIT_URL}")  # no query string (tokens) in logs
  if(NOT _rv EQUAL 0 OR NOT _err EQUAL 0 OR _log_text MATCHES "Errors occurred during submission|Problems when submitting")
    string(REGEX MATCHALL "Error message was: [^\n]*" _why "${_log_text}")
    string(REPLACE ";" " " _why "${_why}")
    if(_why STREQUAL "" AND _log_text MATCHES "Errors occurred during submission")
      set(_why "CDash answered with an error status (its message is in the ctest output above)")
    endif()
    message(NOTICE "dashboard: WARNING: SUBMISSION FAILED for ${_parts} to ${_where} (ctest_submit returned ${_rv}): "
                   "${_why} — the job's result is unchanged; the results are still in ${CTEST_BINARY_DIRECTORY}/Testing")
    file(APPEND "${_status_file}" "${_parts}: SUBMISSION FAILED to ${_where}: return ${_rv} ${_why}\n")
  else()
    message(NOTICE "dashboard: submitted ${_parts} to ${_where} (CDash build id '${_build_id}')")
    file(APPEND "${_status_file}" "${_parts}: submitted to ${_where} (build id '${_build_id}')\n")
  endif()
endfunction()

# Fails the step: the reason on one unwrapped line (FATAL_ERROR text is wrapped), then the error.
function(opensci_fail_step)
  string(JOIN "" _why ${ARGN})
  message(NOTICE "dashboard: FAILED: ${_why}")
  message(FATAL_ERROR "dashboard: step failed (reason above)")
endfunction()
