#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and kubectl 1.20.2 from Debian bookworm's
# `kubernetes` source package (the only way to get a real control plane on a machine with no
# container engine and no internet besides the package registries). The binaries are cached
# outside the repository, so only the first run on a machine pays the ~8 minutes.
# See docs/testing.md for why each step exists.
set -euo pipefail

CACHE_DIR="${THING_OPERATOR_CACHE:-$HOME/.cache/thing-operator}"
K8S_BIN="$CACHE_DIR/k8s-1.20.2/bin"
LOG_PREFIX="[control-plane build]"

have_binaries() {
  [[ -x "$K8S_BIN/kube-apiserver" && -x "$K8S_BIN/kube-controller-manager" && -x "$K8S_BIN/kubectl" ]]
}

if have_binaries; then
  echo "$LOG_PREFIX cached binaries found in $K8S_BIN"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

echo "$LOG_PREFIX installing build dependencies"
if ! ls /etc/apt/sources.list.d/*-src.sources >/dev/null 2>&1; then
  # A deb-src twin of the Debian sources, so `apt-get source` works.
  for f in /etc/apt/sources.list.d/debian.sources; do
    [[ -f "$f" ]] || continue
    sed 's/^Types: deb$/Types: deb-src/' "$f" | $SUDO tee /etc/apt/sources.list.d/debian-src.sources >/dev/null
  done
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq golang-go rsync jq etcd-server golang-github-modern-go-reflect2-dev dpkg-dev >/dev/null

WORK="$CACHE_DIR/k8s-src"
rm -rf "$WORK"
mkdir -p "$WORK"
cd "$WORK"
echo "$LOG_PREFIX fetching the kubernetes source package"
apt-get source --download-only kubernetes >/dev/null
tar xzf kubernetes_*.orig.tar.gz
SRC=$(find . -maxdepth 1 -mindepth 1 -type d -name 'kubernetes*' | head -n1)
cd "$SRC"

# reflect2 v1.0.1 (vendored) segfaults under Go >= 1.18 on the first JSON map encode; 1.0.2 fixes it.
echo "$LOG_PREFIX replacing vendored reflect2 with Debian's 1.0.2"
R2=vendor/github.com/modern-go/reflect2
rm -f "$R2"/*.go "$R2"/*.s
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$R2"/
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$R2"/ 2>/dev/null || true
rm -f "$R2"/*_test.go

mkdir -p .go/src/k8s.io
ln -sfn ../../.. .go/src/k8s.io/kubernetes
echo "$LOG_PREFIX building (about 8 minutes on 2 cores)"
GOPATH=$PWD/.go CGO_ENABLED=0 make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kubectl" >"$CACHE_DIR/k8s-build.log" 2>&1 || {
  echo "$LOG_PREFIX build failed; last lines of $CACHE_DIR/k8s-build.log:" >&2
  tail -n 40 "$CACHE_DIR/k8s-build.log" >&2
  exit 1
}
mkdir -p "$K8S_BIN"
for b in kube-apiserver kube-controller-manager kubectl; do
  cp "$(find _output -type f -name "$b" | head -n1)" "$K8S_BIN/$b"
done
cd "$CACHE_DIR"
rm -rf "$WORK"
echo "$LOG_PREFIX done: $K8S_BIN"
