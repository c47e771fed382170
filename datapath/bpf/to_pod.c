// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * to_pod: tc egress of the host veth: packets the host stack delivers to the
 * pod. Packets from_pod redirects enter the pod directly and never pass here,
 * except those for a shaped pod, which from_pod marks (FERRITE_MARK_SHAPED).
 *
 * Enforces NetworkPolicy on what the stack delivers: the pod's ingress
 * rules, and the egress rules of a sender on this node whose packet the
 * stack translated (a Service's DNAT). The node's own traffic passes.
 *
 * Records the reverse tuple of each flow in ferrite_stkflow, so the pod's
 * answers go back through the host stack too: conntrack must see them to
 * undo the NAT of Services (kube-proxy DNAT) and hostPorts (portmap).
 *
 * A backend's answer to a Service flow from_pod translated, which the
 * stack carried here untranslated, gets the Service's address now.
 */
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#include "lib/common.h"
#include "lib/flow.h"
#include "lib/policy.h"
#include "lib/service.h"
#include "lib/stats.h"

/*
 * NetworkPolicy for a packet the stack delivers through host veth
 * @ifindex. Returns 0, or TC_ACT_SHOT with the drop counted.
 */
static __always_inline int check_policy(const struct flow_key *key, int kind,
					__u32 ifindex)
{
	struct ep_policy *dst = policy_of(ifindex);
	struct ep_policy *src = NULL;
	struct endpoint *sender;
	int reason;

	if (kind == FLOW_MALFORMED || policy_exempt(key))
		return 0;
	sender = bpf_map_lookup_elem(&ferrite_endpts, &key->saddr);
	if (sender)
		src = policy_of(sender->ifindex);
	if (!(policy_bits(src) | policy_bits(dst)))
		return 0;
	if (!sender && is_host_address(&key->saddr))
		return 0;
	reason = policy_verdict(key, kind, src, dst, 1);
	if (reason)
		return policy_drop(reason, sender ? sender->ifindex : 0, ifindex,
				   src);
	return 0;
}

SEC("classifier")
int to_pod(struct __sk_buff *skb)
{
	struct endpoint_stats *st;
	struct scratch *sc = scratch();
	struct flow_key key;
	int kind;

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
	kind = flow_of_frame(skb, &key);
	if (check_policy(&key, kind, skb->ifindex))
		return TC_ACT_SHOT;
	/* (Only an IPv6 extension header makes svc_apply fail: as it is.) */
	if (sc) {
		sc->key = key;
		sc->orig = key;
		if (svc_reverse(kind) == SVC_XLATED &&
		    !(sc->nat.what & SVC_NAT_DST))
			svc_apply(skb);
	}
	if (flow_is_recordable(kind))
		remember_reply(&key);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual BSD/GPL";
