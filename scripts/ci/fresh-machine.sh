#!/usr/bin/env bash
# Fresh-machine check: runs the README's two commands on a clean Debian 12 (bookworm) root, as a
# new user or a CI runner would, and reports each command's exit status and wall time.
#
#   scripts/ci/fresh-machine.sh [--repo DIR] [--rev REV] [--work DIR] [--keep] [--only quickstart|test]
#
#  1. debootstrap --variant=minbase bookworm into WORK/root (what a debian:12 runner image holds);
#     the host's /etc/apt/apt.conf.d is carried in (frozen mirror snapshot, proxy settings);
#  2. a clean clone of REV (default HEAD) of REPO (default: this checkout) at /work/opensci-compat
#     inside it: uncommitted changes are NOT part of the check;
#  3. the host's CUDA toolkit (/usr/local/cuda, resolved) bind-mounted read-only at the same path,
#     as a GPU runner image provides it; nothing else of the host is visible;
#  4. in a private mount namespace (/proc, /sys, /dev mounted; gone when the run ends), chrooted,
#     with a clean environment: `bash scripts/quickstart.sh`, then `bash scripts/test.sh`.
# Too slow for every CI run (~30-45 min on 2 cores): a manual / nightly job (.gitlab-ci.yml).
# Exit status 0 only when both commands exit 0. Needs root, debootstrap (installed when missing)
# and about 20 GB under WORK (default /var/tmp/opensci-fresh-machine).
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
repo=$src
rev=HEAD
work=/var/tmp/opensci-fresh-machine
keep=0
only=""
while [ $# -gt 0 ]; do
  case $1 in
    --repo) repo=$2; shift 2 ;;
    --rev) rev=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --only) only=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "fresh-machine: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "fresh-machine: needs root (debootstrap, chroot, mounts)" >&2; exit 2; }

log() { printf '[fresh-machine] +%ss %s\n' "$SECONDS" "$*"; }
hms() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# Refuse to delete anything that still has a mount under it (a recursive delete follows mounts).
mounted_under() { awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo; }
remove_tree() {
  local dir=$1 mounts
  [ -e "$dir" ] || return 0
  mounts=$(mounted_under "$dir")
  if [ -n "$mounts" ]; then
    echo "fresh-machine: not deleting $dir, still mounted under it:" >&2
    echo "$mounts" >&2
    return 1
  fi
  rm -rf --one-file-system "$dir"
}

if ! command -v debootstrap >/dev/null && [ ! -x /usr/sbin/debootstrap ]; then
  log "installing debootstrap on the host"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null
fi
debootstrap=$(command -v debootstrap || echo /usr/sbin/debootstrap)

# The mirror the host uses (its sources may be deb822 or one-line).
mirror=${OPENSCI_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  # (cat fails on a pattern that matches nothing; under pipefail that would end the script silently)
  mirror=$({ cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } |
    awk '/^URIs:/ && $2 ~ /debian\/?$/ && !m { m = $2 } /^deb / && $2 ~ /debian\/?$/ && !m { m = $2 } END { print m }')
fi
mirror=${mirror:-http://deb.debian.org/debian}

remove_tree "$work"
mkdir -p "$work"
root=$work/root
log "debootstrap bookworm minbase from $mirror into $root"
t0=$SECONDS
if ! unshare --mount --propagation private "$debootstrap" --variant=minbase --include=ca-certificates \
    bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
  tail -20 "$work/debootstrap.log" >&2
  echo "fresh-machine: debootstrap failed (log: $work/debootstrap.log)" >&2
  exit 1
fi
boot_s=$((SECONDS - t0))
cp /etc/apt/apt.conf.d/* "$root/etc/apt/apt.conf.d/" 2>/dev/null || true
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
# The network's trust, as a runner image provisioned for it has: CAs the host added locally (a
# TLS-intercepting proxy's) go into the root's trust store. Nothing else of the host's TLS setup.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >"$work/update-ca-certificates.log" 2>&1 ||
    { cat "$work/update-ca-certificates.log" >&2; echo "fresh-machine: update-ca-certificates failed" >&2; exit 1; }
  log "carried the host's local CAs into the root: $(cd /usr/local/share/ca-certificates && echo *.crt)"
fi

log "clean clone of $repo at $rev"
git clone -q --no-local "$repo" "$root/work/opensci-compat"
git -C "$root/work/opensci-compat" checkout -q "$rev"
commit=$(git -C "$root/work/opensci-compat" rev-parse --short HEAD)

cuda=""
if [ -e /usr/local/cuda ]; then
  cuda=$(readlink -f /usr/local/cuda)
  mkdir -p "$root$cuda"
  [ "$cuda" = /usr/local/cuda ] || ln -sfn "$cuda" "$root/usr/local/cuda"
fi

# Inside a private mount namespace: every mount vanishes with it, whatever happens.
cat >"$work/run-inside.sh" <<'INSIDE'
set -euo pipefail
root=$1 cuda=$2 only=$3 results=$4
# The root a container gets is a mount point; a plain directory is not, and then `unshare
# --mount` inside it fails ("cannot change root filesystem propagation"). Bind it onto itself.
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
if [ -n "$cuda" ]; then
  mount --bind "$cuda" "$root$cuda"
  mount -o remount,bind,ro "$root$cuda"
fi
run() {  # run NAME COMMAND: in the chroot, clean environment; records exit status and seconds
  local name=$1 cmd=$2 t0=$SECONDS rc=0
  echo "=== $name: $cmd"
  env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TERM=dumb \
    ${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} ${no_proxy:+no_proxy=$no_proxy} \
    chroot "$root" /bin/bash -c "cd /work/opensci-compat && $cmd" >"$results/$name.log" 2>&1 || rc=$?
  echo "$name $rc $((SECONDS - t0))" >>"$results/summary"
  tail -5 "$results/$name.log" | sed 's/^/    /'
}
[ "$only" = test ] || run quickstart "bash scripts/quickstart.sh"
[ "$only" = quickstart ] || run test "bash scripts/test.sh"
INSIDE
mkdir -p "$work/results"
: >"$work/results/summary"
log "running the README's commands in the fresh root (logs: $work/results/)"
unshare --mount --propagation private bash "$work/run-inside.sh" "$root" "$cuda" "$only" "$work/results" || true

echo
echo "=== fresh-machine: Debian 12 bookworm minbase (debootstrap $(hms $boot_s)), clean clone $commit" \
     "${cuda:+, CUDA toolkit $cuda read-only}"
status=0
ran=0
while read -r name rc secs; do
  ran=$((ran + 1))
  last=$(tail -1 "$work/results/$name.log")
  printf '  %-28s exit %-3s %8s   last line: %s\n' "bash scripts/$name.sh" "$rc" "$(hms "$secs")" "$last"
  [ "$rc" = 0 ] || status=1
done <"$work/results/summary"
((ran > 0)) || { echo "  nothing ran (see above)"; status=1; }
if [ "$keep" = 1 ]; then
  echo "kept: $work (root, results)"
else
  cp -r "$work/results" "$work.results" 2>/dev/null || true
  remove_tree "$work" && echo "logs kept in $work.results/"
fi
exit $status
