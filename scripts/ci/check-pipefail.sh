#!/usr/bin/env bash
# Lint: in every shell script that sets pipefail, a pipeline whose reader may exit before its
# writer is done (`| grep -q`, `| grep -m N`, `| head`, `| sed ...q`) fails at random: the writer
# dies of SIGPIPE (141) and pipefail reports the pipeline as failed even when the reader matched.
# (How hipcc was never installed on a fresh machine: `apt-cache policy | grep -q Candidate`.)
# Prints every offending line as FILE:LINE: TEXT and exits 1; exits 0 when there is none.
#
#   scripts/ci/check-pipefail.sh [FILE...]     (default: every *.sh tracked by git)
set -euo pipefail
cd "$(dirname "$0")/../.."
files=("$@")
if ((${#files[@]} == 0)); then
  mapfile -t files < <(git ls-files '*.sh')
fi
status=0
checked=0
for f in "${files[@]}"; do
  grep -qs -- 'pipefail' "$f" || continue  # grep on a file, not a pipe
  checked=$((checked + 1))
  # awk reads the whole file; comments are skipped.
  if hits=$(awk '
      /^[[:space:]]*#/ { next }
      /\|[[:space:]]*(grep[[:space:]]+(-[A-Za-z]*[qm]|--quiet|--max-count)|head([[:space:]]|$|\))|sed[[:space:]][^|]*[0-9\/]q([[:space:]]|;|\047|"|$))/ {
        printf "%s:%d: %s\n", FILENAME, FNR, $0; found = 1 }
      END { exit found ? 0 : 1 }' "$f"); then
    echo "$hits"
    status=1
  fi
done
if ((status)); then
  echo "check-pipefail: pipelines above can fail with SIGPIPE under pipefail; read the command's output into a" \
       "variable and test it (here-string, [[ =~ ]]) or use awk, which reads all its input" >&2
else
  echo "check-pipefail: $checked scripts with pipefail, no early-exit readers in pipelines"
fi
exit $status
