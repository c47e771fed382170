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
#include "lib/reject.h"
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

/*
 * A packet for this node's own address when ferrite serves hostPorts or
 * NodePorts (@lookup, SVC_LOOKUP_*): a client's packet to a hostPort goes
 * into its pod, and one to a NodePort (kube-proxy does not run) to a
 * backend (into it when it is on this node; to its node, from this node's
 * address, when it is on another and the Service's traffic policy is
 * Cluster), and that backend's answer goes back to the client from the
 * NodePort. A NodePort without backends answers as a Service does. The
 * rest passes on to the stack.
 */
static __noinline int nodeport(struct __sk_buff *skb, int kind, int lookup)
{
	struct scratch *sc = scratch();
	struct endpoint_stats *st;
	struct endpoint *be = NULL;
	struct ep_policy *pol;
	void *data, *data_end;
	struct ethhdr *eth;
	int ret, down;

	if (!sc)
		return TC_ACT_UNSPEC;
	sc->orig = sc->key;
	/* Only a NodePort's flow to another node has answers coming back. */
	ret = (lookup & SVC_LOOKUP_NODEPORT) ? svc_reverse(kind) : SVC_NONE;
	if (ret != SVC_XLATED) {
		ret = svc_forward(skb, kind, lookup);
		if (ret == SVC_REJECT) {
			ret = sc->key.proto == IPPROTO_TCP ? reject_tcp(skb) : 1;
			if (ret == 1)
				ret = reject_packet(skb);
			return ret ? TC_ACT_SHOT : bpf_redirect(skb->ifindex, 0);
		}
		if (ret != SVC_XLATED)
			return ret < 0 ? TC_ACT_SHOT : TC_ACT_UNSPEC;
		be = bpf_map_lookup_elem(&ferrite_endpts, &sc->key.daddr);
	}
	if (be) {
		pol = policy_of(be->ifindex);
		if (pol && !policy_exempt(&sc->key)) {
			int reason = policy_verdict(&sc->key, kind, NULL, pol, 0);

			if (reason)
				return policy_drop(reason, 0, be->ifindex, NULL);
		}
	}
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;
	down = eth->h_proto == bpf_htons(ETH_P_IP) ? ttl_down_ipv4(skb) :
						     hop_down_ipv6(skb);
	if (down < 0 || svc_apply(skb))
		return TC_ACT_SHOT;
	if (!be) {
		ret = fib_forward(skb);
		return ret < 0 ? TC_ACT_SHOT : ret;
	}
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;
	mac_copy(eth->h_dest, be->pod_mac);
	mac_copy(eth->h_source, be->host_mac);
	st = stats_of(be->ifindex);
	if (st) {
		st->redirected_in_packets++;
		st->redirected_in_bytes += skb->len;
	}
	if (be->flags & ENDPOINT_F_SHAPED) {
		skb->mark = FERRITE_MARK_SHAPED;
		return bpf_redirect(be->ifindex, 0);
	}
	return bpf_redirect_peer(be->ifindex, 0);
}

/*
 * A packet for a pod of this node (@dst, its flow in the scratch key):
 * redirected into it unless the stack must carry it.
 */
static __noinline int to_local_pod(struct __sk_buff *skb, int kind,
				   struct endpoint *dst)
{
	struct scratch *sc = scratch();
	struct endpoint_stats *st;
	struct ep_policy *pol;
	union v6addr src;
	int xlated = 0;
	struct ethhdr *eth;
	void *data, *data_end;
	int down;

	if (!sc)
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
	if (is_stack_flow(&sc->key))
		return TC_ACT_UNSPEC;
	sc->orig = sc->key;
	xlated = svc_reverse(kind) == SVC_XLATED;
	/* A hairpin's answer never crosses nodes. */
	if (xlated && (sc->nat.what & SVC_NAT_DST))
		return TC_ACT_UNSPEC;
	pol = policy_of(dst->ifindex);
	if (pol && !policy_exempt(&sc->key)) {
		int reason = policy_verdict(&sc->key, kind, NULL, pol, 0);

		if (reason)
			return policy_drop(reason, 0, dst->ifindex, NULL);
	}
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
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

SEC("classifier")
int from_uplink(struct __sk_buff *skb)
{
	struct scratch *sc = scratch();
	struct endpoint *dst;
	int kind, lookup;

	/* Only frames addressed to this node; never another's. */
	if (skb->pkt_type != PACKET_HOST || !sc)
		return TC_ACT_UNSPEC;
	pull_headers(skb);
	kind = flow_of_frame(skb, &sc->key);
	if (!flow_is_routable(kind))
		return TC_ACT_UNSPEC;
	dst = bpf_map_lookup_elem(&ferrite_endpts, &sc->key.daddr);
	if (dst)
		return to_local_pod(skb, kind, dst);
	lookup = node_frontends();
	if (lookup && is_host_address(&sc->key.daddr))
		return nodeport(skb, kind, lookup);
	return TC_ACT_UNSPEC;
}

char _license[] SEC("license") = "Dual BSD/GPL";
