#!/usr/bin/env bash
# Validates .gitlab-ci.yml against GitLab's published CI schema, the copy check-jsonschema ships
# (--builtin-schema vendor.gitlab-ci; nothing is vendored into this repository).
#   scripts/ci/lint-gitlab-ci.sh [FILE]        (default: the repository's .gitlab-ci.yml)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
file=${1:-$root/.gitlab-ci.yml}
# shellcheck source=ci-tools.sh
source "$root/scripts/ci/ci-tools.sh"
ci_tools_venv
"$CI_TOOLS/bin/check-jsonschema" --builtin-schema vendor.gitlab-ci "$file"
