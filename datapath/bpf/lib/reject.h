// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * "Port unreachable" for a packet to a Service without backends, as
 * kube-proxy's REJECT answers: the client's connect() fails at once with
 * ECONNREFUSED, and a UDP socket gets the error, rather than waiting for a
 * timeout. The packet itself becomes the answer: its first bytes (the IP
 * header and 8 bytes of transport header) are quoted behind a new IP and
 * ICMP header, from the Service's address to the client, and it goes back
 * into the pod it came from.
 */
#ifndef FERRITE_REJECT_H
#define FERRITE_REJECT_H

#include <stddef.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#include "common.h"
#include "flow.h"

#define ICMP_PORT_UNREACH 3
#define ICMPV6_PORT_UNREACH 4

/* What an ICMP error quotes of an IPv4 packet without options. */
#define REJECT_QUOTE_V4 (sizeof(struct iphdr) + 8)
/* ICMPv6 may quote more; ferrite quotes the header and 8 bytes too. */
#define REJECT_QUOTE_V6 (sizeof(struct ipv6hdr) + 8)

struct icmp_head {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__u32 unused;
};

struct reject_v4 {
	struct iphdr ip;
	struct icmp_head icmp;
};
_Static_assert(sizeof(struct reject_v4) == 28, "reject_v4 size");

struct reject_v6 {
	struct ipv6hdr ip6;
	struct icmp_head icmp;
};
_Static_assert(sizeof(struct reject_v6) == 48, "reject_v6 size");

/* The ICMPv6 pseudo-header (RFC 8200 8.1). */
struct pseudo_v6 {
	union v6addr saddr;
	union v6addr daddr;
	__be32 len;
	__be32 next;
};

static __always_inline __sum16 csum_fold32(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__sum16)~s;
}

/*
 * Turns the Ethernet frame in @skb (IPv4 or IPv6, from the pod's MAC to
 * the host veth's) into the "port unreachable" answer to it. Returns 0,
 * or DROP_SVC_REJECT when the packet cannot be rewritten (an IPv4 header
 * with options, a packet shorter than the quote, a GSO packet).
 */
static __noinline int reject_packet(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u8 smac[ETH_ALEN], dmac[ETH_ALEN];
	int v6;

	if ((void *)(eth + 1) > data_end)
		return DROP_SVC_REJECT;
	mac_copy(smac, eth->h_source);
	mac_copy(dmac, eth->h_dest);
	v6 = eth->h_proto == bpf_htons(ETH_P_IPV6);

	if (!v6) {
		struct iphdr *ip = (void *)(eth + 1);
		__u8 quote[REJECT_QUOTE_V4];
		struct reject_v4 r = {};
		__s64 sum;

		if ((void *)(ip + 1) > data_end || (ip->ihl & 0xf) != 5)
			return DROP_SVC_REJECT;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, quote, sizeof(quote)) < 0)
			return DROP_SVC_REJECT;
		r.ip.version = 4;
		r.ip.ihl = 5;
		r.ip.tos = 0xc0;
		r.ip.tot_len = bpf_htons(sizeof(r) + sizeof(quote));
		r.ip.ttl = 64;
		r.ip.protocol = IPPROTO_ICMP;
		r.ip.saddr = ip->daddr;
		r.ip.daddr = ip->saddr;
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&r.ip, sizeof(r.ip), 0);
		if (sum < 0)
			return DROP_SVC_REJECT;
		r.ip.check = csum_fold32(sum);
		r.icmp.type = ICMP_DEST_UNREACH;
		r.icmp.code = ICMP_PORT_UNREACH;
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&r.icmp, sizeof(r.icmp), 0);
		if (sum < 0)
			return DROP_SVC_REJECT;
		sum = bpf_csum_diff(NULL, 0, (__be32 *)quote, sizeof(quote), sum);
		if (sum < 0)
			return DROP_SVC_REJECT;
		r.icmp.checksum = csum_fold32(sum);

		if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(quote), 0) < 0)
			return DROP_SVC_REJECT;
		if (bpf_skb_adjust_room(skb, sizeof(r), BPF_ADJ_ROOM_MAC, 0) < 0)
			return DROP_SVC_REJECT;
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &r, sizeof(r), 0) < 0)
			return DROP_SVC_REJECT;
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		__u8 quote[REJECT_QUOTE_V6];
		struct pseudo_v6 ph = {};
		struct reject_v6 r = {};
		__s64 sum;

		if ((void *)(ip6 + 1) > data_end)
			return DROP_SVC_REJECT;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, quote, sizeof(quote)) < 0)
			return DROP_SVC_REJECT;
		r.ip6.version = 6;
		r.ip6.payload_len = bpf_htons(sizeof(r.icmp) + sizeof(quote));
		r.ip6.nexthdr = IPPROTO_ICMPV6;
		r.ip6.hop_limit = 64;
		__builtin_memcpy(&r.ip6.saddr, &ip6->daddr, sizeof(r.ip6.saddr));
		__builtin_memcpy(&r.ip6.daddr, &ip6->saddr, sizeof(r.ip6.daddr));
		r.icmp.type = ICMPV6_DEST_UNREACH;
		r.icmp.code = ICMPV6_PORT_UNREACH;
		__builtin_memcpy(&ph.saddr, &r.ip6.saddr, sizeof(ph.saddr));
		__builtin_memcpy(&ph.daddr, &r.ip6.daddr, sizeof(ph.daddr));
		ph.len = bpf_htonl(sizeof(r.icmp) + sizeof(quote));
		ph.next = bpf_htonl(IPPROTO_ICMPV6);
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
		if (sum < 0)
			return DROP_SVC_REJECT;
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&r.icmp, sizeof(r.icmp), sum);
		if (sum < 0)
			return DROP_SVC_REJECT;
		sum = bpf_csum_diff(NULL, 0, (__be32 *)quote, sizeof(quote), sum);
		if (sum < 0)
			return DROP_SVC_REJECT;
		r.icmp.checksum = csum_fold32(sum);

		if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(quote), 0) < 0)
			return DROP_SVC_REJECT;
		if (bpf_skb_adjust_room(skb, sizeof(r), BPF_ADJ_ROOM_MAC, 0) < 0)
			return DROP_SVC_REJECT;
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &r, sizeof(r), 0) < 0)
			return DROP_SVC_REJECT;
	}

	/* Back the way it came: from the host veth to the pod. */
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), smac,
				ETH_ALEN, 0) < 0 ||
	    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), dmac,
				ETH_ALEN, 0) < 0)
		return DROP_SVC_REJECT;
	return 0;
}

#endif /* FERRITE_REJECT_H */
