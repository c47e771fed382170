// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * from_uplink: TCX ingress of the node's uplink: packets from other nodes.
 *
 * A packet another node's pod sends to a pod on this node goes straight
 * into it (bpf_redirect_peer, or through its host veth's egress when a
 * qdisc shapes what it receives), unless its flow is one the host stack
 * carried out (to_uplink recorded it: a Service's DNAT that conntrack must
 * undo). Only the cluster's pods are trusted that way: a packet from a
 * node's own address, or from outside the cluster, takes the stack, whose
 * firewall, reverse-path filter and conntrack then see the whole flow (a
 * node's SYN redirected past conntrack makes the pod's SYN-ACK INVALID to
 * kube-proxy's rules). So do fragments (all of them: conntrack gathers a
 * datagram) and packets whose TTL runs out here. A packet claiming to
 * come from a pod of this node is dropped and counted, and so is one the
 * destination's NetworkPolicy ingress rules refuse. A backend's answer to
 * a Service flow a pod of this node began gets the Service's address
 * before it goes in. Everything else passes on (TC_ACT_UNSPEC), untouched,
 * to whatever else the shared uplink runs, and then to the stack.
 */
#include <stddef.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#include "lib/common.h"
#include "lib/flow.h"
#include "lib/policy.h"
#include "lib/remote.h"
#include "lib/service.h"
#include "lib/stats.h"

/* The IPv4 header checksum after the TTL went down by one. */
static __always_inline int ttl_down_ipv4(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	__be16 old_word, new_word;

	if ((void *)(ip + 1) > data_end)
		return -1;
	if (ip->ttl <= 1)
		return -1;
	__builtin_memcpy(&old_word, &ip->ttl, sizeof(old_word));
	ip->ttl--;
	__builtin_memcpy(&new_word, &ip->ttl, sizeof(new_word));
	return bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check),
				   old_word, new_word, sizeof(new_word));
}

static __always_inline int hop_down_ipv6(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);

	if ((void *)(ip6 + 1) > data_end)
		return -1;
	if (ip6->hop_limit <= 1)
		return -1;
	ip6->hop_limit--;
	return 0;
}

/* The source address of the IPv4 or IPv6 frame at @data (already parsed). */
static __always_inline int frame_source(union v6addr *src, void *data,
					void *data_end)
{
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return -1;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return -1;
		v4_mapped(src, ip->saddr);
		return 0;
	}
	{
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		__builtin_memcpy(src, &ip6->saddr, sizeof(*src));
		return 0;
	}
}

SEC("classifier")
int from_uplink(struct __sk_buff *skb)
{
	struct endpoint_stats *st;
	struct endpoint *dst;
	struct ep_policy *pol;
	struct scratch *sc = scratch();
	struct flow_key key;
	union v6addr src;
	int xlated = 0;
	struct ethhdr *eth;
	void *data, *data_end;
	int kind, down;

	/* Only frames addressed to this node; never another's. */
	if (skb->pkt_type != PACKET_HOST)
		return TC_ACT_UNSPEC;
	pull_headers(skb);
	kind = flow_of_frame(skb, &key);
	if (!flow_is_routable(kind))
		return TC_ACT_UNSPEC;
	dst = bpf_map_lookup_elem(&ferrite_endpts, &key.daddr);
	if (!dst)
		return TC_ACT_UNSPEC;

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (frame_source(&src, data, data_end) < 0)
		return TC_ACT_UNSPEC;
	if (!is_pod_address(&src))
		return TC_ACT_UNSPEC;
	if (bpf_map_lookup_elem(&ferrite_endpts, &src)) {
		count_drop(stats_of(dst->ifindex), DROP_UPLINK_SPOOF);
		return TC_ACT_SHOT;
	}
	if (is_stack_flow(&key))
		return TC_ACT_UNSPEC;
	if (sc) {
		sc->key = key;
		sc->orig = key;
		xlated = svc_reverse(kind) == SVC_XLATED;
		/* A hairpin's answer never crosses nodes. */
		if (xlated && (sc->nat.what & SVC_NAT_DST))
			return TC_ACT_UNSPEC;
	}
	pol = policy_of(dst->ifindex);
	if (pol && !policy_exempt(&key)) {
		int reason = policy_verdict(&key, kind, NULL, pol, 0);

		if (reason)
			return policy_drop(reason, 0, dst->ifindex, NULL);
	}
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_UNSPEC;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		down = ttl_down_ipv4(skb);
	else
		down = hop_down_ipv6(skb);
	if (down < 0)
		return TC_ACT_UNSPEC;
	if (xlated && svc_apply(skb))
		return TC_ACT_UNSPEC;

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_UNSPEC;
	mac_copy(eth->h_dest, dst->pod_mac);
	mac_copy(eth->h_source, dst->host_mac);

	st = stats_of(dst->ifindex);
	if (st) {
		st->redirected_in_packets++;
		st->redirected_in_bytes += skb->len;
	}
	if (dst->flags & ENDPOINT_F_SHAPED) {
		skb->mark = FERRITE_MARK_SHAPED;
		return bpf_redirect(dst->ifindex, 0);
	}
	return bpf_redirect_peer(dst->ifindex, 0);
}

char _license[] SEC("license") = "Dual BSD/GPL";
