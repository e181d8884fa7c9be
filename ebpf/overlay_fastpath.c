/* The overlay's eBPF fast path for pod traffic between nodes (compiled by BCC;
 * loaded and fed by corral/overlay/fastpath.py).
 *
 * Three tc (clsact ingress) programs in a node's network namespace:
 *
 *   from_pod      on each pod's host-side veth. A packet for a pod on another
 *                 node is VXLAN-encapsulated here, exactly as the kernel's
 *                 corral.<VNI> device would, and sent straight out of the
 *                 underlay interface. A packet for a pod on this node goes
 *                 straight into that pod's namespace (bpf_redirect_peer).
 *   from_uplink   on the underlay interface. A VXLAN packet of our VNI for a
 *                 pod on this node is decapsulated and put into the pod.
 *   from_overlay  on corral.<VNI>. What the kernel decapsulated (fragments, or
 *                 peers without the fast path) goes straight into the pod.
 *
 * Everything else (ARP, other destinations, a TTL about to expire, a pod or
 * peer the maps do not know yet) is left to the kernel (TC_ACT_OK), whose
 * path stays complete: the fast path is an optimisation, never a requirement.
 *
 * Guards (docs/overlay.md, "What a pod cannot do"), the same ones the kernel
 * path applies with ebtables and iptables:
 *   from_pod      drops a frame whose source MAC, IPv4 source or ARP sender is
 *                 not the pod's own (the `veths` map, by the veth's ifindex),
 *                 anything that is neither IPv4 nor ARP (IPv6 included), and
 *                 any pod packet to the VXLAN UDP port.
 *   from_uplink   drops VXLAN to us from an underlay address that is not a
 *                 peer's (the `peer_ips` map: every other lease's public IP).
 * Each node routes like the kernel would: the TTL drops by one per node on the
 * way between nodes, and not at all between pods of one node (bridged).
 *
 * Addresses in the maps are in network byte order.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

#define PROTO_UDP 17
#define VXLAN_FLAG_VNI 0x08000000
#define IP_DF 0x4000
#define IP_MF_OFFSET 0x3fff
#define IP_OFFSET_MASK 0x1fff

/* BCC 0.26 declares this helper with three arguments; the kernel takes four. */
static long (*redirect_neigh)(u32 ifindex, void *params, int plen, u64 flags) =
    (void *)BPF_FUNC_redirect_neigh;

struct config {
    u32 cluster_net, cluster_mask;  /* the cluster's pod network */
    u32 subnet, subnet_mask;        /* this node's lease */
    u32 uplink;                     /* ifindex of the underlay interface */
    u32 local_ip;                   /* this node's underlay address */
    u32 vni;
    u16 port;                       /* VXLAN UDP port, network order */
    u8 vtep_mac[6];                 /* this node's VTEP (corral.<VNI>) MAC */
};

struct pod {                        /* a pod on this node, by its IP */
    u32 ifindex;                    /* host-side veth */
    u8 pod_mac[6];
    u8 host_mac[6];
};

struct peer {                       /* another node, by its subnet's address */
    u32 ip;                         /* underlay address */
    u32 nexthop;                    /* = ip when on-link on the underlay, else 0 (ask the FIB) */
    u8 vtep_mac[6];
    u8 pad[2];
};

struct source {                     /* what a pod veth may send from, by the veth's ifindex */
    u32 ip;                         /* the pod's IP */
    u32 extra_net, extra_mask;      /* an opt-in extra source prefix (mask 0: none) */
    u8 mac[6];                      /* the pod's MAC */
    u8 pad[2];
};

/* An Ethernet/IPv4 ARP body. Spelled out: including uapi/linux/if_arp.h for its
 * struct arphdr makes BCC's compile ~1 s longer (0.2 -> 1.1 s here). */
struct arp4 {
    __be16 ar_hrd, ar_pro;
    u8 ar_hln, ar_pln;
    __be16 ar_op;
    u8 sha[6];
    u32 spa;
    u8 tha[6];
    u32 tpa;
} __attribute__((packed));

struct outer {
    struct iphdr ip;
    struct udphdr udp;
    u32 vx_flags;
    u32 vx_vni;
    struct ethhdr eth;
} __attribute__((packed));

BPF_ARRAY(config, struct config, 1);
BPF_HASH(pods, u32, struct pod, 4096);
BPF_HASH(peers, u32, struct peer, 16384);
BPF_HASH(veths, u32, struct source, 4096);
BPF_HASH(peer_ips, u32, u8, 16384);
/* packets handled: 0 encapsulated, 1 decapsulated, 2 delivered locally, 3 left to the kernel;
 * dropped: 4 spoofed source (MAC, IPv4 or ARP sender), 5 pod to the VXLAN port,
 * 6 VXLAN from an address that is no peer's, 7 neither IPv4 nor ARP from a pod */
#define DROP_SPOOFED 4
#define DROP_VXLAN_FROM_POD 5
#define DROP_VXLAN_FOREIGN 6
#define DROP_NOT_IPV4 7
BPF_PERCPU_ARRAY(stats, u64, 8);

/* ---- service proxy: replies of DNATed flows stay on the kernel path ---------
 * `corral proxy --mode iptables` DNATs service traffic in the node's netfilter;
 * only the kernel path un-DNATs the replies (conntrack), so a packet *from* a
 * service endpoint (IP, port, protocol: what the proxy writes into this pinned
 * map, ebpf/proxy_endpoints.py) is never taken past netfilter by the fast path.
 * Everything else keeps the fast path. Shared with the proxy through the pin
 * /sys/fs/bpf/corral/<node>/proxy_endpoints. */
struct proxy_ep {
    u32 ip;     /* network order */
    u16 port;   /* network order */
    u8 proto;   /* IPPROTO_TCP, _UDP, _SCTP */
    u8 pad;
};
CORRAL_PINNED("hash", struct proxy_ep, u8, proxy_endpoints, 65536);

/* 1 when `ip` (a bounds-checked IPv4 header) comes from a service endpoint. */
static __always_inline int from_endpoint(struct iphdr *ip, void *end) {
    u8 proto = ip->protocol;
    if (proto != 6 && proto != 17 && proto != 132)
        return 0;
    if (ip->ihl != 5)
        return 1;  /* options: leave it to the kernel */
    u16 *ports = (void *)(ip + 1);  /* the source port comes first in TCP, UDP and SCTP */
    if ((void *)(ports + 1) > end)
        return 1;
    struct proxy_ep k = {.ip = ip->saddr, .port = ports[0], .proto = proto};
    return proxy_endpoints.lookup(&k) != NULL;
}
/* ---- end service proxy ------------------------------------------------------ */

/* ---- NetworkPolicy: isolated pods' packets meet netfilter --------------------
 * The node agent's NetworkPolicy component judges new flows in FORWARD
 * (netpolicy/rules.py) and puts every local pod a policy isolates into this
 * pinned map (ebpf/netpol_pods.py): a packet from or to one of them is left to
 * the kernel. Shared through the pin /sys/fs/bpf/corral/<node>/netpol_pods. */
CORRAL_PINNED("hash", u32, u8, netpol_pods, 65536);

static __always_inline int policed(u32 a, u32 b) {
    return netpol_pods.lookup(&a) != NULL || netpol_pods.lookup(&b) != NULL;
}
/* ---- end NetworkPolicy ------------------------------------------------------- */

static __always_inline void count(int what) {
    u64 *n = stats.lookup(&what);
    if (n)
        *n += 1;
}

static __always_inline struct config *get_config(void) {
    int zero = 0;
    return config.lookup(&zero);
}

/* Drop the TTL of the IPv4 header at `off` by one (the caller checked it is > 1). */
static __always_inline int dec_ttl(struct __sk_buff *skb, u32 off, u8 ttl, u8 proto) {
    u16 old = bpf_htons(((u16)ttl << 8) | proto);
    u16 new = bpf_htons(((u16)(ttl - 1) << 8) | proto);
    if (bpf_l3_csum_replace(skb, off + offsetof(struct iphdr, check), old, new, 2))
        return -1;
    u8 t = ttl - 1;
    return bpf_skb_store_bytes(skb, off + offsetof(struct iphdr, ttl), &t, 1, 0);
}

/* Into the namespace of the local pod `p`, with the L2 header it expects. */
static __always_inline int into_pod(struct __sk_buff *skb, struct pod *p) {
    if (bpf_skb_store_bytes(skb, 0, p->pod_mac, 6, 0) ||
        bpf_skb_store_bytes(skb, 6, p->host_mac, 6, 0))
        return TC_ACT_SHOT;
    return bpf_redirect_peer(p->ifindex, 0);
}

static __always_inline u16 ip_checksum(struct iphdr *ip) {
    u32 sum = 0;
    u16 *w = (u16 *)ip;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
        sum += w[i];
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
}

static __always_inline int same_mac(const u8 *a, const u8 *b) {
    return *(u32 *)a == *(u32 *)b && *(u16 *)(a + 4) == *(u16 *)(b + 4);
}

static __always_inline int allowed_ip(struct source *s, u32 ip) {
    return ip == s->ip || (s->extra_mask && (ip & s->extra_mask) == s->extra_net);
}

/* 0 when the frame is from the pod's own MAC and address, else the stats slot to drop with. */
static __always_inline int check_source(struct ethhdr *eth, void *end, struct source *s) {
    if (!same_mac(eth->h_source, s->mac))
        return DROP_SPOOFED;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > end)
            return DROP_SPOOFED;
        return allowed_ip(s, ip->saddr) ? 0 : DROP_SPOOFED;
    }
    if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
        struct arp4 *a = (void *)(eth + 1);
        if ((void *)(a + 1) > end || a->ar_hln != 6 || a->ar_pln != 4)
            return DROP_SPOOFED;
        return same_mac(a->sha, s->mac) && allowed_ip(s, a->spa) ? 0 : DROP_SPOOFED;
    }
    return DROP_NOT_IPV4;
}

int from_pod(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(eth + 1) > end)
        return TC_ACT_OK;
    u32 ifindex = skb->ifindex;
    struct source *s = veths.lookup(&ifindex);
    if (s) {  /* a veth the agent does not know (yet) is left to the kernel's guard */
        int bad = check_source(eth, end, s);
        if (bad) {
            count(bad);
            return TC_ACT_SHOT;
        }
    }
    if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    struct config *c = get_config();
    if (!c)
        return TC_ACT_OK;
    if (ip->protocol == PROTO_UDP && !(ip->frag_off & bpf_htons(IP_OFFSET_MASK))) {
        /* no pod sends to the VXLAN port, wherever it is: a node, a pod, the outside */
        u16 dport = 0;
        u32 at = sizeof(*eth) + ip->ihl * 4 + offsetof(struct udphdr, dest);
        if (bpf_skb_load_bytes(skb, at, &dport, sizeof(dport)) || dport == c->port) {
            count(DROP_VXLAN_FROM_POD);
            return TC_ACT_SHOT;
        }
    }
    u32 dst = ip->daddr;
    if ((dst & c->cluster_mask) != c->cluster_net)
        return TC_ACT_OK;
    if (policed(ip->saddr, dst))
        goto kernel;
    u8 ttl = ip->ttl, proto = ip->protocol, tos = ip->tos;

    if ((dst & c->subnet_mask) == c->subnet) {
        /* Same subnet: the kernel's bridge would switch it (no routing, TTL kept,
         * the pods' own MACs from ARP); skip the bridge and do the same. */
        struct pod *p = pods.lookup(&dst);
        if (!p || from_endpoint(ip, end))  /* service proxy: replies to the kernel */
            goto kernel;
        count(2);
        return bpf_redirect_peer(p->ifindex, 0);
    }

    u32 key = dst & c->subnet_mask;
    struct peer *peer = peers.lookup(&key);
    if (!peer || ttl <= 1)  /* the kernel sends the ICMP time exceeded */
        goto kernel;
    struct outer h = {};
    u32 inner_len = skb->len - sizeof(*eth);
    if (inner_len + sizeof(h) > 0xffff)  /* an outer length that would not fit (UDP GSO) */
        goto kernel;
    h.ip.version = 4;
    h.ip.ihl = 5;
    h.ip.tos = tos;
    h.ip.tot_len = bpf_htons(inner_len + sizeof(h));
    h.ip.frag_off = bpf_htons(IP_DF);  /* inner MTU = underlay MTU - 50: never needed */
    h.ip.ttl = 64;
    h.ip.protocol = PROTO_UDP;
    h.ip.saddr = c->local_ip;
    h.ip.daddr = peer->ip;
    h.ip.check = ip_checksum(&h.ip);
    /* Source port from the inner flow's hash, as the kernel does: spreads flows
     * over the underlay's ECMP paths and receive queues. */
    h.udp.source = bpf_htons(32768 + bpf_get_hash_recalc(skb) % 28232);
    h.udp.dest = c->port;
    h.udp.len = bpf_htons(inner_len + sizeof(h) - sizeof(h.ip));
    h.vx_flags = bpf_htonl(VXLAN_FLAG_VNI);
    h.vx_vni = bpf_htonl(c->vni << 8);
    __builtin_memcpy(h.eth.h_dest, peer->vtep_mac, 6);
    __builtin_memcpy(h.eth.h_source, c->vtep_mac, 6);
    h.eth.h_proto = bpf_htons(ETH_P_IP);
    u32 uplink = c->uplink, nexthop = peer->nexthop;

    u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
                BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
                BPF_F_ADJ_ROOM_ENCAP_L2(sizeof(struct ethhdr));
    if (bpf_skb_adjust_room(skb, sizeof(h), BPF_ADJ_ROOM_MAC, flags))
        goto kernel;  /* untouched: the kernel's path takes it */
    if (bpf_skb_store_bytes(skb, sizeof(*eth), &h, sizeof(h), 0) ||
        dec_ttl(skb, sizeof(*eth) + sizeof(h), ttl, proto))
        return TC_ACT_SHOT;
    count(0);
    /* The neighbour table fills in the outer MACs (resolving them if need be);
     * for a peer behind a router the FIB picks the next hop first. */
    if (nexthop) {
        struct bpf_redir_neigh nh = {.nh_family = 2 /* AF_INET */, .ipv4_nh = nexthop};
        return redirect_neigh(uplink, &nh, sizeof(nh), 0);
    }
    return redirect_neigh(uplink, NULL, 0, 0);

kernel:
    count(3);
    return TC_ACT_OK;
}

int from_uplink(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct outer *h = (void *)(eth + 1);
    struct iphdr *in = (void *)(h + 1);
    if ((void *)(in + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    struct config *c = get_config();
    if (!c || h->ip.ihl != 5 || h->ip.protocol != PROTO_UDP || h->udp.dest != c->port ||
        h->ip.daddr != c->local_ip)
        return TC_ACT_OK;
    u32 from = h->ip.saddr;
    if (!peer_ips.lookup(&from)) {  /* VXLAN only from the nodes holding leases */
        count(DROP_VXLAN_FOREIGN);
        return TC_ACT_SHOT;
    }
    if ((h->ip.frag_off & bpf_htons(IP_MF_OFFSET)) || h->vx_vni != bpf_htonl(c->vni << 8) ||
        h->eth.h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    u32 dst = in->daddr;
    u8 ttl = in->ttl, proto = in->protocol;
    struct pod *p = pods.lookup(&dst);
    if (!p || ttl <= 1 || from_endpoint(in, end) || policed(in->saddr, dst)) {
        count(3);
        return TC_ACT_OK;
    }
    if (bpf_skb_adjust_room(skb, -(int)sizeof(*h), BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
        return TC_ACT_OK;
    if (dec_ttl(skb, sizeof(*eth), ttl, proto))
        return TC_ACT_SHOT;
    count(1);
    return into_pod(skb, p);
}

int from_overlay(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    u32 dst = ip->daddr;
    u8 ttl = ip->ttl, proto = ip->protocol;
    struct pod *p = pods.lookup(&dst);
    if (!p || ttl <= 1 || from_endpoint(ip, end) || policed(ip->saddr, dst) ||
        dec_ttl(skb, sizeof(*eth), ttl, proto)) {
        count(3);
        return TC_ACT_OK;
    }
    count(1);
    return into_pod(skb, p);
}
