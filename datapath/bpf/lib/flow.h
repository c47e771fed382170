// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The flow a packet belongs to, as every program sees it.
 *
 * to_pod and to_uplink record the reverse of every flow the host stack
 * delivers or sends (ferrite_stkflow), and from_pod and from_uplink keep a
 * flow on the host stack when its tuple is there, so conntrack can undo
 * NAT. The parser below therefore names a packet's flow the same way in
 * every program: IPv6 extension headers are walked to the transport
 * header, an ICMP error belongs to the flow it quotes (its answer
 * direction), and fragments are told apart so that every fragment of a
 * datagram takes the same path (the stack, which reassembles).
 */
#ifndef FERRITE_FLOW_H
#define FERRITE_FLOW_H

#include <linux/in.h>
#include <linux/in6.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#include "common.h"

/*
 * linux/icmp.h drags in libc's sys/socket.h, which a BPF target cannot
 * build: the few ICMP definitions ferrite needs live here.
 */
#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_SOURCE_QUENCH 4
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PARAMPROB 4
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129
#define NDISC_ROUTER_SOLICITATION 133
#define NDISC_REDIRECT 137

#ifndef IP_MF
#define IP_MF 0x2000
#endif
#ifndef IP_OFFSET
#define IP_OFFSET 0x1fff
#endif
/* IPv6 fragment header: offset (13 bits) << 3 | M flag. */
#define IP6_OFFSET 0xfff8

/* Extension headers walked before giving up (the stack takes the packet). */
#define IPV6_MAX_EXT_HEADERS 4

/* The first 8 bytes of ICMP and ICMPv6; id is meaningful for echo only. */
struct icmp_echo {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 id;
	__be16 sequence;
};
_Static_assert(sizeof(struct icmp_echo) == 8, "icmp_echo size");

/* What flow_of_frame() found. */
enum flow_kind {
	/* A header is truncated or invalid: there is no flow. */
	FLOW_MALFORMED = -1,
	/* A packet of its own: the key is complete. */
	FLOW_OK = 0,
	/*
	 * An ICMP error: the key is the flow of the answers to the packet it
	 * quotes, which is the way the error travels.
	 */
	FLOW_ICMP_ERROR = 1,
	/* The first fragment of a datagram: the key has its ports. */
	FLOW_FIRST_FRAGMENT = 2,
	/* A later fragment: no transport header, ports 0. */
	FLOW_FRAGMENT = 3,
	/*
	 * Something ferrite does not route by flow (an ICMP error whose quote
	 * it cannot read, too many extension headers): the stack takes it.
	 */
	FLOW_OTHER = 4,
};

/* Whether a packet of this kind may take a fast path. */
static __always_inline int flow_is_routable(int kind)
{
	return kind == FLOW_OK || kind == FLOW_ICMP_ERROR;
}

/* Whether the stack carrying a packet of this kind makes a flow to record. */
static __always_inline int flow_is_recordable(int kind)
{
	return kind == FLOW_OK || kind == FLOW_FIRST_FRAGMENT;
}

static __always_inline int is_icmp_error(__u8 proto, __u8 type)
{
	if (proto == IPPROTO_ICMP)
		return type == ICMP_DEST_UNREACH || type == ICMP_SOURCE_QUENCH ||
		       type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
	/* ICMPv6 errors are types 1 to 4 (unreachable, too big, time, param). */
	return proto == IPPROTO_ICMPV6 && type >= ICMPV6_DEST_UNREACH &&
	       type <= ICMPV6_PARAMPROB;
}

/*
 * The ports of @key from the transport header at @off: TCP, UDP and
 * SCTP ports, the ICMP echo identifier (as sport, in both directions).
 * Stores the ICMP type in @icmp_type. Returns 0, or FLOW_MALFORMED when
 * the header is cut short.
 */
static __always_inline int flow_ports(struct __sk_buff *skb,
				      struct flow_key *key, __u32 off,
				      __u8 *icmp_type)
{
	struct icmp_echo icmp;
	__be16 ports[2];

	*icmp_type = 0;
	switch (key->proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)) < 0)
			return FLOW_MALFORMED;
		key->sport = ports[0];
		key->dport = ports[1];
		break;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		if (bpf_skb_load_bytes(skb, off, &icmp, sizeof(icmp)) < 0)
			return FLOW_MALFORMED;
		*icmp_type = icmp.type;
		if (icmp.type == ICMP_ECHO || icmp.type == ICMP_ECHOREPLY ||
		    icmp.type == ICMPV6_ECHO_REQUEST ||
		    icmp.type == ICMPV6_ECHO_REPLY)
			key->sport = icmp.id;
		break;
	}
	return 0;
}

/*
 * The tuple of the answer to @key. ICMP echo keeps the identifier in sport
 * in both directions, so only addresses swap.
 */
static __always_inline void flow_reverse(struct flow_key *key)
{
	union v6addr tmp = key->saddr;
	__be16 port = key->sport;

	key->saddr = key->daddr;
	key->daddr = tmp;
	if (key->proto != IPPROTO_ICMP && key->proto != IPPROTO_ICMPV6) {
		key->sport = key->dport;
		key->dport = port;
	}
}

/*
 * The flow an ICMP error belongs to: the reverse of the packet it quotes
 * (an IP header at @off). The quoted packet must have been sent by the
 * error's destination, else the stack decides. Returns FLOW_ICMP_ERROR or
 * FLOW_OTHER.
 */
static __always_inline int flow_of_icmp_error(struct __sk_buff *skb,
					      struct flow_key *key, __u32 off,
					      int ipv6)
{
	union v6addr outer_dst = key->daddr;
	__u8 type;

	if (!ipv6) {
		struct iphdr in;
		__u32 hlen;

		if (bpf_skb_load_bytes(skb, off, &in, sizeof(in)) < 0)
			return FLOW_OTHER;
		hlen = (in.ihl & 0xf) * 4;
		if (in.version != 4 || hlen < sizeof(in) ||
		    (in.frag_off & bpf_htons(IP_OFFSET)))
			return FLOW_OTHER;
		v4_mapped(&key->saddr, in.saddr);
		v4_mapped(&key->daddr, in.daddr);
		key->proto = in.protocol;
		off += hlen;
	} else {
		struct ipv6hdr in;

		if (bpf_skb_load_bytes(skb, off, &in, sizeof(in)) < 0)
			return FLOW_OTHER;
		if (in.version != 6)
			return FLOW_OTHER;
		__builtin_memcpy(&key->saddr, &in.saddr, sizeof(key->saddr));
		__builtin_memcpy(&key->daddr, &in.daddr, sizeof(key->daddr));
		/* A quoted extension header: not walked, the stack decides. */
		key->proto = in.nexthdr;
		if (in.nexthdr != IPPROTO_TCP && in.nexthdr != IPPROTO_UDP &&
		    in.nexthdr != IPPROTO_SCTP && in.nexthdr != IPPROTO_ICMPV6)
			return FLOW_OTHER;
		off += sizeof(in);
	}
	key->sport = 0;
	key->dport = 0;
	if (flow_ports(skb, key, off, &type) < 0)
		return FLOW_OTHER;
	if (is_icmp_error(key->proto, type))
		return FLOW_OTHER;
	flow_reverse(key);
	if (key->daddr.w[0] != outer_dst.w[0] ||
	    key->daddr.w[1] != outer_dst.w[1] ||
	    key->daddr.w[2] != outer_dst.w[2] ||
	    key->daddr.w[3] != outer_dst.w[3])
		return FLOW_OTHER;
	return FLOW_ICMP_ERROR;
}

/* The transport part of the flow; @off is the transport header's offset. */
static __always_inline int flow_of_transport(struct __sk_buff *skb,
					     struct flow_key *key, __u32 off,
					     int ipv6, int first_fragment)
{
	__u8 type;
	int rc;

	rc = flow_ports(skb, key, off, &type);
	if (rc < 0)
		return rc;
	if (first_fragment)
		return FLOW_FIRST_FRAGMENT;
	if (is_icmp_error(key->proto, type))
		return flow_of_icmp_error(skb, key, off + sizeof(struct icmp_echo),
					  ipv6);
	return FLOW_OK;
}

/* The flow of the IPv4 packet at @off (its IP header) into @key. */
static __always_inline int flow_of_ipv4(struct __sk_buff *skb,
					struct flow_key *key, __u32 off)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + off;
	__u32 hlen;

	if ((void *)(ip + 1) > data_end)
		return FLOW_MALFORMED;
	hlen = (ip->ihl & 0xf) * 4;
	if (ip->version != 4 || hlen < sizeof(*ip))
		return FLOW_MALFORMED;

	__builtin_memset(key, 0, sizeof(*key));
	v4_mapped(&key->saddr, ip->saddr);
	v4_mapped(&key->daddr, ip->daddr);
	key->proto = ip->protocol;
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		return FLOW_FRAGMENT;
	return flow_of_transport(skb, key, off + hlen, 0,
				 !!(ip->frag_off & bpf_htons(IP_MF)));
}

/* linux/ipv6.h has ipv6_opt_hdr, but the fragment header is kernel-only. */
struct ipv6_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

/*
 * The same for IPv6, walking up to IPV6_MAX_EXT_HEADERS extension headers
 * (hop-by-hop, routing, destination options, authentication, fragment).
 */
static __always_inline int flow_of_ipv6(struct __sk_buff *skb,
					struct flow_key *key, __u32 off)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + off;
	int first_fragment = 0;
	__u8 next;
	int i;

	if ((void *)(ip6 + 1) > data_end)
		return FLOW_MALFORMED;
	if (ip6->version != 6)
		return FLOW_MALFORMED;

	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(&key->saddr, &ip6->saddr, sizeof(key->saddr));
	__builtin_memcpy(&key->daddr, &ip6->daddr, sizeof(key->daddr));
	next = ip6->nexthdr;
	off += sizeof(*ip6);

#pragma unroll
	for (i = 0; i < IPV6_MAX_EXT_HEADERS; i++) {
		struct ipv6_frag_hdr frag;
		struct ipv6_opt_hdr opt;

		switch (next) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			if (bpf_skb_load_bytes(skb, off, &opt, sizeof(opt)) < 0)
				return FLOW_MALFORMED;
			next = opt.nexthdr;
			off += ((__u32)opt.hdrlen + 1) * 8;
			break;
		case IPPROTO_AH:
			if (bpf_skb_load_bytes(skb, off, &opt, sizeof(opt)) < 0)
				return FLOW_MALFORMED;
			next = opt.nexthdr;
			off += ((__u32)opt.hdrlen + 2) * 4;
			break;
		case IPPROTO_FRAGMENT:
			if (bpf_skb_load_bytes(skb, off, &frag, sizeof(frag)) < 0)
				return FLOW_MALFORMED;
			key->proto = frag.nexthdr;
			if (frag.frag_off & bpf_htons(IP6_OFFSET))
				return FLOW_FRAGMENT;
			/* Also an atomic fragment: the stack handles those. */
			first_fragment = 1;
			next = frag.nexthdr;
			off += sizeof(frag);
			break;
		default:
			goto transport;
		}
	}
	switch (next) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_FRAGMENT:
		key->proto = next;
		return FLOW_OTHER;
	}
transport:
	key->proto = next;
	return flow_of_transport(skb, key, off, 1, first_fragment);
}

/*
 * The flow of an Ethernet frame carrying IPv4 or IPv6 (enum flow_kind);
 * FLOW_MALFORMED for anything else.
 */
static __always_inline int flow_of_frame(struct __sk_buff *skb,
					 struct flow_key *key)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return FLOW_MALFORMED;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return flow_of_ipv4(skb, key, sizeof(*eth));
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return flow_of_ipv6(skb, key, sizeof(*eth));
	return FLOW_MALFORMED;
}

/* Refresh a known flow's timestamp at most this often (cache-line traffic). */
#define STACKFLOW_REFRESH_NS 1000000000ULL

/*
 * The host stack carried @key: record its answer's tuple (the reverse),
 * so the answer is kept on the stack too.
 */
static __always_inline void remember_reply(struct flow_key *key)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 *seen;

	flow_reverse(key);
	seen = bpf_map_lookup_elem(&ferrite_stkflow, key);
	if (seen) {
		if (now - *seen > STACKFLOW_REFRESH_NS)
			*seen = now;
		return;
	}
	bpf_map_update_elem(&ferrite_stkflow, key, &now, BPF_ANY);
}

/* Whether @key is a flow the host stack carried (see remember_reply). */
static __always_inline int is_stack_flow(const struct flow_key *key)
{
#ifndef FERRITE_NO_STACKFLOW
	/* Off only in a benchmark build that measures what this lookup costs. */
	return bpf_map_lookup_elem(&ferrite_stkflow, key) != NULL;
#else
	return 0;
#endif
}

#endif /* FERRITE_FLOW_H */
