// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Flow tuples for ferrite_stkflow: to_pod records the reverse of every
 * flow the host stack delivers to a pod, and from_pod keeps a flow on the
 * host stack when its tuple is there (so conntrack can undo NAT).
 */
#ifndef FERRITE_FLOW_H
#define FERRITE_FLOW_H

#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#include "common.h"

/*
 * linux/icmp.h drags in libc's sys/socket.h, which a BPF target cannot
 * build: the few ICMP definitions ferrite needs live here.
 */
#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129
#define NDISC_ROUTER_SOLICITATION 133
#define NDISC_REDIRECT 137

/* The first 8 bytes of ICMP and ICMPv6; id is meaningful for echo only. */
struct icmp_echo {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 id;
	__be16 sequence;
};
_Static_assert(sizeof(struct icmp_echo) == 8, "icmp_echo size");

/*
 * Fill the ports of @key from the L4 header at @l4. Returns 0, or
 * DROP_MALFORMED if a TCP/UDP/ICMP header is truncated.
 */
static __always_inline int flow_ports(struct flow_key *key, void *l4,
				      void *data_end)
{
	switch (key->proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP: {
		__be16 *ports = l4;

		if ((void *)(ports + 2) > data_end)
			return DROP_MALFORMED;
		key->sport = ports[0];
		key->dport = ports[1];
		break;
	}
	case IPPROTO_ICMP: {
		struct icmp_echo *icmp = l4;

		if ((void *)(icmp + 1) > data_end)
			return DROP_MALFORMED;
		if (icmp->type == ICMP_ECHO || icmp->type == ICMP_ECHOREPLY)
			key->sport = icmp->id;
		break;
	}
	case IPPROTO_ICMPV6: {
		struct icmp_echo *icmp6 = l4;

		if ((void *)(icmp6 + 1) > data_end)
			return DROP_MALFORMED;
		if (icmp6->type == ICMPV6_ECHO_REQUEST ||
		    icmp6->type == ICMPV6_ECHO_REPLY)
			key->sport = icmp6->id;
		break;
	}
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

#ifndef IP_OFFSET
#define IP_OFFSET 0x1fff
#endif

/* Refresh a known flow's timestamp at most this often (cache-line traffic). */
#define STACKFLOW_REFRESH_NS 1000000000ULL

/*
 * The flow of the IPv4 packet at @l3 into @key. Returns 0, or -1 for what
 * has no flow to match: a malformed header, a later fragment (no ports; the
 * first fragment carries the flow).
 */
static __always_inline int flow_of_ipv4(struct flow_key *key, void *l3,
					void *data_end)
{
	struct iphdr *ip = l3;
	__u32 hlen;

	if ((void *)(ip + 1) > data_end)
		return -1;
	hlen = (ip->ihl & 0xf) * 4;
	if (ip->version != 4 || hlen < sizeof(*ip))
		return -1;
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		return -1;

	__builtin_memset(key, 0, sizeof(*key));
	v4_mapped(&key->saddr, ip->saddr);
	v4_mapped(&key->daddr, ip->daddr);
	key->proto = ip->protocol;
	return flow_ports(key, l3 + hlen, data_end) < 0 ? -1 : 0;
}

/* The same for IPv6; extension headers are not walked (ports stay 0). */
static __always_inline int flow_of_ipv6(struct flow_key *key, void *l3,
					void *data_end)
{
	struct ipv6hdr *ip6 = l3;

	if ((void *)(ip6 + 1) > data_end)
		return -1;
	if (ip6->version != 6 || ip6->nexthdr == IPPROTO_FRAGMENT)
		return -1;

	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(&key->saddr, &ip6->saddr, sizeof(key->saddr));
	__builtin_memcpy(&key->daddr, &ip6->daddr, sizeof(key->daddr));
	key->proto = ip6->nexthdr;
	return flow_ports(key, ip6 + 1, data_end) < 0 ? -1 : 0;
}

/* The flow of an Ethernet frame carrying IPv4 or IPv6; -1 for anything else. */
static __always_inline int flow_of_frame(struct flow_key *key, void *data,
					 void *data_end)
{
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return -1;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return flow_of_ipv4(key, eth + 1, data_end);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return flow_of_ipv6(key, eth + 1, data_end);
	return -1;
}

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
