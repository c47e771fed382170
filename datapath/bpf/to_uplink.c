// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * to_uplink: TCX egress of the node's uplink: packets leaving for other
 * nodes.
 *
 * A pod's packet the host stack sends out (a Service's DNAT to a pod on
 * another node, say) has its answer's tuple recorded, so that from_uplink
 * hands the answer to the stack, whose conntrack undoes the NAT. Packets
 * from_pod sent through the fast path carry FERRITE_MARK_REMOTE and are
 * not recorded. Always passes the packet on (TC_ACT_UNSPEC).
 */
#include <linux/if_ether.h>

#include "lib/common.h"
#include "lib/flow.h"

SEC("classifier")
int to_uplink(struct __sk_buff *skb)
{
	struct flow_key key;

	if (skb->mark == FERRITE_MARK_REMOTE) {
		skb->mark = 0;
		return TC_ACT_UNSPEC;
	}
	pull_headers(skb);
	if (!flow_is_recordable(flow_of_frame(skb, &key)))
		return TC_ACT_UNSPEC;
	/* Only pods of this node: the node's own traffic is none of ours. */
	if (!bpf_map_lookup_elem(&ferrite_endpts, &key.saddr))
		return TC_ACT_UNSPEC;
	remember_reply(&key);
	return TC_ACT_UNSPEC;
}

char _license[] SEC("license") = "Dual BSD/GPL";
