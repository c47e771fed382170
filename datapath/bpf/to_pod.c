// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * to_pod: tc egress of the host veth: packets the host stack delivers to the
 * pod. Packets from_pod redirects enter the pod directly and never pass here,
 * except those for a shaped pod, which from_pod marks (FERRITE_MARK_SHAPED).
 *
 * Records the reverse tuple of each flow in ferrite_stkflow, so the pod's
 * answers go back through the host stack too: conntrack must see them to
 * undo the NAT of Services (kube-proxy DNAT) and hostPorts (portmap).
 * Never drops.
 */
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#include "lib/common.h"
#include "lib/flow.h"
#include "lib/stats.h"

#define IP_OFFSET 0x1fff

/* Refresh a known flow's timestamp at most this often (cache-line traffic). */
#define STACKFLOW_REFRESH_NS 1000000000ULL

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

static __always_inline void track_ipv4(void *l3, void *data_end)
{
	struct iphdr *ip = l3;
	struct flow_key key;
	__u32 hlen;

	if ((void *)(ip + 1) > data_end)
		return;
	hlen = (ip->ihl & 0xf) * 4;
	if (ip->version != 4 || hlen < sizeof(*ip))
		return;
	/* Later fragments have no ports; the first one records the flow. */
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		return;

	__builtin_memset(&key, 0, sizeof(key));
	v4_mapped(&key.saddr, ip->saddr);
	v4_mapped(&key.daddr, ip->daddr);
	key.proto = ip->protocol;
	if (flow_ports(&key, l3 + hlen, data_end) < 0)
		return;
	remember_reply(&key);
}

static __always_inline void track_ipv6(void *l3, void *data_end)
{
	struct ipv6hdr *ip6 = l3;
	struct flow_key key;

	if ((void *)(ip6 + 1) > data_end)
		return;
	if (ip6->version != 6 || ip6->nexthdr == IPPROTO_FRAGMENT)
		return;

	__builtin_memset(&key, 0, sizeof(key));
	__builtin_memcpy(&key.saddr, &ip6->saddr, sizeof(key.saddr));
	__builtin_memcpy(&key.daddr, &ip6->daddr, sizeof(key.daddr));
	key.proto = ip6->nexthdr;
	if (flow_ports(&key, ip6 + 1, data_end) < 0)
		return;
	remember_reply(&key);
}

SEC("classifier")
int to_pod(struct __sk_buff *skb)
{
	struct endpoint_stats *st;
	void *data, *data_end;
	struct ethhdr *eth;

#ifdef FERRITE_BUILD_TAG
	/* A build whose programs differ, for upgrade tests; cb is scratch. */
	skb->cb[4] = FERRITE_BUILD_TAG;
#endif
	/* from_pod's fast path into a shaped pod: counted there already. */
	if (skb->mark == FERRITE_MARK_SHAPED) {
		skb->mark = 0;
		return TC_ACT_OK;
	}

	st = stats_of(skb->ifindex);
	if (st) {
		st->to_pod_packets++;
		st->to_pod_bytes += skb->len;
	}

	pull_headers(skb);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;

	if (eth->h_proto == bpf_htons(ETH_P_IP))
		track_ipv4(eth + 1, data_end);
	else if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		track_ipv6(eth + 1, data_end);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual BSD/GPL";
