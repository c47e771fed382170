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

SEC("classifier")
int to_pod(struct __sk_buff *skb)
{
	struct endpoint_stats *st;
	struct flow_key key;

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
	if (flow_is_recordable(flow_of_frame(skb, &key)))
		remember_reply(&key);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual BSD/GPL";
