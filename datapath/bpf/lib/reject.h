// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The answer to a packet for a Service without backends, as kube-proxy's
 * REJECT answers: a TCP RST for a TCP segment without data, "port
 * unreachable" for anything else. The client's connect() fails at once
 * with ECONNREFUSED, and a UDP socket gets the error, rather than waiting
 * for a timeout. The packet itself becomes the answer: it is quoted behind a
 * new IP and ICMP header, from the Service's address to the client, and
 * goes back into the pod it came from.
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

/* The longest packet answered (the answer quotes it whole). */
#define REJECT_MAX_QUOTE 1472
#define REJECT_CHUNK 64

/*
 * The Internet checksum's 32-bit partial sum of the IP packet in @skb
 * (from ETH_HLEN to its end, @len bytes), added to @sum; negative on
 * error. Read in chunks: bpf_csum_diff wants a buffer; the last chunk's
 * zeroed tail pads it, which adds nothing to the sum.
 */
static __always_inline __s64 packet_sum(struct __sk_buff *skb, __u32 len,
					__s64 sum)
{
	__u8 buf[REJECT_CHUNK];
	__u32 i;

	for (i = 0; i < REJECT_MAX_QUOTE / REJECT_CHUNK + 1; i++) {
		__u32 off = i * REJECT_CHUNK;
		__u32 n;

		if (off >= len)
			break;
		n = len - off;
		if (n > REJECT_CHUNK)
			n = REJECT_CHUNK;
		/* 1 to REJECT_CHUNK as it was, and so the verifier sees it. */
		n = ((n - 1) & (REJECT_CHUNK - 1)) + 1;
		__builtin_memset(buf, 0, sizeof(buf));
		if (bpf_skb_load_bytes(skb, ETH_HLEN + off, buf, n) < 0)
			return -1;
		sum = bpf_csum_diff(NULL, 0, (__be32 *)buf, sizeof(buf), sum);
		if (sum < 0)
			return -1;
	}
	return sum;
}

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10
#define TCP_OPT_NOP 1

/*
 * Turns a TCP segment without payload in @skb into the RST that answers
 * it (RFC 9293 3.10.7.1: a segment with ACK gets seq = its ack; one
 * without, ack = its seq plus SYN and FIN), in place: a TCP socket that
 * is still sending its SYN when the answer arrives (the answer can arrive
 * during the connect() that sent it, on the same CPU) keeps an ICMP error
 * only as a soft error and tries again a second later, but takes a RST
 * from its backlog as soon as connect() lets go. Options become NOPs.
 * Global: verified once. Returns 0, 1 when the segment is not one this
 * answers (it carries data, an IPv4 header with options, a RST), or
 * DROP_SVC_REJECT.
 */
__noinline int reject_tcp(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u8 smac[ETH_ALEN], dmac[ETH_ALEN];
	__u8 th[64] = {};
	union v6addr src, dst;
	__u32 l3, l4len, hlen, i;
	__be32 seq, ack;
	__u8 flags;
	__s64 sum;
	int v6;

	if ((void *)(eth + 1) > data_end)
		return DROP_SVC_REJECT;
	mac_copy(smac, eth->h_source);
	mac_copy(dmac, eth->h_dest);
	v6 = eth->h_proto == bpf_htons(ETH_P_IPV6);
	if (!v6) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end || (ip->ihl & 0xf) != 5)
			return 1;
		l3 = sizeof(*ip);
		l4len = bpf_ntohs(ip->tot_len) - l3;
		v4_mapped(&src, ip->saddr);
		v4_mapped(&dst, ip->daddr);
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_TCP)
			return 1;
		l3 = sizeof(*ip6);
		l4len = bpf_ntohs(ip6->payload_len);
		__builtin_memcpy(&src, &ip6->saddr, sizeof(src));
		__builtin_memcpy(&dst, &ip6->daddr, sizeof(dst));
	}
	if (bpf_skb_load_bytes(skb, ETH_HLEN + l3, th, 20) < 0)
		return DROP_SVC_REJECT;
	hlen = (th[12] >> 4) * 4;
	flags = th[13];
	if (hlen < 20 || hlen != l4len || (flags & TH_RST))
		return 1;
	/* 20 to 60 as it was, and so the verifier sees it. */
	hlen = ((hlen - 1) & 63) + 1;
	if (hlen > 60)
		return 1;
	__builtin_memcpy(&seq, &th[4], 4);
	__builtin_memcpy(&ack, &th[8], 4);

	/* The answer's header: ports swapped, RST, options NOPs. */
	{
		__u8 port[2] = { th[0], th[1] };

		th[0] = th[2];
		th[1] = th[3];
		th[2] = port[0];
		th[3] = port[1];
	}
	if (flags & TH_ACK) {
		__builtin_memcpy(&th[4], &ack, 4);
		__builtin_memset(&th[8], 0, 4);
		th[13] = TH_RST;
	} else {
		__u32 next = bpf_ntohl(seq) + !!(flags & TH_SYN) +
			     !!(flags & TH_FIN);

		__builtin_memset(&th[4], 0, 4);
		next = bpf_htonl(next);
		__builtin_memcpy(&th[8], &next, 4);
		th[13] = TH_RST | TH_ACK;
	}
	__builtin_memset(&th[14], 0, 6);	/* window, checksum, urgent */
	for (i = 20; i < 60; i++)
		if (i < hlen)
			th[i] = TCP_OPT_NOP;

	if (!v6) {
		struct {
			__be32 saddr;
			__be32 daddr;
			__u8 zero;
			__u8 proto;
			__be16 len;
		} ph = { .saddr = dst.w[3], .daddr = src.w[3], .proto = IPPROTO_TCP,
			 .len = bpf_htons(hlen) };
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
			return DROP_SVC_REJECT;
		ip.saddr = dst.w[3];
		ip.daddr = src.w[3];
		ip.ttl = 64;
		ip.check = 0;
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&ip, sizeof(ip), 0);
		if (sum < 0)
			return DROP_SVC_REJECT;
		ip.check = csum_fold32(sum);
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0)
			return DROP_SVC_REJECT;
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
	} else {
		struct pseudo_v6 ph = { .saddr = dst, .daddr = src,
					.len = bpf_htonl(hlen),
					.next = bpf_htonl(IPPROTO_TCP) };
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
			return DROP_SVC_REJECT;
		__builtin_memcpy(&ip6.saddr, &dst, sizeof(dst));
		__builtin_memcpy(&ip6.daddr, &src, sizeof(src));
		ip6.hop_limit = 64;
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6), 0) < 0)
			return DROP_SVC_REJECT;
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
	}
	if (sum < 0)
		return DROP_SVC_REJECT;
	/* The bytes past the header are zero: they add nothing. */
	sum = bpf_csum_diff(NULL, 0, (__be32 *)th, sizeof(th), sum);
	if (sum < 0)
		return DROP_SVC_REJECT;
	{
		__sum16 check = csum_fold32(sum);

		__builtin_memcpy(&th[16], &check, 2);
	}
	if (bpf_skb_store_bytes(skb, ETH_HLEN + l3, th, hlen, 0) < 0)
		return DROP_SVC_REJECT;
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), smac,
				ETH_ALEN, 0) < 0 ||
	    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), dmac,
				ETH_ALEN, 0) < 0)
		return DROP_SVC_REJECT;
	return 0;
}

/*
 * Turns the Ethernet frame in @skb (IPv4 or IPv6, from the pod's MAC to
 * the host veth's) into the "port unreachable" answer to it, quoting the
 * whole packet: it cannot be shortened first, since a packet the pod's
 * stack checksums later (CHECKSUM_PARTIAL) may not be cut before its
 * checksum field. Global: verified once. Returns 0, or DROP_SVC_REJECT
 * when it cannot be rewritten (longer than REJECT_MAX_QUOTE, a GSO
 * packet).
 */
__noinline int reject_packet(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u8 smac[ETH_ALEN], dmac[ETH_ALEN];
	__u32 len = skb->len - ETH_HLEN;
	__s64 sum;

	if ((void *)(eth + 1) > data_end || skb->gso_size ||
	    skb->len <= ETH_HLEN || len > REJECT_MAX_QUOTE)
		return DROP_SVC_REJECT;
	mac_copy(smac, eth->h_source);
	mac_copy(dmac, eth->h_dest);

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		struct reject_v4 r = {};

		if ((void *)(ip + 1) > data_end)
			return DROP_SVC_REJECT;
		r.ip.version = 4;
		r.ip.ihl = 5;
		r.ip.tos = 0xc0;
		r.ip.tot_len = bpf_htons(sizeof(r) + len);
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
		sum = packet_sum(skb, len, sum);
		if (sum < 0)
			return DROP_SVC_REJECT;
		r.icmp.checksum = csum_fold32(sum);
		if (bpf_skb_adjust_room(skb, sizeof(r), BPF_ADJ_ROOM_MAC, 0) < 0)
			return DROP_SVC_REJECT;
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &r, sizeof(r), 0) < 0)
			return DROP_SVC_REJECT;
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		struct pseudo_v6 ph = {};
		struct reject_v6 r = {};

		if ((void *)(ip6 + 1) > data_end)
			return DROP_SVC_REJECT;
		r.ip6.version = 6;
		r.ip6.payload_len = bpf_htons(sizeof(r.icmp) + len);
		r.ip6.nexthdr = IPPROTO_ICMPV6;
		r.ip6.hop_limit = 64;
		__builtin_memcpy(&r.ip6.saddr, &ip6->daddr, sizeof(r.ip6.saddr));
		__builtin_memcpy(&r.ip6.daddr, &ip6->saddr, sizeof(r.ip6.daddr));
		r.icmp.type = ICMPV6_DEST_UNREACH;
		r.icmp.code = ICMPV6_PORT_UNREACH;
		__builtin_memcpy(&ph.saddr, &r.ip6.saddr, sizeof(ph.saddr));
		__builtin_memcpy(&ph.daddr, &r.ip6.daddr, sizeof(ph.daddr));
		ph.len = bpf_htonl(sizeof(r.icmp) + len);
		ph.next = bpf_htonl(IPPROTO_ICMPV6);
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
		if (sum < 0)
			return DROP_SVC_REJECT;
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&r.icmp, sizeof(r.icmp), sum);
		if (sum < 0)
			return DROP_SVC_REJECT;
		sum = packet_sum(skb, len, sum);
		if (sum < 0)
			return DROP_SVC_REJECT;
		r.icmp.checksum = csum_fold32(sum);
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
