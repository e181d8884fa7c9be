/* Test-only cgroup programs for tests/test_ebpf_loader.py (compiled by BCC
 * through corral.ebpf.loader.CgroupPrograms).
 *
 *   corral_connect4  connect4: a TCP/UDP connect to a port listed in `ports`
 *                    goes to the port it maps to instead (counted in counts[0]).
 *   corral_sock      sock_create: counts sockets made in the cgroup (counts[1]).
 *   corral_sendmsg4, corral_recvmsg4, corral_getpeer4
 *                    the eBPF proxy's other hooks; they only allow the call.
 *   other_connect4   connect4, does nothing: stands for somebody else's program
 *                    (not a corral_ name), which corral must never detach.
 *
 * `ports` and `counts` are pinned per node; `bulk_*` are plain maps for the
 * batch-update tests (per-CPU maps are updated one entry at a time).
 */
#include <uapi/linux/bpf.h>

#ifndef PORTS_MAX
#define PORTS_MAX 64  /* a test redefines it: a pinned map whose layout changed */
#endif
CORRAL_PINNED("hash", u32, u32, ports, PORTS_MAX);  /* destination port -> new port, host order */
CORRAL_PINNED("array", u32, u64, counts, 2);
BPF_HASH(bulk_hash, u32, u64, 65536);
BPF_ARRAY(bulk_array, u64, 65536);
struct prefix { u32 len; u32 ip; };
BPF_LPM_TRIE(bulk_lpm, struct prefix, u32, 64);
BPF_PERCPU_ARRAY(bulk_percpu, u64, 16);

static __always_inline void count(u32 what) {
    u64 *n = counts.lookup(&what);
    if (n)
        __sync_fetch_and_add(n, 1);
}

int corral_connect4(struct bpf_sock_addr *ctx) {
    u32 port = __builtin_bswap16((u16)ctx->user_port);
    u32 *to = ports.lookup(&port);
    if (to) {
        ctx->user_port = __builtin_bswap16((u16)*to);
        count(0);
    }
    return 1; /* allow the connect */
}

int corral_sock(struct bpf_sock *sk) {
    count(1);
    return 1;
}

int corral_sendmsg4(struct bpf_sock_addr *ctx) {
    return 1;
}

int corral_recvmsg4(struct bpf_sock_addr *ctx) {
    return 1; /* recvmsg and getpeername programs must return 1 */
}

int corral_getpeer4(struct bpf_sock_addr *ctx) {
    return 1;
}

int other_connect4(struct bpf_sock_addr *ctx) {
    return 1;
}
