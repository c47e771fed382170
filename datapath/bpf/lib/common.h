// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Types and maps shared by every ferrite program and by user space
 * (datapath/src/types.rs mirrors each struct; sizes are pinned on both sides).
 *
 * Maps are pinned by name (LIBBPF_PIN_BY_NAME): the loader points every
 * object at the same pin directory, so from_pod.o and to_pod.o share them.
 * Kernel object names hold at most 15 characters, hence ferrite_endpts
 * (endpoints) and ferrite_stkflow (flows the host stack delivered).
 */
#ifndef FERRITE_COMMON_H
#define FERRITE_COMMON_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "drop_reasons.h"

#define FERRITE_MAX_ENDPOINTS 16384
#define FERRITE_MAX_STACKFLOWS 65536

/* An IP address; IPv4 is stored v4-mapped (::ffff:a.b.c.d). */
union v6addr {
	__u8 b[16];
	__u32 w[4];
};
_Static_assert(sizeof(union v6addr) == 16, "v6addr size");

/*
 * endpoint.flags: traffic to the pod is shaped by a qdisc on its host veth
 * (the bandwidth capability), so the fast path enters the pod through the
 * veth's egress (bpf_redirect) rather than bpf_redirect_peer, which skips
 * qdiscs.
 */
#define ENDPOINT_F_SHAPED 0x1

/*
 * endpoint.flags: what the pod sends is shaped by a chained plugin on its
 * host veth's ingress (the reference bandwidth plugin's ingress qdisc and
 * ifb), so from_pod checks the source and then passes every packet on
 * (TC_ACT_UNSPEC: the next TCX program, then that qdisc's filters) instead
 * of redirecting it.
 */
#define ENDPOINT_F_VIA_STACK 0x2

/*
 * endpoint.flags: a hostPort sends packets into the pod (ADD wrote its
 * runtimeConfig.portMappings), so from_pod looks for a translated flow's
 * answer in what it sends to addresses off the node; other pods' packets
 * to other nodes skip that look-up.
 */
#define ENDPOINT_F_HOSTPORT 0x4

/*
 * skb->mark from_pod sets on a packet it redirects to a shaped pod's host
 * veth, so to_pod does not take it for a flow the host stack delivered.
 * Crossing into the pod namespace scrubs marks; to_pod clears it anyway.
 */
#define FERRITE_MARK_SHAPED 0x46520001

/*
 * skb->mark from_pod sets on a packet it sends to another node through the
 * fast path, so to_uplink does not take it for a flow the host stack sent.
 */
#define FERRITE_MARK_REMOTE 0x46520002

/* ferrite_endpts value: where a pod IP lives. */
struct endpoint {
	__u32 ifindex;		/* host veth */
	__u32 flags;		/* ENDPOINT_F_* */
	__u8 pod_mac[6];	/* the pod's eth0 */
	__u8 host_mac[6];	/* the host veth */
	__u8 _pad[4];
};
_Static_assert(sizeof(struct endpoint) == 24, "endpoint size");

/*
 * ferrite_ifaces value, keyed by host veth ifindex: the pod's MAC for
 * traffic whose source is not one of its addresses (IPv6 link-local and
 * the unspecified address used by DAD).
 */
struct iface {
	__u8 pod_mac[6];
	__u8 host_mac[6];
	__u8 _pad[4];
};
_Static_assert(sizeof(struct iface) == 16, "iface size");

/* ferrite_stats value (per CPU), keyed by host veth ifindex. */
struct endpoint_stats {
	__u64 from_pod_packets;		/* seen by from_pod, any verdict */
	__u64 from_pod_bytes;
	__u64 redirected_packets;	/* left this pod through the fast path */
	__u64 redirected_bytes;
	__u64 to_pod_packets;		/* delivered by the host stack */
	__u64 to_pod_bytes;
	__u64 redirected_in_packets;	/* arrived through the fast path */
	__u64 redirected_in_bytes;
	__u64 drops[DROP_REASON_SLOTS];	/* indexed by DROP_SLOT(reason) */
};
_Static_assert(sizeof(struct endpoint_stats) == 192, "endpoint_stats size");

/*
 * ferrite_stkflow key: a flow as the pod sends it. Ports are in network
 * order; ICMP echo uses the identifier as sport and 0 as dport; other
 * protocols use 0 for both.
 */
struct flow_key {
	union v6addr saddr;
	union v6addr daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 _pad[3];
};
_Static_assert(sizeof(struct flow_key) == 40, "flow_key size");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FERRITE_MAX_ENDPOINTS);
	__type(key, union v6addr);
	__type(value, struct endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_endpts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FERRITE_MAX_ENDPOINTS);
	__type(key, __u32);
	__type(value, struct iface);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_ifaces SEC(".maps");

/* Not preallocated: a preallocated per-CPU map costs entries * CPUs. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, FERRITE_MAX_ENDPOINTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct endpoint_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_stats SEC(".maps");

/* Reverse tuples of flows the host stack delivered; value: last ktime seen. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FERRITE_MAX_STACKFLOWS);
	__type(key, struct flow_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_stkflow SEC(".maps");

/*
 * ferrite_podnets key: the cluster's pod CIDRs (IPv4 v4-mapped, its prefix
 * length plus 96), written by the node agent. A destination inside them
 * that is not on this node is another node's pod: from_pod sends it to the
 * uplink through the kernel's FIB. Empty (no agent, or the fast path
 * switched off): such traffic takes the host stack.
 */
struct podnet_key {
	__u32 prefixlen;
	union v6addr addr;
};
_Static_assert(sizeof(struct podnet_key) == 20, "podnet_key size");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 64);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct podnet_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_podnets SEC(".maps");

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) |
		(a[3] ^ b[3]) | (a[4] ^ b[4]) | (a[5] ^ b[5])) == 0;
}

static __always_inline void mac_copy(__u8 *dst, const __u8 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
	dst[4] = src[4];
	dst[5] = src[5];
}

static __always_inline void v4_mapped(union v6addr *a, __be32 ip)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0x0000ffff);
	a->w[3] = ip;
}

static __always_inline int is_v4_mapped(const union v6addr *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0x0000ffff);
}

/* Headers ferrite reads: Ethernet + the longest IPv4 header + 8 bytes of L4. */
#define FERRITE_PULL_LEN (14 + 60 + 8)

/* Make sure the headers are in the linear area (direct packet access). */
static __always_inline void pull_headers(struct __sk_buff *skb)
{
	__u32 want = skb->len < FERRITE_PULL_LEN ? skb->len : FERRITE_PULL_LEN;

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (data + want > data_end)
		bpf_skb_pull_data(skb, want);
}

#endif /* FERRITE_COMMON_H */
