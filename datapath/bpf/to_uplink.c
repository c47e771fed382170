// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * to_uplink: TCX egress of the node's uplink: packets leaving for other
 * nodes.
 *
 * A pod's packet the host stack sends out (a Service's DNAT to a pod on
 * another node, say) has its answer's tuple recorded, so that from_uplink
 * hands the answer to the stack, whose conntrack undoes the NAT. Packets
 * from_pod sent through the fast path carry FERRITE_MARK_REMOTE and are
 * not recorded. A pod's packet whose egress the stack's translation made
 * judgeable (a Service's backend on another node) meets the pod's
 * NetworkPolicy egress rules here; everything else passes on
 * (TC_ACT_UNSPEC).
 */
#include <linux/if_ether.h>

#include "lib/common.h"
#include "lib/flow.h"
#include "lib/policy.h"

SEC("classifier")
int to_uplink(struct __sk_buff *skb)
{
	struct endpoint *sender;
	struct ep_policy *pol;
	struct flow_key key;
	int kind;

	if (skb->mark == FERRITE_MARK_REMOTE) {
		skb->mark = 0;
		return TC_ACT_UNSPEC;
	}
	pull_headers(skb);
	kind = flow_of_frame(skb, &key);
	if (kind == FLOW_MALFORMED)
		return TC_ACT_UNSPEC;
	/* Only pods of this node: the node's own traffic is none of ours. */
	sender = bpf_map_lookup_elem(&ferrite_endpts, &key.saddr);
	if (!sender)
		return TC_ACT_UNSPEC;
	pol = policy_of(sender->ifindex);
	if (pol && !policy_exempt(&key)) {
		int reason = policy_verdict(&key, kind, pol, NULL,
					    !is_host_address(&key.daddr));

		if (reason)
			return policy_drop(reason, sender->ifindex, 0, pol);
	}
	if (flow_is_recordable(kind))
		remember_reply(&key);
	return TC_ACT_UNSPEC;
}

char _license[] SEC("license") = "Dual BSD/GPL";
