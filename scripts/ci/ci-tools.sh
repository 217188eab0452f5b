# Sourced: ci_tools_venv makes a virtual environment with the pinned CI tools from PyPI
# (gitlabci-local: runs .gitlab-ci.yml jobs locally; check-jsonschema: carries GitLab's CI
# schema) and sets CI_TOOLS to it. Kept under the project cache (reused, offline once made);
# OPENSCI_CI_TOOLS overrides the location. Returns 77 with the reason when it cannot be made.
CI_TOOLS_PINS=("gitlabci-local==13.2.0" "check-jsonschema==0.39.0")
ci_tools_venv() {
  CI_TOOLS=${OPENSCI_CI_TOOLS:-${OPENSCI_CACHE_DIR:-$HOME/.cache/opensci-compat}/ci-tools}
  local stamp="$CI_TOOLS/.pins"
  if [ -x "$CI_TOOLS/bin/gcil" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${CI_TOOLS_PINS[*]}" ]; then
    return 0
  fi
  if ! python3 -c "import ensurepip" 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv >/dev/null ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv >/dev/null; }
    fi
  fi
  rm -rf "$CI_TOOLS"
  mkdir -p "$(dirname "$CI_TOOLS")"
  local log
  log=$(mktemp)
  if ! python3 -m venv "$CI_TOOLS" >"$log" 2>&1 ||
     ! "$CI_TOOLS/bin/pip" install -q --disable-pip-version-check "${CI_TOOLS_PINS[@]}" >>"$log" 2>&1; then
    echo "ci-tools: could not install ${CI_TOOLS_PINS[*]} into $CI_TOOLS:" >&2
    tail -5 "$log" | sed 's/^/    /' >&2
    rm -f "$log"
    rm -rf "$CI_TOOLS"
    return 77
  fi
  rm -f "$log"
  echo "${CI_TOOLS_PINS[*]}" >"$stamp"
  echo "ci-tools: ${CI_TOOLS_PINS[*]} in $CI_TOOLS"
}
