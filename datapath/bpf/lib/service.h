// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Services: a pod's packet to a Service address becomes a packet to one
 * of its backends at from_pod, so it takes the fast path like any packet
 * between pods, and the backend's answers become the Service's again
 * before the client sees them.
 *
 * The node agent writes, per frontend (a Service address, port and
 * protocol), its entry in ferrite_svc (an id, how many backends, session
 * affinity), its backends' ids in slots 1..count (ferrite_svcslot) and
 * each backend (ferrite_backend: address, port, and whether it is
 * terminating). A flow's first packet picks a slot at random (or the
 * client's affine backend) and records the choice in ferrite_svcct, keyed
 * by the flow as the client sends it, and the way back in ferrite_svcrev,
 * keyed by the answer as the backend sends it. Later packets read the
 * choice and check the backend still exists: a backend that is gone (or,
 * for UDP, terminating) is replaced on the flow's next packet, so a
 * connected UDP socket moves to a live backend at once, while a TCP
 * connection may finish on a terminating one.
 *
 * The answer is translated back at the last of ferrite's hooks before the
 * client: from_pod when it redirects the answer to a client on this node,
 * from_uplink for one from another node, to_pod for one the host stack
 * carried (which then saw the whole flow untranslated, as its conntrack
 * needs). A backend reaching its own Service (hairpin) sees the Service
 * address as the source, so its answer comes back through from_pod.
 *
 * Only TCP and UDP first packets that are not fragments are translated;
 * everything else keeps its addresses and goes to the host stack (where
 * kube-proxy, when it runs, serves it).
 */
#ifndef FERRITE_SERVICE_H
#define FERRITE_SERVICE_H

#include <stddef.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#include "common.h"
#include "conntrack.h"
#include "flow.h"

#define FERRITE_MAX_FRONTENDS 65536
#define FERRITE_MAX_BACKENDS 65536
#define FERRITE_MAX_SVC_SLOTS 262144
/* The default size of each Service flow table; the loader sets the real one. */
#define FERRITE_SVC_CT_DEFAULT_ENTRIES 65536
#define FERRITE_SVC_AFFINITY_ENTRIES 65536

/* Source ports a NodePort flow to another node's backend may take. */
#define SVC_NAT_PORT_MIN 32768
#define SVC_NAT_PORTS 28232
#define SVC_NAT_TRIES 4

/* How long an idle flow keeps its backend. */
#define SVC_CT_LIFETIME_TCP_NS (21600ULL * 1000000000ULL)
#define SVC_CT_LIFETIME_UDP_NS (120ULL * 1000000000ULL)

/*
 * ferrite_svc key: a frontend. @scope keeps apart the node agent's
 * frontends (Services and NodePorts, SVC_SCOPE_SERVICE) and the hostPorts
 * that ADD writes for a pod's runtimeConfig.portMappings
 * (SVC_SCOPE_HOSTPORT, its address the hostIP or the family's
 * unspecified one), which may share an address and port with a NodePort.
 */
struct svc_key {
	union v6addr addr;
	__be16 port;
	__u8 proto;
	__u8 scope;
};

#define SVC_SCOPE_SERVICE 0
#define SVC_SCOPE_HOSTPORT 1
_Static_assert(sizeof(struct svc_key) == 20, "svc_key size");

/* svc_value.flags: sessionAffinity ClientIP. */
#define SVC_F_AFFINITY 0x1
/*
 * svc_value.flags: a NodePort (its key's address is the unspecified one:
 * every address of the node) whose traffic from outside to a backend on
 * another node takes the node's address as its source, so the answer
 * comes back through this node (externalTrafficPolicy Cluster).
 */
#define SVC_F_SNAT 0x2

/*
 * ferrite_svccfg[0]: SVCCFG_NODEPORTS when the agent programs NodePorts
 * (kube-proxy is not running): only then do from_uplink and from_pod look
 * for them and for their answers. SVCCFG_HOSTPORTS when the node's
 * network serves hostPorts in the datapath (ferrite, not portmap, has the
 * portMappings capability): only then do the programs look for them, and
 * from_pod for their answers to clients off the node.
 */
#define SVCCFG_NODEPORTS 0x1
#define SVCCFG_HOSTPORTS 0x2

struct svc_value {
	__u32 id;		/* the frontend's id, never 0 */
	__u32 count;		/* active backends, in slots 1..count */
	__u32 flags;		/* SVC_F_* */
	__u32 affinity_timeout;	/* seconds */
};
_Static_assert(sizeof(struct svc_value) == 16, "svc_value size");

struct slot_key {
	__u32 id;
	__u32 slot;
};

/* backend.flags: no new flows go there; TCP flows may finish. */
#define BACKEND_F_TERMINATING 0x1

/* ferrite_backend value, keyed by the backend's id. */
struct backend {
	union v6addr addr;
	__be16 port;
	__u16 _pad;
	__u32 frontend;		/* the id of the frontend it serves */
	__u32 flags;		/* BACKEND_F_* */
	__u32 _pad2;
};
_Static_assert(sizeof(struct backend) == 32, "backend size");

/* ferrite_svcct value, keyed by the flow as the client sends it. */
struct svc_ct {
	__u64 seen;
	__u32 backend;
	__u32 frontend;
	__be16 nat_port;	/* a NodePort flow's source port to the backend, or 0 */
	__u16 _pad;
	__u32 _pad2;
};
_Static_assert(sizeof(struct svc_ct) == 24, "svc_ct size");

/* ferrite_svcrev value, keyed by the answer as the backend sends it. */
struct svc_rev {
	union v6addr vip;	/* the Service address the client used */
	union v6addr client;	/* the client (the answer's real destination) */
	__be16 vport;
	__be16 cport;		/* the client's port */
	__u32 frontend;
};
_Static_assert(sizeof(struct svc_rev) == 40, "svc_rev size");

struct aff_key {
	__u32 frontend;
	__u32 _pad;
	union v6addr client;
};
_Static_assert(sizeof(struct aff_key) == 24, "aff_key size");

struct aff_value {
	__u64 seen;
	__u32 backend;
	__u32 _pad;
};

/* ferrite_svcstat value (per CPU), keyed by frontend id. */
struct svc_stats {
	__u64 packets;		/* translated towards a backend */
	__u64 bytes;
	__u64 flows;		/* backends chosen (new flows, and re-chosen) */
	__u64 rejected;		/* answered "unreachable": no backend */
};
_Static_assert(sizeof(struct svc_stats) == 32, "svc_stats size");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FERRITE_MAX_FRONTENDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FERRITE_MAX_SVC_SLOTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct slot_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_svcslot SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FERRITE_MAX_BACKENDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_backend SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FERRITE_SVC_CT_DEFAULT_ENTRIES);
	__type(key, struct flow_key);
	__type(value, struct svc_ct);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_svcct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FERRITE_SVC_CT_DEFAULT_ENTRIES);
	__type(key, struct flow_key);
	__type(value, struct svc_rev);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_svcrev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FERRITE_SVC_AFFINITY_ENTRIES);
	__type(key, struct aff_key);
	__type(value, struct aff_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_svcaff SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_svccfg SEC(".maps");

/*
 * Which frontends of the node's own address a packet to it may be for
 * (svc_forward's @lookup): the hostPorts and, without kube-proxy, the
 * NodePorts; 0 for none.
 */
#define SVC_LOOKUP_NODEPORT 0x1
#define SVC_LOOKUP_HOSTPORT 0x2

static __always_inline int node_frontends(void)
{
	__u32 zero = 0;
	__u32 *on = bpf_map_lookup_elem(&ferrite_svccfg, &zero);
	__u32 cfg = on ? *on : 0;

	return ((cfg & SVCCFG_NODEPORTS) ? SVC_LOOKUP_NODEPORT : 0) |
	       ((cfg & SVCCFG_HOSTPORTS) ? SVC_LOOKUP_HOSTPORT : 0);
}

/* @a becomes the unspecified address of @like's family. */
static __always_inline void unspecified_like(union v6addr *a,
					     const union v6addr *like)
{
	__builtin_memset(a, 0, sizeof(*a));
	if (is_v4_mapped(like))
		v4_mapped(a, 0);
}

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, FERRITE_MAX_FRONTENDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct svc_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_svcstat SEC(".maps");

/* What a translation does to the packet (svc_apply). */
struct svc_nat {
	union v6addr saddr;	/* the new source, if SVC_NAT_SRC */
	union v6addr daddr;	/* the new destination, if SVC_NAT_DST */
	__be16 sport;
	__be16 dport;
	__u32 frontend;
	__u32 what;		/* SVC_NAT_* */
};

#define SVC_NAT_SRC 0x1
#define SVC_NAT_DST 0x2

/*
 * A program's work on one packet, in a per-CPU scratch map rather than on
 * the stack (512 bytes for the whole call chain): the flow as policy
 * judges it, the flow as it was sent, and the translation. The functions
 * below are global (verified once each, not once per path that calls
 * them) and share it through here.
 */
struct scratch {
	struct flow_key key;
	struct flow_key orig;
	struct svc_nat nat;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} ferrite_scratch SEC(".maps");

static __always_inline struct scratch *scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&ferrite_scratch, &zero);
}

/* What svc_forward() found. */
#define SVC_NONE 0		/* not a Service's frontend */
#define SVC_XLATED 1		/* translated: @nat says how */
#define SVC_REJECT 2		/* a frontend without backends */

static __always_inline struct svc_stats *svc_stats_of(__u32 frontend)
{
	return bpf_map_lookup_elem(&ferrite_svcstat, &frontend);
}

/*
 * The backend @id if a flow of @proto to frontend @frontend may use it:
 * it exists, serves that frontend, and is not terminating (a TCP flow
 * that chose it before keeps it while it terminates: @established).
 */
static __always_inline struct backend *usable_backend(__u32 id, __u32 frontend,
						      __u8 proto,
						      int established)
{
	struct backend *be = bpf_map_lookup_elem(&ferrite_backend, &id);

	if (!be || be->frontend != frontend)
		return NULL;
	if ((be->flags & BACKEND_F_TERMINATING) &&
	    !(established && proto == IPPROTO_TCP))
		return NULL;
	return be;
}

/* A backend for a new flow of @client to @svc: affine, else at random. */
static __always_inline __u32 svc_pick(const struct svc_value *svc,
				      const union v6addr *client, __u8 proto,
				      __u64 now)
{
	struct aff_key ak = { .frontend = svc->id };
	struct slot_key sk = { .id = svc->id };
	__u32 *id;

	if (svc->flags & SVC_F_AFFINITY) {
		struct aff_value *av;

		ak.client = *client;
		av = bpf_map_lookup_elem(&ferrite_svcaff, &ak);
		if (av &&
		    now - av->seen < (__u64)svc->affinity_timeout * 1000000000ULL &&
		    usable_backend(av->backend, svc->id, proto, 0)) {
			av->seen = now;
			return av->backend;
		}
	}
	if (!svc->count)
		return 0;
	sk.slot = bpf_get_prandom_u32() % svc->count + 1;
	id = bpf_map_lookup_elem(&ferrite_svcslot, &sk);
	if (!id || !usable_backend(*id, svc->id, proto, 0))
		return 0;
	if (svc->flags & SVC_F_AFFINITY) {
		struct aff_value av = { .seen = now, .backend = *id };

		bpf_map_update_elem(&ferrite_svcaff, &ak, &av, BPF_ANY);
	}
	return *id;
}

static __always_inline __u64 svc_ct_lifetime(__u8 proto)
{
	return proto == IPPROTO_TCP ? SVC_CT_LIFETIME_TCP_NS :
				      SVC_CT_LIFETIME_UDP_NS;
}

/*
 * A client's packet (@skb, its flow the scratch key as it was sent; @kind
 * from the parser): if it is for a frontend, finds the flow's
 * backend (choosing one for a new flow), fills the scratch translation
 * and turns the key into the flow as the backend will see it (without
 * the hairpin's source change), which is what NetworkPolicy judges.
 * @lookup is 0 for a Service address, else the SVC_LOOKUP_* frontends of
 * the node's own address (the caller checked that it is one).
 * Returns SVC_NONE, SVC_XLATED, SVC_REJECT, or DROP_SVC_NO_BACKEND when
 * the frontend's backends changed under the packet.
 */
/*
 * Whether the packet in @skb (its flow @key), which no flow of a hostPort
 * knows, may open one: a TCP segment only if it opens a connection (SYN
 * without ACK), and a UDP datagram only if no socket of the node's own
 * namespace is bound to its port. The answers to the node's own
 * connections and queries sent from a port in the ephemeral range stay
 * the node's, even when a hostPort has that port (as conntrack keeps them
 * from portmap's DNAT).
 */
static __always_inline int hostport_may_open(struct __sk_buff *skb,
					     const struct flow_key *key)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct bpf_sock_tuple t = {};
	struct ethhdr *eth = data;
	struct bpf_sock *sk;
	__u32 l4, size;
	__u8 flags = 0;

	if ((void *)(eth + 1) > data_end)
		return 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return 0;
		l4 = ETH_HLEN + (ip->ihl & 0xf) * 4;
		t.ipv4.saddr = key->saddr.w[3];
		t.ipv4.daddr = key->daddr.w[3];
		t.ipv4.sport = key->sport;
		t.ipv4.dport = key->dport;
		size = sizeof(t.ipv4);
	} else {
		l4 = ETH_HLEN + sizeof(struct ipv6hdr);
		__builtin_memcpy(t.ipv6.saddr, &key->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, &key->daddr, 16);
		t.ipv6.sport = key->sport;
		t.ipv6.dport = key->dport;
		size = sizeof(t.ipv6);
	}
	if (key->proto == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, l4 + 13, &flags, 1) < 0)
			return 0;
		return (flags & 0x12) == 0x02;
	}
	sk = bpf_sk_lookup_udp(skb, &t, size, BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		bpf_sk_release(sk);
		return 0;
	}
	return 1;
}

__noinline int svc_forward(struct __sk_buff *skb, int kind, int lookup)
{
	struct scratch *s = scratch();
	struct svc_stats *stats;
	struct svc_value *svc;
	struct backend *be = NULL;
	struct flow_key *key;
	struct svc_nat *nat;
	struct svc_key sk = {};
	struct svc_ct *ct;
	__be16 nat_port = 0;
	__u64 now;

	if (!s || !skb)
		return SVC_NONE;
	key = &s->key;
	nat = &s->nat;
	nat->what = 0;
	if (kind != FLOW_OK ||
	    (key->proto != IPPROTO_TCP && key->proto != IPPROTO_UDP))
		return SVC_NONE;
	sk.port = key->dport;
	sk.proto = key->proto;
	sk.addr = key->daddr;
	if (lookup) {
		/*
		 * The node's own address: a hostPort of that address, then
		 * one of every address (the family's unspecified one), then a
		 * NodePort.
		 */
		svc = NULL;
		if (lookup & SVC_LOOKUP_HOSTPORT) {
			sk.scope = SVC_SCOPE_HOSTPORT;
			svc = bpf_map_lookup_elem(&ferrite_svc, &sk);
			if (!svc) {
				unspecified_like(&sk.addr, &key->daddr);
				svc = bpf_map_lookup_elem(&ferrite_svc, &sk);
			}
		}
		if (!svc && (lookup & SVC_LOOKUP_NODEPORT)) {
			sk.scope = SVC_SCOPE_SERVICE;
			unspecified_like(&sk.addr, &key->daddr);
			svc = bpf_map_lookup_elem(&ferrite_svc, &sk);
		}
	} else {
		svc = bpf_map_lookup_elem(&ferrite_svc, &sk);
	}
	if (!svc)
		return SVC_NONE;
	stats = svc_stats_of(svc->id);
	now = bpf_ktime_get_ns();
	ct = bpf_map_lookup_elem(&ferrite_svcct, key);
	if (ct && ct->frontend == svc->id &&
	    now - ct->seen < svc_ct_lifetime(key->proto)) {
		be = usable_backend(ct->backend, svc->id, key->proto, 1);
		nat_port = ct->nat_port;
		if (be && now - ct->seen > CT_REFRESH_NS)
			ct->seen = now;
	}
	if (!be && sk.scope == SVC_SCOPE_HOSTPORT &&
	    !(skb && hostport_may_open(skb, key)))
		return SVC_NONE;
	if (!be) {
		struct svc_ct nct = { .seen = now, .frontend = svc->id };
		struct svc_rev rev = { .vport = key->dport, .cport = key->sport,
				       .frontend = svc->id };
		struct flow_key rk;

		nct.backend = svc_pick(svc, &key->saddr, key->proto, now);
		if (!nct.backend) {
			if (svc->count)
				return DROP_SVC_NO_BACKEND;
			if (stats)
				stats->rejected++;
			return SVC_REJECT;
		}
		be = usable_backend(nct.backend, svc->id, key->proto, 0);
		if (!be)
			return DROP_SVC_NO_BACKEND;
		/* The answer as the backend sends it. */
		rev.vip = key->daddr;
		rev.client = key->saddr;
		rk.saddr = be->addr;
		rk.daddr = addr_eq(&be->addr, &key->saddr) ? key->daddr :
							     key->saddr;
		rk.sport = be->port;
		rk.dport = key->sport;
		rk.proto = key->proto;
		rk._pad[0] = 0;
		rk._pad[1] = 0;
		rk._pad[2] = 0;
		/*
		 * The flow is ferrite's from now on: a flow the host stack
		 * carried earlier with the same ends (kube-proxy's, before
		 * Services were switched on, or the same client port reused)
		 * must not send its answers to the stack, whose conntrack
		 * would find them INVALID.
		 */
		bpf_map_delete_elem(&ferrite_stkflow, &rk);
		if ((svc->flags & SVC_F_SNAT) &&
		    !bpf_map_lookup_elem(&ferrite_endpts, &be->addr)) {
			/*
			 * From outside to another node's backend: from this
			 * node's address, on the client's port if no other
			 * flow to that backend holds it, else on one taken
			 * at random (the reverse entry is the reservation).
			 */
			int i;

			rk.daddr = key->daddr;
			for (i = 0; i < SVC_NAT_TRIES; i++) {
				if (i)
					rk.dport = bpf_htons(SVC_NAT_PORT_MIN +
							     bpf_get_prandom_u32() %
								     SVC_NAT_PORTS);
				if (!bpf_map_update_elem(&ferrite_svcrev, &rk,
							 &rev, BPF_NOEXIST))
					break;
			}
			if (i == SVC_NAT_TRIES)
				return DROP_SVC_NO_BACKEND;
			nat_port = rk.dport;
		} else {
			bpf_map_update_elem(&ferrite_svcrev, &rk, &rev, BPF_ANY);
		}
		nct.nat_port = nat_port;
		bpf_map_update_elem(&ferrite_svcct, key, &nct, BPF_ANY);
		if (stats)
			stats->flows++;
	}
	if (stats) {
		stats->packets++;
		stats->bytes += skb->len;
	}
	nat->what = SVC_NAT_DST;
	nat->frontend = svc->id;
	nat->daddr = be->addr;
	nat->dport = be->port;
	nat->sport = key->sport;
	/* Hairpin: the backend is the client; it sees the Service as source. */
	if (addr_eq(&be->addr, &key->saddr)) {
		nat->what |= SVC_NAT_SRC;
		nat->saddr = key->daddr;
	}
	/* A NodePort's flow to another node: from this node's address. */
	if (nat_port) {
		nat->what |= SVC_NAT_SRC;
		nat->saddr = key->daddr;
		nat->sport = nat_port;
	}
	key->daddr = be->addr;
	key->dport = be->port;
	return SVC_XLATED;
}

/*
 * A backend's answer (the scratch key, as it was sent): if it belongs to
 * a translated flow, fills the scratch translation with the rewrite that
 * gives it the Service's address, and points the key's destination at
 * the real client (a hairpin answer is addressed to the Service).
 * Returns SVC_NONE or SVC_XLATED.
 */
__noinline int svc_reverse(int kind)
{
	struct scratch *s = scratch();
	struct flow_key *key;
	struct svc_nat *nat;
	struct svc_rev *rev;

	if (!s)
		return SVC_NONE;
	key = &s->key;
	nat = &s->nat;
	nat->what = 0;
	if (kind != FLOW_OK ||
	    (key->proto != IPPROTO_TCP && key->proto != IPPROTO_UDP))
		return SVC_NONE;
	rev = bpf_map_lookup_elem(&ferrite_svcrev, key);
	if (!rev)
		return SVC_NONE;
	nat->what = SVC_NAT_SRC;
	nat->frontend = rev->frontend;
	nat->saddr = rev->vip;
	nat->sport = rev->vport;
	nat->dport = rev->cport;
	/* Hairpin, or a NodePort's flow this node translated the source of. */
	if (!addr_eq(&rev->client, &key->daddr) || rev->cport != key->dport) {
		nat->what |= SVC_NAT_DST;
		nat->daddr = rev->client;
		key->daddr = rev->client;
		key->dport = rev->cport;
	}
	return SVC_XLATED;
}

/*
 * A pod's TCP packet that is neither translated nor a translated flow's
 * answer (the scratch key, its transport header at @l4_off): if it opens a
 * connection (SYN without ACK) on the very ports of an earlier flow that
 * was translated to this destination (its client port reused, now to the
 * backend's own address), that flow is over, and its reverse entry would
 * rewrite the new connection's answers to the Service's address, where
 * the client's socket would drop them. Both of its entries go.
 * Returns 1 if it found such a flow.
 */
__noinline int svc_forget_reused(struct __sk_buff *skb, __u32 l4_off)
{
	struct flow_key rk, ck = {};
	struct scratch *s = scratch();
	struct svc_rev *rev;
	__u8 flags = 0;

	if (!s || !skb)
		return 0;
	if (bpf_skb_load_bytes(skb, l4_off + 13, &flags, 1) < 0)
		return 0;
	if ((flags & 0x12) != 0x02)	/* SYN, not SYN-ACK */
		return 0;
	rk = s->key;
	flow_reverse(&rk);
	rev = bpf_map_lookup_elem(&ferrite_svcrev, &rk);
	if (!rev)
		return 0;
	ck.saddr = rev->client;
	ck.daddr = rev->vip;
	ck.sport = rev->cport;
	ck.dport = rev->vport;
	ck.proto = rk.proto;
	bpf_map_delete_elem(&ferrite_svcct, &ck);
	bpf_map_delete_elem(&ferrite_svcrev, &rk);
	return 1;
}

/* Where the transport checksum of @proto sits in its header. */
static __always_inline __u32 l4_csum_offset(__u8 proto)
{
	return proto == IPPROTO_TCP ? offsetof(struct tcphdr, check) :
				      offsetof(struct udphdr, check);
}

/*
 * Rewrites one address (and its port) of the IPv4 packet in @skb, its IP
 * header @ihl bytes long: checksums first, then the bytes. A UDP checksum
 * of 0 (none) stays 0.
 */
static __always_inline int rewrite_v4(struct __sk_buff *skb, __u32 ihl,
				      __u8 proto, int src, __be32 from,
				      __be32 to, __be16 pfrom, __be16 pto)
{
	__u32 addr_off = ETH_HLEN + (src ? offsetof(struct iphdr, saddr) :
					   offsetof(struct iphdr, daddr));
	__u32 l4 = ETH_HLEN + ihl;
	__u32 csum = l4 + l4_csum_offset(proto);
	__u64 mangled = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (from != to) {
		if (bpf_l4_csum_replace(skb, csum, from, to,
					BPF_F_PSEUDO_HDR | mangled | 4) < 0)
			return -1;
		if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check),
					from, to, 4) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, &to, 4, 0) < 0)
			return -1;
	}
	if (pfrom != pto) {
		if (bpf_l4_csum_replace(skb, csum, pfrom, pto, mangled | 2) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, l4 + (src ? 0 : 2), &pto, 2, 0) < 0)
			return -1;
	}
	return 0;
}

/* The same for IPv6 (no extension headers: svc_apply checks). */
static __always_inline int rewrite_v6(struct __sk_buff *skb, __u8 proto,
				      int src, union v6addr *from,
				      union v6addr *to, __be16 pfrom,
				      __be16 pto)
{
	__u32 addr_off = ETH_HLEN + (src ? offsetof(struct ipv6hdr, saddr) :
					   offsetof(struct ipv6hdr, daddr));
	__u32 l4 = ETH_HLEN + sizeof(struct ipv6hdr);
	__u32 csum = l4 + l4_csum_offset(proto);

	if (!addr_eq(from, to)) {
		__s64 diff = bpf_csum_diff(from->w, 16, to->w, 16, 0);

		if (diff < 0 ||
		    bpf_l4_csum_replace(skb, csum, 0, diff, BPF_F_PSEUDO_HDR) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, to, 16, 0) < 0)
			return -1;
	}
	if (pfrom != pto) {
		if (bpf_l4_csum_replace(skb, csum, pfrom, pto, 2) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, l4 + (src ? 0 : 2), &pto, 2, 0) < 0)
			return -1;
	}
	return 0;
}

/*
 * Applies the scratch translation to the packet in @skb, whose flow the
 * scratch orig is (as it was sent, before svc_forward/svc_reverse
 * changed the key). Returns 0, or DROP_CSUM_ERR. Invalidates packet
 * pointers.
 */
__noinline int svc_apply(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct scratch *s = scratch();
	struct ethhdr *eth = data;
	struct flow_key *orig;
	struct svc_nat *nat;

	if (!s)
		return DROP_CSUM_ERR;
	orig = &s->orig;
	nat = &s->nat;
	if ((void *)(eth + 1) > data_end)
		return DROP_MALFORMED;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		__u32 ihl;

		if ((void *)(ip + 1) > data_end)
			return DROP_MALFORMED;
		ihl = (ip->ihl & 0xf) * 4;
		if ((nat->what & SVC_NAT_SRC) &&
		    rewrite_v4(skb, ihl, orig->proto, 1, orig->saddr.w[3], nat->saddr.w[3],
			       orig->sport, nat->sport) < 0)
			return DROP_CSUM_ERR;
		if ((nat->what & SVC_NAT_DST) &&
		    rewrite_v4(skb, ihl, orig->proto, 0, orig->daddr.w[3], nat->daddr.w[3],
			       orig->dport, nat->dport) < 0)
			return DROP_CSUM_ERR;
		return 0;
	}
	{
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return DROP_MALFORMED;
		/* The parser walked extension headers; the rewrite does not. */
		if (ip6->nexthdr != orig->proto)
			return DROP_MALFORMED;
		if ((nat->what & SVC_NAT_SRC) &&
		    rewrite_v6(skb, orig->proto, 1, &orig->saddr, &nat->saddr, orig->sport,
			       nat->sport) < 0)
			return DROP_CSUM_ERR;
		if ((nat->what & SVC_NAT_DST) &&
		    rewrite_v6(skb, orig->proto, 0, &orig->daddr, &nat->daddr, orig->dport,
			       nat->dport) < 0)
			return DROP_CSUM_ERR;
		return 0;
	}
}

#endif /* FERRITE_SERVICE_H */
