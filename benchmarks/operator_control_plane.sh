#!/bin/sh
# A private control plane for the operator benchmark: etcd and kube-apiserver 1.20.2 (the test
# bed's binaries) on their own loopback ports and data directory, no controller-manager and no
# node, so nothing but the operator under test writes to it. etcd keeps its data in memory
# (/dev/shm): on a machine whose disk is busy, fsync latency would otherwise be what is measured.
#
#   benchmarks/operator_control_plane.sh start DIR   # prints KUBECONFIG=DIR/kubeconfig
#   benchmarks/operator_control_plane.sh stop DIR
set -eu
BIN="${SLMPACK_K8S_BIN:-$HOME/.cache/slmpack/k8s-1.20.2/bin}"
DIR="${2:?usage: $0 start|stop DIR}"
ETCD_PORT=23890
API_PORT=16443

case "$1" in
start)
  mkdir -p "$DIR/pki" && cd "$DIR/pki"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj /CN=bench-ca 2>/dev/null
  cert() {
    openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 30 \
      -extfile "$1.ext" 2>/dev/null
  }
  cert apiserver /CN=kube-apiserver
  cert admin "/O=system:masters/CN=admin"
  openssl genrsa -out sa.key 2048 2>/dev/null && openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  cd "$DIR"
  etcd --name bench --data-dir "/dev/shm/slmpack-bench-etcd-$$" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" --listen-peer-urls http://127.0.0.1:23891 \
    > "$DIR/etcd.log" 2>&1 &
  echo $! > "$DIR/etcd.pid"
  echo "/dev/shm/slmpack-bench-etcd-$$" > "$DIR/etcd.data"
  "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
    --service-cluster-ip-range 10.250.0.0/16 --tls-cert-file pki/apiserver.crt --tls-private-key-file pki/apiserver.key \
    --client-ca-file pki/ca.crt --service-account-key-file pki/sa.pub --service-account-signing-key-file pki/sa.key \
    --service-account-issuer https://kubernetes.default.svc --authorization-mode RBAC \
    --enable-admission-plugins NamespaceLifecycle --profiling=false > "$DIR/apiserver.log" 2>&1 &
  echo $! > "$DIR/apiserver.pid"
  k() { "$BIN/kubectl" --kubeconfig "$DIR/kubeconfig" "$@"; }
  k config set-cluster bench --server "https://127.0.0.1:$API_PORT" --certificate-authority pki/ca.crt \
    --embed-certs >/dev/null
  k config set-credentials admin --client-certificate pki/admin.crt --client-key pki/admin.key --embed-certs >/dev/null
  k config set-context bench --cluster bench --user admin >/dev/null
  k config use-context bench >/dev/null
  for _ in $(seq 60); do k get --raw /readyz >/dev/null 2>&1 && break; sleep 1; done
  k get --raw /readyz >/dev/null
  echo "KUBECONFIG=$DIR/kubeconfig"
  ;;
stop)
  for name in apiserver etcd; do
    [ -f "$DIR/$name.pid" ] && kill "$(cat "$DIR/$name.pid")" 2>/dev/null || true
  done
  sleep 2
  [ -f "$DIR/etcd.data" ] && rm -rf "$(cat "$DIR/etcd.data")"
  ;;
esac
