#!/usr/bin/env bash
# Idempotent set-up for corral on Debian 12 (run as root): installs the Debian
# packages corral needs, then a venv with corral and its Python dependencies.
# Every step checks before it acts, so a second run does nothing and is quick.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CORRAL_VENV:-$ROOT/.venv}"

# Debian packages, grouped by the part of corral that needs them.
PKGS=(
  # foundation: netns/veth/bridge, etcd, debugging tools
  # (iptables also brings ebtables-nft, which the pod guard uses: corral.node.podguard)
  iproute2 iptables conntrack etcd-server etcd-client tcpdump iputils-ping
  dnsutils util-linux procps psmisc curl ca-certificates
  # python venv built on Debian's interpreter (BCC's bindings are built for it)
  python3 python3-venv python3-dev gcc make git
  # CLI: the shell the zsh completion test loads `corral completion zsh` in
  zsh
  # CNI: reference plugins and the libcni client the tests build
  containernetworking-plugins golang-go golang-github-appc-cni-dev
  # overlay: the eBPF fast path is compiled by BCC against kernel headers
  python3-bpfcc linux-headers-amd64
  # overlay benchmarks
  iperf3
  # service proxy: ClientIP affinity sets (ip_set is built into the kernel); the
  # nftables mode drives libnftables in-process through Debian's Python bindings
  ipset nftables python3-nftables
  # real CNI runtimes in the tests (tests/test_cni_runtimes.py): podman (CNI backend)
  # and containerd's ctr on runc; a static busybox is the containers' root filesystem
  podman containerd runc busybox-static
  # cluster DNS benchmark: the load generator and the peer server (bench/dns.py)
  dnsperf unbound
)

log() { printf 'bootstrap: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  echo "bootstrap: corral manages network namespaces and must run as root" >&2
  exit 1
fi

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Package scripts must not start daemons (etcd) on this machine: corral starts its own.
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; made_policy=1
  fi
  trap '[[ $made_policy == 1 ]] && rm -f "$policy"' EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# BCC compiles against /lib/modules/$(uname -r)/build. Debian ships headers for
# its own kernels only; on another kernel, point the links at the newest Debian
# headers (the fast path uses only the stable uapi structures).
kdir="/lib/modules/$(uname -r)"
if [[ ! -e $kdir/build/include ]]; then
  arch_hdr="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)"
  if [[ -n $arch_hdr && -d ${arch_hdr%-amd64}-common ]]; then
    log "linking kernel headers $arch_hdr for BCC (kernel $(uname -r))"
    mkdir -p "$kdir"
    ln -sfn "$arch_hdr" "$kdir/build"
    ln -sfn "${arch_hdr%-amd64}-common" "$kdir/source"
  else
    log "no kernel headers for BCC: the eBPF fast path stays off"
  fi
fi

PY=/usr/bin/python3
stamp="$VENV/.corral-stamp"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [[ ! -x $VENV/bin/python ]]; then
  log "creating venv at $VENV"
  "$PY" -m venv "$VENV"
fi
if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
  log "installing corral and its Python dependencies into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e "$ROOT[dev]"
  echo "$want" >"$stamp"
fi
# BCC's Python bindings are Debian's (pure Python over libbcc): expose just that
# package to the venv, not all of Debian's dist-packages.
bcc_src=/usr/lib/python3/dist-packages/bcc
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [[ -d $bcc_src ]]; then
  mkdir -p "$VENV/debian-bcc"
  ln -sfn "$bcc_src" "$VENV/debian-bcc/bcc"
  [[ -f $site/corral-bcc.pth ]] || echo "$VENV/debian-bcc" >"$site/corral-bcc.pth"
fi
# The same for libnftables' bindings (pure Python over libnftables.so.1, ctypes),
# which the proxy's nftables mode uses in-process.
nft_src=/usr/lib/python3/dist-packages/nftables
if [[ -d $nft_src ]]; then
  mkdir -p "$VENV/debian-nftables"
  ln -sfn "$nft_src" "$VENV/debian-nftables/nftables"
  [[ -f $site/corral-nftables.pth ]] || echo "$VENV/debian-nftables" >"$site/corral-nftables.pth"
fi
log "ready ($VENV)"
