// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The cross-node fast path: a packet for another node's pod leaves through
 * the uplink the kernel's FIB names (bpf_fib_lookup), with its neighbour
 * resolved by the kernel (bpf_redirect_neigh) when the FIB has none yet.
 * Anything the lookup cannot resolve (no route, forwarding off, too big
 * for the uplink's MTU) goes to the host stack, which handles it in full.
 */
#ifndef FERRITE_REMOTE_H
#define FERRITE_REMOTE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#include "common.h"

/* linux/socket.h needs libc headers. */
#define FERRITE_AF_INET 2
#define FERRITE_AF_INET6 10

/* Whether @addr is inside the cluster's pod CIDRs. */
static __always_inline int is_pod_address(const union v6addr *addr)
{
	struct podnet_key key = { .prefixlen = 128 };

	key.addr = *addr;
	return bpf_map_lookup_elem(&ferrite_podnets, &key) != NULL;
}

/*
 * Asks the FIB where @fib's destination goes, as if forwarding. Returns
 * BPF_FIB_LKUP_RET_SUCCESS (next hop and MACs known), _NO_NEIGH (next hop
 * known, its MAC not yet), or -1: the stack must take the packet.
 */
static __always_inline long fib_resolve(struct __sk_buff *skb,
					struct bpf_fib_lookup *fib)
{
	__u32 mtu_len = 0;
	long rc;

	fib->tot_len = 0;
	fib->ifindex = skb->ifindex;
	rc = bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return -1;
	/*
	 * The lookup checks the MTU only on success, and passes every GSO
	 * packet whatever its segments' size: ask again, segments included,
	 * so that what would not fit the uplink goes to the stack, which
	 * fragments it or answers "fragmentation needed" / "packet too big"
	 * as a router does.
	 */
	if (bpf_check_mtu(skb, fib->ifindex, &mtu_len, 0, BPF_MTU_CHK_SEGS) !=
	    BPF_MTU_CHK_RET_SUCCESS)
		return -1;
	return rc;
}

/*
 * Sends the frame out of the device fib_resolve() found. The caller has
 * decremented the TTL, so packet pointers are reloaded here.
 */
static __always_inline int fib_send(struct __sk_buff *skb,
				    struct bpf_fib_lookup *fib, long rc)
{
	struct bpf_redir_neigh nh = {};

	skb->mark = FERRITE_MARK_REMOTE;
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		void *data = (void *)(long)skb->data;
		void *data_end = (void *)(long)skb->data_end;
		struct ethhdr *eth = data;

		if ((void *)(eth + 1) > data_end)
			return DROP_MALFORMED;
		mac_copy(eth->h_dest, fib->dmac);
		mac_copy(eth->h_source, fib->smac);
		return bpf_redirect(fib->ifindex, 0);
	}
	/* After the lookup, the destination fields hold the next hop. */
	if (fib->family == FERRITE_AF_INET) {
		nh.nh_family = FERRITE_AF_INET;
		nh.ipv4_nh = fib->ipv4_dst;
	} else {
		nh.nh_family = FERRITE_AF_INET6;
		__builtin_memcpy(nh.ipv6_nh, fib->ipv6_dst, sizeof(nh.ipv6_nh));
	}
	return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
}

/*
 * Sends the IPv4 or IPv6 packet in @skb (its TTL already lowered) where
 * the FIB says its destination is, as a router would. Returns the
 * redirect, or -1 when the FIB cannot resolve it.
 */
static __always_inline int fib_forward(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct bpf_fib_lookup fib = {};
	struct ethhdr *eth = data;
	long rc;

	if ((void *)(eth + 1) > data_end)
		return -1;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return -1;
		fib.family = FERRITE_AF_INET;
		fib.tos = ip->tos;
		fib.l4_protocol = ip->protocol;
		fib.ipv4_src = ip->saddr;
		fib.ipv4_dst = ip->daddr;
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		fib.family = FERRITE_AF_INET6;
		fib.flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0fffffff);
		fib.l4_protocol = ip6->nexthdr;
		__builtin_memcpy(fib.ipv6_src, &ip6->saddr, sizeof(fib.ipv6_src));
		__builtin_memcpy(fib.ipv6_dst, &ip6->daddr, sizeof(fib.ipv6_dst));
	}
	rc = fib_resolve(skb, &fib);
	if (rc < 0)
		return -1;
	return fib_send(skb, &fib, rc);
}

#endif /* FERRITE_REMOTE_H */
