#!/usr/bin/env bash
# Build Kubernetes v1.20.2 from Debian's source package, once, into a cache outside the repo.
# Debian's golang-go 1.19 builds it in GOPATH mode through `make WHAT=...`; two vendored
# libraries are swapped for Debian's newer ones, without which the apiserver dies with
# "fatal error: fault" on the first custom-object write under Go >= 1.18.
set -euo pipefail

K8S_VERSION=1.20.2
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
CACHE=${SLMPACK_CACHE:-$HOME/.cache/slmpack}
BIN=$CACHE/k8s-$K8S_VERSION/bin
WORK=$CACHE/k8s-$K8S_VERSION/src
COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

# `build-k8s.sh source` only fetches and unpacks the source: the kubelet's protos need no compiler, so the
# images can build while the binaries compile.
MODE=${1:-build}

have_all() { for c in "${COMPONENTS[@]}" pause; do [ -x "$BIN/$c" ] || return 1; done; }
if [ "$MODE" = build ] && have_all; then echo "k8s $K8S_VERSION binaries cached in $BIN"; exit 0; fi
mkdir -p "$BIN" "$WORK"

# A private apt configuration with a deb-src line, so the system's sources stay untouched.
APT_DIR=$WORK/apt
mkdir -p "$APT_DIR"/{lists/partial,archives/partial,etc/sources.list.d,etc/preferences.d}
echo "deb-src http://deb.debian.org/debian bookworm main" > "$APT_DIR/etc/sources.list"
cat > "$APT_DIR/apt.conf" <<CONF
Dir::State::Lists "$APT_DIR/lists";
Dir::Cache::Archives "$APT_DIR/archives";
Dir::Etc::SourceList "$APT_DIR/etc/sources.list";
Dir::Etc::SourceParts "$APT_DIR/etc/sources.list.d";
Dir::Etc::Preferences "$APT_DIR/etc/preferences.d";
CONF
export APT_CONFIG=$APT_DIR/apt.conf

SRC=$(ls -d "$WORK"/kubernetes-*/ 2>/dev/null | head -1 || true)
if [ -z "$SRC" ]; then
  apt-get -q update
  (cd "$WORK" && apt-get source --download-only -q "kubernetes=$DEB_VERSION")
  (cd "$WORK" && dpkg-source -x kubernetes_*.dsc >/dev/null)
  SRC=$(ls -d "$WORK"/kubernetes-*/ | head -1)
fi
if [ "$MODE" = source ]; then echo "k8s $K8S_VERSION source in $SRC"; exit 0; fi
cd "$SRC"

for lib in github.com/modern-go/reflect2 github.com/json-iterator/go; do
  if [ ! -e "vendor/$lib/.from-debian" ]; then
    rm -rf "vendor/$lib" && cp -r "/usr/share/gocode/src/$lib" "vendor/$lib" && touch "vendor/$lib/.from-debian"
  fi
done

what=""
for c in "${COMPONENTS[@]}"; do [ -x "$BIN/$c" ] || what="$what cmd/$c"; done
if [ -n "$what" ]; then
  echo "building:$what (about 9 minutes cold on 2 cores)"
  make WHAT="${what# }" GOFLAGS=-mod=vendor KUBE_BUILD_PLATFORMS=linux/amd64 >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; exit 1; }
  for c in "${COMPONENTS[@]}"; do
    out=$(find _output -type f -name "$c" -perm -u+x | head -1)
    [ -n "$out" ] && install -m 0755 "$out" "$BIN/$c"
  done
fi
[ -x "$BIN/pause" ] || gcc -Os -static -o "$BIN/pause" build/pause/linux/pause.c
have_all && echo "k8s $K8S_VERSION binaries in $BIN"
