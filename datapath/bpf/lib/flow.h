// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Flow tuples for ferrite_stkflow: to_pod records the reverse of every
 * flow the host stack delivers to a pod, and from_pod keeps a flow on the
 * host stack when its tuple is there (so conntrack can undo NAT).
 */
#ifndef FERRITE_FLOW_H
#define FERRITE_FLOW_H

#include <linux/in.h>

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

#endif /* FERRITE_FLOW_H */
