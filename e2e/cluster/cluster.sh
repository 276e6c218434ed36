#!/usr/bin/env bash
# A real single-node Kubernetes 1.20 on this machine, from Debian's packages.
#
#   cluster.sh api    control plane only: etcd, apiserver, controller-manager, scheduler (seconds)
#   cluster.sh up     the control plane plus a node: containerd, kubelet, kube-proxy, CNI bridge
#   cluster.sh down   stop every process this script started (by PID) and undo every host change
#   cluster.sh status what runs
#   cluster.sh gpu    (re)start the emulated NVIDIA device plugin with the SLMPACK_GPU* settings
#                     (`up` starts it too; SLMPACK_GPUS=0 leaves the node without GPUs)
#
# All state lives in $CLUSTER_DIR (default .cluster/ in the repository root). Pods and
# services get addresses on the bridge slmpack0 only, so test traffic never leaves the machine.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
DIR=${CLUSTER_DIR:-$ROOT/.cluster}
BIN=${SLMPACK_CACHE:-$HOME/.cache/slmpack}/k8s-1.20.2/bin
BRIDGE=slmpack0
GATEWAY=10.244.0.1
POD_CIDR=10.244.0.0/16
SERVICE_CIDR=10.96.0.0/16
APISERVER=https://$GATEWAY:6443
CHAIN_MARK="slmpack-cluster"
PAUSE_IMAGE=registry.local/slmpack/pause:3.4

log() { echo "[cluster] $*" >&2; }
pidfile() { echo "$DIR/pids/$1.pid"; }
running() { [ -f "$(pidfile "$1")" ] && kill -0 "$(cat "$(pidfile "$1")")" 2>/dev/null; }

start() { # start NAME CMD...: run in the background, log to logs/NAME.log, remember the PID
  local name=$1; shift
  if running "$name"; then return 0; fi
  mkdir -p "$DIR/logs" "$DIR/pids"
  setsid "$@" >>"$DIR/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$(pidfile "$name")"
}

wait_for() { # wait_for SECONDS DESCRIPTION CMD...
  local seconds=$1 what=$2; shift 2
  for _ in $(seq $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "timed out after ${seconds}s waiting for $what; see $DIR/logs/"; return 1
}

kubectl() { "$BIN/kubectl" --kubeconfig "$DIR/kubeconfig" "$@"; }

ensure_binaries() {
  [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kubelet" ] || "$HERE/build-k8s.sh"
}

ensure_pki() {
  local pki=$DIR/pki
  [ -f "$pki/admin.crt" ] && return 0
  mkdir -p "$pki" && cd "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=slmpack-ca" 2>/dev/null
  cat > apiserver.ext <<EXT
subjectAltName=IP:$GATEWAY,IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
EXT
  sign() { # sign NAME SUBJECT [EXTFILE]
    openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 3650 \
      ${3:+-extfile "$3"} 2>/dev/null
  }
  sign apiserver "/CN=kube-apiserver" apiserver.ext
  sign admin "/O=system:masters/CN=admin"
  openssl genrsa -out sa.key 2048 2>/dev/null && openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  cd - >/dev/null
  "$BIN/kubectl" config --kubeconfig "$DIR/kubeconfig" set-cluster local --server "$APISERVER" \
    --certificate-authority "$pki/ca.crt" --embed-certs >/dev/null
  "$BIN/kubectl" config --kubeconfig "$DIR/kubeconfig" set-credentials admin \
    --client-certificate "$pki/admin.crt" --client-key "$pki/admin.key" --embed-certs >/dev/null
  "$BIN/kubectl" config --kubeconfig "$DIR/kubeconfig" set-context local --cluster local --user admin >/dev/null
  "$BIN/kubectl" config --kubeconfig "$DIR/kubeconfig" use-context local >/dev/null
}

ensure_bridge() {
  # The apiserver listens on the bridge address so that pods reach it through the
  # `kubernetes` Service; the host reaches it there too.
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$GATEWAY/16" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  ip route replace "$SERVICE_CIDR" dev "$BRIDGE"
}

control_plane() {
  ensure_binaries
  ensure_pki
  ensure_bridge
  local pki=$DIR/pki
  mkdir -p "$DIR/etcd"
  start etcd etcd --name slmpack --data-dir "$DIR/etcd" \
    --listen-client-urls http://127.0.0.1:23790 --advertise-client-urls http://127.0.0.1:23790 \
    --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
    --initial-cluster slmpack=http://127.0.0.1:23800
  wait_for 30 etcd curl -sf http://127.0.0.1:23790/health
  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers http://127.0.0.1:23790 \
    --bind-address "$GATEWAY" --advertise-address "$GATEWAY" --secure-port 6443 \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --kubelet-client-certificate "$pki/admin.crt" --kubelet-client-key "$pki/admin.key" \
    --kubelet-preferred-address-types Hostname \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc \
    --authorization-mode Node,RBAC --allow-privileged=false \
    --enable-admission-plugins NamespaceLifecycle,ServiceAccount,DefaultStorageClass,ResourceQuota \
    --profiling=false
  wait_for 60 "the apiserver" kubectl get --raw /readyz
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$DIR/kubeconfig" --bind-address 127.0.0.1 --secure-port 10257 --port 0 \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --use-service-account-credentials --controllers '*,-nodeipam,-cloud-node-lifecycle' \
    --leader-elect=false --cluster-cidr "$POD_CIDR" --allocate-node-cidrs=false
  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig "$DIR/kubeconfig" --bind-address 127.0.0.1 --secure-port 10259 --port 0 --leader-elect=false
  wait_for 60 "the default ServiceAccount" kubectl -n default get serviceaccount default
}

ensure_containerd_config() {
  mkdir -p "$DIR/containerd" "$DIR/cni/net.d"
  cat > "$DIR/containerd/config.toml" <<TOML
version = 2
root = "$DIR/containerd/root"
state = "$DIR/containerd/state"
[grpc]
  address = "$DIR/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Without CAP_SYS_RESOURCE every sandbox fails with "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$DIR/cni/net.d"
TOML
  cat > "$DIR/cni/net.d/10-slmpack.conflist" <<JSON
{"cniVersion": "0.4.0", "name": "slmpack", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "isDefaultGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$GATEWAY"}]],
            "dataDir": "$DIR/cni/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
JSON
}

ctr_() { ctr --address "$DIR/containerd/containerd.sock" -n k8s.io "$@"; }

ensure_pause_image() {
  ctr_ images ls -q | grep -qx "$PAUSE_IMAGE" && return 0
  "$HERE/images.sh" pause "$PAUSE_IMAGE" "$BIN/pause"
  ctr_ images import "$("$HERE/images.sh" tar-path "$PAUSE_IMAGE")" >/dev/null
}

node() {
  ensure_containerd_config
  sysctl -qw net.ipv4.ip_forward=1
  start containerd containerd --config "$DIR/containerd/config.toml"
  wait_for 30 containerd ctr_ version
  ensure_pause_image
  mkdir -p "$DIR/kubelet"
  start kubelet "$BIN/kubelet" \
    --kubeconfig "$DIR/kubeconfig" --hostname-override localhost --address 127.0.0.1 \
    --container-runtime remote --container-runtime-endpoint "unix://$DIR/containerd/containerd.sock" \
    --cgroup-driver cgroupfs --cgroups-per-qos=false --enforce-node-allocatable= \
    --fail-swap-on=false --root-dir "$DIR/kubelet" --pod-infra-container-image "$PAUSE_IMAGE" \
    --authentication-token-webhook=false --anonymous-auth=false --client-ca-file "$DIR/pki/ca.crt" \
    --image-gc-high-threshold 100 --image-gc-low-threshold 99 \
    --eviction-hard 'memory.available<100Mi,nodefs.available<1%,imagefs.available<1%' \
    --serialize-image-pulls=false --max-pods 60 --resolv-conf /etc/resolv.conf
  start kube-proxy "$BIN/kube-proxy" \
    --kubeconfig "$DIR/kubeconfig" --hostname-override localhost --proxy-mode iptables \
    --cluster-cidr "$POD_CIDR" --masquerade-all --bind-address 127.0.0.1 \
    --metrics-bind-address 127.0.0.1:10249 --healthz-bind-address 127.0.0.1:10256 \
    --conntrack-max-per-core 0
  wait_for 90 "a Ready node" sh -c "'$BIN/kubectl' --kubeconfig '$DIR/kubeconfig' get node localhost \
    -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
}

gpu_plugin() { # the emulated NVIDIA device plugin and GFD labels, settings from SLMPACK_GPU* (README)
  stop nvidia-device-plugin
  [ "${SLMPACK_GPUS:-1}" = 0 ] && { log "SLMPACK_GPUS=0: no emulated GPUs"; return 0; }
  local logfile=$DIR/logs/nvidia-device-plugin.log; mkdir -p "$DIR/logs"
  local before; before=$(grep -c "registered nvidia.com/gpu" "$logfile" 2>/dev/null || true)
  # The project's environment has grpcio; PYTHON overrides it (a relative path is taken from the root).
  local python=${PYTHON:-$ROOT/.venv/bin/python}
  case $python in /*) ;; */*) python=$ROOT/$python ;; esac
  [ -x "$python" ] || command -v "$python" >/dev/null || python=python3
  start nvidia-device-plugin env PYTHONPATH="$ROOT/operator:$ROOT" "$python" -m e2e.cluster.nvidia_device_plugin \
    --kubeconfig "$DIR/kubeconfig" --node localhost --mps-root "$DIR/nvidia-mps"
  wait_for 60 "the emulated device plugin to register" \
    sh -c "[ \$(grep -c 'registered nvidia.com/gpu' '$logfile') -gt ${before:-0} ]" \
    || { tail -5 "$logfile" >&2; return 1; }
  log "emulated GPUs: $(grep 'registered nvidia.com/gpu' "$logfile" | tail -1 | sed 's/.*registered //')"
}

stop() { # stop NAME: TERM, then KILL after 10 s, only the PID this script started
  local file; file=$(pidfile "$1")
  [ -f "$file" ] || return 0
  local pid; pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

down() {
  for name in nvidia-device-plugin kube-proxy kubelet; do stop "$name"; done
  if [ -S "$DIR/containerd/containerd.sock" ] && running containerd; then
    # Pod sandboxes and their shims outlive containerd unless removed through it.
    for task in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s KILL "$task" 2>/dev/null || true; done
    sleep 1
    for task in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$task" 2>/dev/null || true; done
    for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$c" 2>/dev/null || true; done
  fi
  stop containerd
  # Shims are children of init once containerd stops; they carry our socket path.
  for pid in $(pgrep -f "containerd-shim.*-address $DIR/containerd/containerd.sock" || true); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$name"; done
  # Mounts under the state directory (pod volumes, overlay snapshots, network namespaces).
  if [ -d "$DIR" ]; then
    { grep -o " $DIR/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  fi
  for ns in $(ip netns list 2>/dev/null | awk '/^cni-/ {print $1}'); do ip netns delete "$ns" 2>/dev/null || true; done
  # kube-proxy's chains: every KUBE-* chain in filter and nat, and the jumps to them.
  for table in filter nat mangle; do
    { iptables -t "$table" -S 2>/dev/null || true; } \
      | { grep -E '^-A (INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) .*(KUBE-|CNI-)' || true; } \
      | sed 's/^-A/-D/' | while read -r rule; do eval "iptables -t $table $rule" 2>/dev/null || true; done
    for chain in $(iptables -t "$table" -S 2>/dev/null | awk '/^-N (KUBE-|CNI-)/ {print $2}'); do
      iptables -t "$table" -F "$chain" 2>/dev/null || true
    done
    for chain in $(iptables -t "$table" -S 2>/dev/null | awk '/^-N (KUBE-|CNI-)/ {print $2}'); do
      iptables -t "$table" -X "$chain" 2>/dev/null || true
    done
  done
  ip route del "$SERVICE_CIDR" dev "$BRIDGE" 2>/dev/null || true
  ip link del "$BRIDGE" 2>/dev/null || true
  rm -rf "$DIR/cni/ipam" "$DIR/kubelet/pods"
  log "down: no process, mount, chain, route or bridge of the cluster is left"
}

status() {
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy \
    nvidia-device-plugin; do
    if running "$name"; then echo "$name running (pid $(cat "$(pidfile "$name")"))"; else echo "$name stopped"; fi
  done
}

case "${1:-}" in
  api) control_plane; log "control plane ready: KUBECONFIG=$DIR/kubeconfig" ;;
  up) control_plane; node; gpu_plugin; log "node Ready: KUBECONFIG=$DIR/kubeconfig" ;;
  gpu) gpu_plugin ;;
  down) down ;;
  status) status ;;
  ctr) shift; ctr_ "$@" ;;
  *) echo "usage: $0 api|up|down|status|gpu|ctr ARGS" >&2; exit 2 ;;
esac
