#!/usr/bin/env bash
# Enables Debian's contrib and non-free components (nvidia-cuda-toolkit lives there) in a CI
# container. Does nothing on a machine that is not a container (a developer running the job with
# gitlabci-local in host mode keeps their apt sources), nor where the components are enabled.
set -euo pipefail
sources=/etc/apt/sources.list.d/debian.sources
if [ ! -f /.dockerenv ] && [ ! -f /run/.containerenv ]; then
  echo "debian-non-free: not a container: apt sources left as they are"
  exit 0
fi
if [ ! -f "$sources" ]; then
  echo "debian-non-free: no $sources (not a Debian 12 image?): nothing changed"
  exit 0
fi
if grep -Eq '^Components:.*non-free( |$)' "$sources"; then
  echo "debian-non-free: already enabled"
  exit 0
fi
sed -i -E 's/^Components: main$/Components: main contrib non-free non-free-firmware/' "$sources"
echo "debian-non-free: enabled contrib non-free in $sources"
