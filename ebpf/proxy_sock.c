/* The service proxy's eBPF mode: socket-level load balancing (compiled by BCC;
 * loaded and fed by ebpf/proxy_sock.py, driven by proxy/ebpf.py).
 *
 * Four cgroup sock_addr programs on the node's cgroup2 directory
 * (/sys/fs/cgroup/unified/corral/<node>, under which every pod has its own
 * directory), so they run for every pod process of the node and for nobody
 * else:
 *
 *   corral_conn4   connect() of a TCP socket to VIP:port: the destination
 *                  becomes a backend's own address before the kernel routes
 *                  anything, so the packets carry the backend IP, need no
 *                  conntrack NAT and take the overlay fast path unchanged.
 *   corral_send4   sendto()/sendmsg() of an unconnected UDP socket: the same,
 *                  per datagram.
 *   corral_recv4   recvfrom()/recvmsg() on such a socket: a datagram from the
 *                  backend shows the VIP:port it was sent to.
 *   corral_peer4   getpeername() of a connected socket: the VIP:port too.
 *
 * A connected UDP socket (connect() then send()) is left on the VIP: the
 * kernel runs no hook for its later send()s, so a translated socket would stay
 * on one backend for its whole life (what Cilium's users hit with DNS clients).
 * The node's DNAT rules take it, with their conntrack clean-up on failover.
 *
 * Maps (all pinned under /sys/fs/bpf/corral/<node>/, so a restarted proxy
 * reuses them and connections keep being translated through the restart):
 *
 *   proxy_svc      (VIP, port, proto) -> generation, count, flags, timeout.
 *                  count 0: the service has no usable endpoint: connect() and
 *                  sendmsg() fail at once with ECONNREFUSED.
 *   proxy_be       (generation, slot) -> backend address. A service's
 *                  backends are written under a fresh generation, then its
 *                  proxy_svc entry is switched in one update: a lookup sees the
 *                  old set or the new one, never a mix.
 *   proxy_member   (generation, backend) -> 1: is this backend in the set?
 *   proxy_aff      LRU (client, VIP, port, proto) -> backend, last use.
 *                  ClientIP affinity keyed by the client's IP: the socket's
 *                  bound address when it has one, else the pod's IP from
 *                  pod_cgroups (filled by the node runtime), else the cgroup
 *                  id (a process the runtime did not register).
 *   proxy_rev      LRU (socket cookie, backend) -> VIP:port, for recvmsg and
 *                  getpeername.
 *   pod_cgroups    cgroup id -> pod IP, owned by the node runtime
 *                  (runtime/podcgroups.py), shared with this source.
 *
 * Affinity races between CPUs: two connections of one client on two CPUs
 * must not stick it to two backends. A new entry is inserted with
 * BPF_NOEXIST; the loser of that race reads the winner's entry and uses its
 * backend. An entry is one 64-bit word (backend address, port, and the time
 * of last use in ~1.07 s units), so every later change (a refresh, or a new
 * backend once it expired or its backend left) is a compare-and-swap against
 * the word the decision was made on: a CPU that loses follows what the winner
 * wrote. No lock, no read-modify-write of a whole map value (Cilium's
 * affinity map is updated with plain map updates, which race). Idle expiry
 * is therefore exact to one unit: an entry goes between timeoutSeconds and
 * timeoutSeconds + 1.07 s after its last use; timeouts above ~19.5 h
 * (65534 units) count as 19.5 h.
 *
 * Addresses and ports are in network byte order everywhere.
 */
#include <uapi/linux/bpf.h>
#include <linux/errno.h>

#define PROTO_TCP 6
#define PROTO_UDP 17
#define SVC_AFFINITY 1
#define BACKEND_MASK 0xffffffffffffULL
#define STAMP_SHIFT 30  /* affinity time unit: 2^30 ns, about 1.07 s */

/* BCC 0.26 has no wrapper for this helper (kernel 5.19+); cgroup programs have it. */
static long (*set_retval)(int retval) = (void *)BPF_FUNC_set_retval;

struct svc_key {
    u32 vip;
    u16 port;
    u8 proto;
    u8 pad;
};

struct svc {
    u32 gen;      /* names this set of backends in proxy_be/proxy_member */
    u16 count;    /* usable backends; 0: refuse */
    u16 flags;    /* SVC_AFFINITY */
    u32 timeout;  /* affinity idle timeout, seconds */
    u32 epoch;    /* new each time affinity is switched on */
};

struct be_key {
    u32 gen;
    u32 slot;
};

struct backend {
    u32 ip;
    u16 port;
    u16 pad;
};

struct member_key {
    u32 gen;
    u32 ip;
    u16 port;
    u16 pad;
};

struct aff_key {
    u64 client;   /* an IPv4 address, or (1 << 63) | cgroup id */
    u32 vip;
    u16 port;
    u8 proto;
    u8 epoch;     /* the service's affinity epoch: entries of an earlier "on" never match */
};

struct aff {
    u64 word;     /* backend ip | port << 32 | last-use stamp << 48 */
};

struct rev_key {
    u64 cookie;
    u32 ip;
    u16 port;
    u16 pad;
};

struct rev {
    u32 vip;
    u16 port;
    u16 pad;
};

/* Hash maps grow with their entries (BPF_F_NO_PREALLOC): a node with few services
 * does not pay for 30k. LRU maps are always preallocated: kept at 64k entries. */
#ifdef CORRAL_PIN_DIR
#define GROWING(t, k, v, n, m) BPF_TABLE_PINNED(t, k, v, n, m, CORRAL_PIN_DIR "/" #n, BPF_F_NO_PREALLOC)
#else
#define GROWING(t, k, v, n, m) BPF_F_TABLE(t, k, v, n, m, BPF_F_NO_PREALLOC)
#endif

GROWING("hash", struct svc_key, struct svc, proxy_svc, 131072);
GROWING("hash", struct be_key, struct backend, proxy_be, 524288);
GROWING("hash", struct member_key, u8, proxy_member, 524288);
CORRAL_PINNED("lru_hash", struct aff_key, struct aff, proxy_aff, 65536);
CORRAL_PINNED("lru_hash", struct rev_key, struct rev, proxy_rev, 65536);
CORRAL_PINNED("hash", u64, u32, pod_cgroups, 16384);

static __always_inline u64 pack(u32 ip, u16 port) {
    return (u64)ip | ((u64)port << 32);
}

static __always_inline int is_member(u32 gen, u64 b) {
    struct member_key m = {.gen = gen, .ip = (u32)b, .port = (u16)(b >> 32)};
    return b && proxy_member.lookup(&m) != NULL;
}

static __always_inline u64 pick(const struct svc *s) {
    struct be_key k = {.gen = s->gen, .slot = bpf_get_prandom_u32() % s->count};
    struct backend *b = proxy_be.lookup(&k);
    return b ? pack(b->ip, b->port) : 0;
}

/* The client as ClientIP affinity sees it. */
static __always_inline u64 client_of(u32 bound) {
    if (bound)
        return bound;
    u64 cg = bpf_get_current_cgroup_id();
    u32 *ip = pod_cgroups.lookup(&cg);
    return ip ? *ip : ((1ULL << 63) | cg);
}

/* An affinity word: the backend and the time of its last use, in one u64 so
 * that a compare-and-swap decides every change (see the top). */
static __always_inline u64 word(u64 backend, u16 stamp) {
    return (backend & BACKEND_MASK) | ((u64)stamp << 48);
}

static __always_inline int fresh(u64 w, u16 stamp, u32 ttl) {
    return (u16)(stamp - (u16)(w >> 48)) <= ttl;
}

static __always_inline u64 sticky(const struct svc *s, struct svc_key *sk, u32 bound) {
    struct aff_key ak = {.client = client_of(bound), .vip = sk->vip, .port = sk->port,
                         .proto = sk->proto, .epoch = (u8)s->epoch};
    u16 stamp = (u16)(bpf_ktime_get_ns() >> STAMP_SHIFT);
    u64 units = (((u64)s->timeout * 1000000000ULL) >> STAMP_SHIFT) + 1;
    u32 ttl = units > 0xfffe ? 0xfffe : (u32)units;
    struct aff *a = proxy_aff.lookup(&ak);
    if (a) {
        u64 w = a->word;
        if (fresh(w, stamp, ttl) && is_member(s->gen, w & BACKEND_MASK)) {
            if ((u16)(w >> 48) != stamp) {  /* refresh; a lost race means someone else did */
                u64 was = __sync_val_compare_and_swap(&a->word, w, word(w, stamp));
                if (was != w && is_member(s->gen, was & BACKEND_MASK))
                    return was & BACKEND_MASK;
            }
            return w & BACKEND_MASK;
        }
        u64 b = pick(s);  /* expired, or its backend left: choose again */
        if (!b)
            return 0;
        u64 was = __sync_val_compare_and_swap(&a->word, w, word(b, stamp));
        if (was != w && is_member(s->gen, was & BACKEND_MASK))
            return was & BACKEND_MASK;  /* another CPU replaced it first: follow it */
        return b;
    }
    u64 b = pick(s);
    if (!b)
        return 0;
    struct aff n = {.word = word(b, stamp)};
    if (proxy_aff.insert(&ak, &n) == 0)  /* BPF_NOEXIST */
        return b;
    a = proxy_aff.lookup(&ak);  /* another CPU inserted first: use its choice */
    if (a && is_member(s->gen, a->word & BACKEND_MASK))
        return a->word & BACKEND_MASK;
    return b;
}

/* The backend for (VIP, port, proto), 0 when the address is no service;
 * *refuse = 1 when it is one without usable endpoints. */
static __always_inline u64 translate(u32 vip, u32 port, u8 proto, u32 bound, int *refuse) {
    struct svc_key sk = {.vip = vip, .port = (u16)port, .proto = proto};
    struct svc *s = proxy_svc.lookup(&sk);
    if (!s)
        return 0;
    if (s->count == 0) {
        *refuse = 1;
        return 0;
    }
    if (s->flags & SVC_AFFINITY)
        return sticky(s, &sk, bound);
    return pick(s);
}

static __always_inline void remember(void *ctx, u64 b, u32 vip, u32 port) {
    struct rev_key rk = {.cookie = bpf_get_socket_cookie(ctx), .ip = (u32)b,
                         .port = (u16)(b >> 32)};
    struct rev r = {.vip = vip, .port = (u16)port};
    proxy_rev.update(&rk, &r);
}

static __always_inline int refused(void) {
    set_retval(-ECONNREFUSED);
    return 0;
}

int corral_conn4(struct bpf_sock_addr *ctx) {
    if (ctx->protocol != PROTO_TCP)
        return 1;  /* connected UDP: the node's DNAT takes it (see the top) */
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    u32 vip = ctx->user_ip4, port = ctx->user_port;
    int refuse = 0;
    u64 b = translate(vip, port, PROTO_TCP, sk->src_ip4, &refuse);
    if (refuse)
        return refused();
    if (!b)
        return 1;
    ctx->user_ip4 = (u32)b;
    ctx->user_port = (u16)(b >> 32);
    remember(ctx, b, vip, port);
    return 1;
}

int corral_send4(struct bpf_sock_addr *ctx) {
    if (ctx->protocol != PROTO_UDP)
        return 1;
    u32 vip = ctx->user_ip4, port = ctx->user_port;
    u32 bound = ctx->msg_src_ip4;
    struct bpf_sock *sk = ctx->sk;
    if (!bound && sk)
        bound = sk->src_ip4;
    int refuse = 0;
    u64 b = translate(vip, port, PROTO_UDP, bound, &refuse);
    if (refuse)
        return refused();
    if (!b)
        return 1;
    ctx->user_ip4 = (u32)b;
    ctx->user_port = (u16)(b >> 32);
    remember(ctx, b, vip, port);
    return 1;
}

static __always_inline void show_vip(struct bpf_sock_addr *ctx) {
    struct rev_key rk = {.cookie = bpf_get_socket_cookie(ctx), .ip = ctx->user_ip4,
                         .port = (u16)ctx->user_port};
    struct rev *r = proxy_rev.lookup(&rk);
    if (r) {
        ctx->user_ip4 = r->vip;
        ctx->user_port = r->port;
    }
}

int corral_recv4(struct bpf_sock_addr *ctx) {
    show_vip(ctx);
    return 1;
}

int corral_peer4(struct bpf_sock_addr *ctx) {
    show_vip(ctx);
    return 1;
}
