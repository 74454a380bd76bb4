#!/usr/bin/env bash
# Builds the Lifeboat container image from scratch: the five release binaries and the shared
# libraries they load (as `ldd` finds them on this host), nothing else — no shell, no package
# manager. No registry is needed: the base is empty.
# Usage: deploy/container/build-image.sh [TAG]   (default lifeboat:<version>)
#   BIN=DIR  take the binaries from DIR instead of building target/release
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
tag=${1:-lifeboat:$version}
command -v docker >/dev/null || { echo "build-image: needs docker" >&2; exit 1; }
if [ -z "${BIN:-}" ]; then
  (cd "$root" && cargo build --release --workspace --bins)
  BIN=$root/target/release
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
fs=$ctx/rootfs
mkdir -p "$fs/usr/local/bin" "$fs/var/lib/lifeboat" "$fs/tmp"
chmod 1777 "$fs/tmp"
bins=(config-server process-server master-target mobility-agent lifeboat)
for b in "${bins[@]}"; do
  [ -x "$BIN/$b" ] || { echo "build-image: $BIN/$b is missing (build with cargo build --release)" >&2; exit 1; }
  cp "$BIN/$b" "$fs/usr/local/bin/"
  # Debug line tables are for profiling on a build host; symbols stay for backtraces.
  if command -v strip >/dev/null; then strip --strip-debug "$fs/usr/local/bin/$b"; fi
done
# Every library the binaries load, at the path the dynamic loader looks for it (the loader
# itself included), copied with symlinks resolved.
for b in "${bins[@]}"; do ldd "$BIN/$b"; done \
  | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u \
  | while read -r lib; do
      mkdir -p "$fs$(dirname "$lib")"
      cp -L "$lib" "$fs$lib"
    done
# Host names (the components find each other by name) are resolved by glibc's NSS modules,
# which it loads at run time, so ldd does not list them: built into libc since glibc 2.34,
# separate files before. Copy them where they exist, and say how to use them.
libc=$(for b in "${bins[@]}"; do ldd "$BIN/$b"; done | awk '$1 == "libc.so.6" { print $3; exit }')
for nss in "$(dirname "$libc")"/libnss_files.so.2 "$(dirname "$libc")"/libnss_dns.so.2; do
  [ -e "$nss" ] && { mkdir -p "$fs$(dirname "$nss")"; cp -L "$nss" "$fs$nss"; }
done
mkdir -p "$fs/etc"
echo "hosts: files dns" > "$fs/etc/nsswitch.conf"
cp "$root/deploy/container/Dockerfile" "$ctx/"
# The engine may have no BuildKit (docker-buildx) installed; the classic builder does the job
# and warns about itself on stderr, which is shown only when the build fails.
if ! docker build --quiet --tag "$tag" "$ctx" >"$ctx/build.log" 2>&1; then
  cat "$ctx/build.log" >&2
  exit 1
fi
echo "$tag"
