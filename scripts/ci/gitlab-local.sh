#!/usr/bin/env bash
# Runs .gitlab-ci.yml jobs on this machine with gitlabci-local in host mode (no containers: the
# job scripts run here, in this checkout, as the CI runner would run them in the job's image).
#
#   scripts/ci/gitlab-local.sh --list [--json]          every job, its stage, tags, pipelines
#   scripts/ci/gitlab-local.sh [--pipeline SOURCE] [JOB...]
#
# Without JOB: the CPU jobs a SOURCE pipeline (default merge_request_event) starts by itself, in
# stage order (gitlabci-local ignores `rules`; scripts/ci/gitlab_jobs.py evaluates them). GPU jobs
# (tags nvidia-gpu, amd-gpu) and privileged ones need their runners. Each job gets
# CI_PIPELINE_SOURCE=SOURCE and, for merge requests, CI_MERGE_REQUEST_DIFF_BASE_SHA = the merge
# base with main; the jobs use this machine's environment cache (OPENSCI_CACHE_DIR, default
# ~/.cache/opensci-compat) and the caller's OPENSCI_BUILD_DIR, OPENSCI_CONFIGURE_OPTIONS,
# OPENSCI_TEST_LABELS ... when set. Prints one line per job and exits 1 if any failed.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
# shellcheck source=ci-tools.sh
source scripts/ci/ci-tools.sh
ci_tools_venv
py="$CI_TOOLS/bin/python"
if [ "${1:-}" = "--list" ]; then
  shift
  exec "$py" scripts/ci/gitlab_jobs.py .gitlab-ci.yml list "$@"
fi
source_kind=merge_request_event
if [ "${1:-}" = "--pipeline" ]; then
  source_kind=${2:?--pipeline SOURCE}
  shift 2
fi
jobs=("$@")
if ((${#jobs[@]} == 0)); then
  mapfile -t jobs < <("$py" scripts/ci/gitlab_jobs.py .gitlab-ci.yml select "$source_kind" --cpu-only)
fi
((${#jobs[@]})) || { echo "gitlab-local: no jobs selected for a $source_kind pipeline" >&2; exit 1; }
# gitlabci-local's own listing: every job it parsed (it must know each job we run).
known=$("$CI_TOOLS/bin/gcil" --no-color --dump 2>/dev/null | "$py" -c 'import sys, yaml; print("\n".join(yaml.safe_load(sys.stdin)))')
# The job runs in this checkout: it uses this machine's environment cache (not a fresh one under
# .cache/ as on a runner), and the caller's OPENSCI_* settings override the job's.
extra=(-e "OPENSCI_CACHE_DIR=${OPENSCI_CACHE_DIR:-$HOME/.cache/opensci-compat}")
for v in OPENSCI_BUILD_DIR OPENSCI_CONFIGURE_OPTIONS OPENSCI_TEST_LABELS OPENSCI_TEST_EXCLUDE_LABELS \
         OPENSCI_TEST_PARALLEL OPENSCI_JOBS OPENSCI_MIN_LIVE_CELLS OPENSCI_CDASH_SUBMIT_URL; do
  if [ -n "${!v:-}" ]; then extra+=(-e "$v=${!v}"); fi
done
if [ "$source_kind" = merge_request_event ]; then
  base=${CI_MERGE_REQUEST_DIFF_BASE_SHA:-$(git merge-base HEAD main 2>/dev/null || git rev-parse HEAD)}
  extra+=(-e "CI_MERGE_REQUEST_DIFF_BASE_SHA=$base")
fi
declare -A result=()
status=0
for job in "${jobs[@]}"; do
  if ! grep -qxF "$job" <<<"$known"; then
    echo "gitlab-local: gitlabci-local does not list job '$job'" >&2
    result[$job]="MISSING"
    status=1
    continue
  fi
  echo "=== gitlab-local: $job ($source_kind pipeline, host mode)"
  start=$SECONDS
  if "$CI_TOOLS/bin/gcil" --no-color -H --no-regex -e "CI_PIPELINE_SOURCE=$source_kind" "${extra[@]}" -- "$job"; then
    result[$job]="passed in $((SECONDS - start)) s"
  else
    result[$job]="FAILED after $((SECONDS - start)) s"
    status=1
  fi
done
echo
echo "=== gitlab-local: $source_kind pipeline, ${#jobs[@]} job(s)"
for job in "${jobs[@]}"; do printf '  %-18s %s\n' "$job" "${result[$job]}"; done
exit $status
