// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * from_pod: tc ingress of the host veth: packets leaving the pod.
 *
 * Drops anything whose source IP or MAC is not the pod's own, translates
 * a packet for a Service into one for a backend (lib/service.h), redirects
 * packets for another pod on this node straight into it (bpf_redirect_peer,
 * or through its host veth's egress when a qdisc shapes what it receives),
 * and hands everything else to the host stack.
 */
#include <stddef.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#include "lib/common.h"
#include "lib/flow.h"
#include "lib/policy.h"
#include "lib/reject.h"
#include "lib/remote.h"
#include "lib/service.h"
#include "lib/stats.h"

/* linux/if_arp.h needs libc headers; this is the Ethernet/IPv4 ARP body. */
#define ARPHRD_ETHER 1

struct arp_eth {
	__be16 ar_hrd;
	__be16 ar_pro;
	__u8 ar_hln;
	__u8 ar_pln;
	__be16 ar_op;
	__u8 sha[ETH_ALEN];
	__u8 sip[4];
	__u8 tha[ETH_ALEN];
	__u8 tip[4];
} __attribute__((packed));
_Static_assert(sizeof(struct arp_eth) == 28, "arp_eth size");

/* The pod's IPv4 gateway, 169.254.1.1, in network order. */
#define GATEWAY_V4 bpf_htonl(0xa9fe0101)
#define ARPOP_REQUEST 1
#define ARPOP_REPLY 2

/*
 * The sender of an ARP packet must be the pod itself, on its own veth.
 * A request for the gateway is answered here, with the host veth's MAC,
 * for a pod that lost its permanent neighbour entry (changing a MAC flushes
 * the table): nothing on the host owns 169.254.1.1 to answer it.
 */
static __always_inline int handle_arp(struct ethhdr *eth, void *data_end,
				      __u32 ifindex)
{
	struct arp_eth *arp = (void *)(eth + 1);
	struct endpoint *ep;
	union v6addr sip;
	__be32 ip;

	if ((void *)(arp + 1) > data_end)
		return DROP_MALFORMED;
	if (arp->ar_hrd != bpf_htons(ARPHRD_ETHER) ||
	    arp->ar_pro != bpf_htons(ETH_P_IP) || arp->ar_hln != ETH_ALEN ||
	    arp->ar_pln != 4)
		return DROP_MALFORMED;

	__builtin_memcpy(&ip, arp->sip, sizeof(ip));
	v4_mapped(&sip, ip);
	ep = bpf_map_lookup_elem(&ferrite_endpts, &sip);
	if (!ep || ep->ifindex != ifindex || !mac_eq(ep->pod_mac, arp->sha) ||
	    !mac_eq(ep->pod_mac, eth->h_source))
		return DROP_ARP_SPOOF;

	__builtin_memcpy(&ip, arp->tip, sizeof(ip));
	if (arp->ar_op != bpf_htons(ARPOP_REQUEST) || ip != GATEWAY_V4)
		return TC_ACT_OK;
	arp->ar_op = bpf_htons(ARPOP_REPLY);
	__builtin_memcpy(arp->tha, ep->pod_mac, ETH_ALEN);
	__builtin_memcpy(arp->tip, arp->sip, 4);
	__builtin_memcpy(arp->sha, ep->host_mac, ETH_ALEN);
	__builtin_memcpy(arp->sip, &ip, 4);
	__builtin_memcpy(eth->h_dest, ep->pod_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, ep->host_mac, ETH_ALEN);
	/* Back out of the host veth, into the pod. */
	return bpf_redirect(ifindex, 0);
}

/*
 * Source IP must belong to this veth's endpoint, source MAC to its pod.
 * Returns a drop reason, 0 to go on, or TC_ACT_UNSPEC when a chained
 * plugin shapes what this pod sends and must see the packet (once the
 * policy let it go).
 */
static __always_inline int check_source(const union v6addr *saddr,
					const __u8 *smac, __u32 ifindex,
					__u32 *flags)
{
	struct endpoint *ep = bpf_map_lookup_elem(&ferrite_endpts, saddr);

	if (!ep || ep->ifindex != ifindex)
		return DROP_SPOOFED_IP;
	if (!mac_eq(ep->pod_mac, smac))
		return DROP_SPOOFED_MAC;
	*flags = ep->flags;
	if (ep->flags & ENDPOINT_F_VIA_STACK)
		return TC_ACT_UNSPEC;
	return 0;
}

/*
 * @dst (the destination's endpoint, or NULL) if @key may take the fast
 * path: a pod on this node behind another veth (or the sender itself, for
 * a Service's hairpin, @translated), and not a flow the host stack
 * delivered.
 */
static __always_inline struct endpoint *fast_path_target(struct flow_key *key,
							 struct endpoint *dst,
							 __u32 ifindex,
							 int translated)
{
	if (!dst || (dst->ifindex == ifindex && !translated))
		return NULL;
	if (is_stack_flow(key))
		return NULL;
	return dst;
}

/*
 * Whether @key, for no endpoint of this node, may take the fast path to
 * another node's pod.
 */
static __always_inline int to_other_node(const struct flow_key *key)
{
	return is_pod_address(&key->daddr) && !is_stack_flow(key);
}

/*
 * NetworkPolicy for a packet the pod sends: its own egress rules, and the
 * ingress rules of @dst when the destination is a pod of this node (a
 * redirect skips the destination's own hooks). A packet to a Service
 * address has its egress judged once the stack has translated it (to_pod,
 * to_uplink); one to the node itself is always allowed. Returns 0, or
 * TC_ACT_SHOT with the drop counted.
 */
__noinline int judge_policy(int kind, __u32 ifindex, __u32 dst_ifindex);

static __always_inline int check_policy(const struct flow_key *key, int kind,
					const struct endpoint *dst,
					__u32 ifindex)
{
	struct ep_policy *src = policy_of(ifindex);
	struct ep_policy *dpol = dst ? policy_of(dst->ifindex) : NULL;

	if (!(policy_bits(src) | policy_bits(dpol)))
		return 0;
	return judge_policy(kind, ifindex, dst ? dst->ifindex : 0);
}

/*
 * The rules' part of check_policy(), for the flow in the scratch key:
 * global, so the verifier walks it once rather than on every path that
 * reaches it.
 */
__noinline int judge_policy(int kind, __u32 ifindex, __u32 dst_ifindex)
{
	struct scratch *s = scratch();
	struct ep_policy *src = policy_of(ifindex);
	struct ep_policy *dpol = dst_ifindex ? policy_of(dst_ifindex) : NULL;
	int check_egress = 1;
	int reason;

	if (!s || policy_exempt(&s->key))
		return 0;
	if (!dst_ifindex && (is_service_address(&s->key.daddr) ||
			     is_host_address(&s->key.daddr)))
		check_egress = 0;
	reason = policy_verdict(&s->key, kind, src, dpol, check_egress);
	if (reason)
		return policy_drop(reason, ifindex, dst_ifindex, src);
	return 0;
}

static __always_inline void count_redirect(struct endpoint_stats *st,
					   struct __sk_buff *skb)
{
	if (st) {
		st->redirected_packets++;
		st->redirected_bytes += skb->len;
	}
}

static __always_inline int redirect_to(struct __sk_buff *skb,
				       struct endpoint_stats *st,
				       const struct endpoint *dst)
{
	struct endpoint_stats *dst_st = stats_of(dst->ifindex);

	count_redirect(st, skb);
	if (dst_st) {
		dst_st->redirected_in_packets++;
		dst_st->redirected_in_bytes += skb->len;
	}
	if (dst->flags & ENDPOINT_F_SHAPED) {
		/* Through the qdisc that limits what the pod receives. */
		skb->mark = FERRITE_MARK_SHAPED;
		return bpf_redirect(dst->ifindex, 0);
	}
#ifdef FERRITE_PLAIN_REDIRECT
	/*
	 * Only in a benchmark build that measures what redirect_peer saves:
	 * out of the destination's host veth, as for a shaped pod.
	 */
	skb->mark = FERRITE_MARK_SHAPED;
	return bpf_redirect(dst->ifindex, 0);
#else
	return bpf_redirect_peer(dst->ifindex, 0);
#endif
}

/*
 * One hop less for the IPv4 packet in @skb, checksum updated. Invalidates
 * packet pointers.
 */
static __always_inline int decrement_ttl(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	__be16 old_word, new_word;

	if ((void *)(ip + 1) > data_end)
		return -1;
	__builtin_memcpy(&old_word, &ip->ttl, sizeof(old_word));
	ip->ttl--;
	__builtin_memcpy(&new_word, &ip->ttl, sizeof(new_word));
	return bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check),
				   old_word, new_word, sizeof(new_word));
}

/* What a Service translation did to a packet (lib/service.h). */
#define XLATE_NONE 0
#define XLATE_FORWARD 1		/* a client's packet, now for a backend */
#define XLATE_REVERSE 2		/* a backend's answer, to become the Service's */

/*
 * What the parser, the Services and the policy say of a packet whose
 * source checked out (its flow in @s->key): a drop reason, TC_ACT_SHOT (a
 * policy drop, counted), FLOW_REJECT (a Service without backends),
 * TC_ACT_OK for the stack, or FLOW_GO_ON towards a fast path. Every
 * fragment of a datagram goes to the stack, which reassembles, and so
 * does what ferrite does not route by flow. The key becomes the flow as
 * the backend sees it, which is what the policy judges; @dst the
 * destination's endpoint, if on this node; @dir the translation
 * (XLATE_*). @nat_ok is 0 where the packet cannot be translated (IPv6
 * extension headers).
 */
#define FLOW_GO_ON 1
#define FLOW_REJECT 100

static __always_inline int judge(struct __sk_buff *skb, struct scratch *s,
				 int kind, int nat_ok, __u32 l4_off,
				 struct endpoint **dst, int *dir, __u32 ifindex,
				 __u32 src_flags)
{
	int svc_kind = nat_ok ? kind : FLOW_OTHER;
	int lookup = node_frontends();
	int ret;

	*dir = XLATE_NONE;
	if (kind == FLOW_MALFORMED)
		return DROP_MALFORMED;
	s->orig = s->key;
	ret = svc_forward(skb, svc_kind, 0);
	/* A hostPort, or without kube-proxy a NodePort, of this node. */
	if (ret == SVC_NONE && lookup && is_host_address(&s->key.daddr))
		ret = svc_forward(skb, svc_kind, lookup);
	if (ret < 0)
		return ret;
	if (ret == SVC_REJECT)
		return FLOW_REJECT;
	if (ret == SVC_XLATED)
		*dir = XLATE_FORWARD;
	*dst = bpf_map_lookup_elem(&ferrite_endpts, &s->key.daddr);
	/*
	 * An answer from a backend goes to a client here, to its Service
	 * (hairpin), or (NodePorts, a hostPort's pod) to a client outside.
	 */
	if (*dir == XLATE_NONE &&
	    (*dst || is_service_address(&s->key.daddr) ||
	     (lookup & SVC_LOOKUP_NODEPORT) ||
	     ((lookup & SVC_LOOKUP_HOSTPORT) &&
	      (src_flags & ENDPOINT_F_HOSTPORT))) &&
	    svc_reverse(svc_kind) == SVC_XLATED) {
		*dir = XLATE_REVERSE;
		if (s->nat.what & SVC_NAT_DST)
			*dst = bpf_map_lookup_elem(&ferrite_endpts, &s->key.daddr);
	}
	if (*dir == XLATE_NONE && nat_ok && kind == FLOW_OK &&
	    s->key.proto == IPPROTO_TCP)
		svc_forget_reused(skb, l4_off);
	ret = check_policy(&s->key, kind, *dst, ifindex);
	if (ret)
		return ret;
	return flow_is_routable(kind) ? FLOW_GO_ON : TC_ACT_OK;
}

/*
 * The packet goes to the host stack: a client's packet translated, a
 * backend's answer as it is (the stack saw the flow untranslated, and
 * to_pod translates the answer on its way into the client). A pod whose
 * sending a chained plugin shapes (@via_stack) passes every packet on
 * (TC_ACT_UNSPEC).
 */
static __always_inline int to_stack(struct __sk_buff *skb, int dir,
				    int via_stack)
{
	if (dir == XLATE_FORWARD) {
		int ret = svc_apply(skb);

		if (ret)
			return ret;
	}
	return via_stack ? TC_ACT_UNSPEC : TC_ACT_OK;
}

/* Applies a translation before a redirect. */
static __always_inline int translate(struct __sk_buff *skb, int dir)
{
	return dir == XLATE_NONE ? 0 : svc_apply(skb);
}

/*
 * The answer of a Service without backends (a TCP RST, else "port
 * unreachable"), straight back into the pod.
 */
static __always_inline int reject(struct __sk_buff *skb, __u8 proto,
				  __u32 ifindex)
{
	int ret = proto == IPPROTO_TCP ? reject_tcp(skb) : 1;

	if (ret == 1)
		ret = reject_packet(skb);
	if (ret)
		return ret;
	return bpf_redirect_peer(ifindex, 0);
}

/* After a verdict from judge(): the answers that end the packet's way here. */
static __always_inline int settled(int ret)
{
	return ret != FLOW_GO_ON && ret != TC_ACT_OK;
}
static __noinline int handle_ipv4(struct __sk_buff *skb,
				       struct endpoint_stats *st, __u32 ifindex)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct scratch *sc = scratch();
	struct endpoint *dst = NULL;
	union v6addr saddr;
	int via_stack, dir, ret;
	__u32 l4_off, src_flags = 0;

	if (!sc)
		return DROP_MALFORMED;
	if ((void *)(ip + 1) > data_end)
		return DROP_MALFORMED;
	if (ip->version != 4 || (ip->ihl & 0xf) < 5)
		return DROP_MALFORMED;

	v4_mapped(&saddr, ip->saddr);
	ret = check_source(&saddr, eth->h_source, ifindex, &src_flags);
	if (ret != 0 && ret != TC_ACT_UNSPEC)
		return ret;
	via_stack = ret == TC_ACT_UNSPEC;

	l4_off = ETH_HLEN + (ip->ihl & 0xf) * 4;
	ret = judge(skb, sc, flow_of_ipv4(skb, &sc->key, ETH_HLEN), 1, l4_off,
		    &dst, &dir, ifindex, src_flags);
	if (ret == FLOW_REJECT)
		return reject(skb, sc->key.proto, ifindex);
	if (settled(ret))
		return ret;
	if (via_stack || ret == TC_ACT_OK)
		return to_stack(skb, dir, via_stack);

	/* TTL 1 goes to the stack, which answers with ICMP time exceeded. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	ip = data + sizeof(struct ethhdr);
	if ((void *)(ip + 1) > data_end)
		return DROP_MALFORMED;
	if (ip->ttl <= 1)
		return to_stack(skb, dir, 0);
	if (dst) {
		dst = fast_path_target(&sc->key, dst, ifindex, dir != XLATE_NONE);
		if (!dst)
			return to_stack(skb, dir, 0);
	} else {
		struct bpf_fib_lookup fib = {};
		long rc;

		/*
		 * A NodePort's answer leaves with this node's address as its
		 * source: the stack would take it for a martian.
		 */
		if (!to_other_node(&sc->key) && dir != XLATE_REVERSE)
			return to_stack(skb, dir, 0);
		ret = translate(skb, dir);
		if (ret)
			return ret;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		ip = data + sizeof(struct ethhdr);
		if ((void *)(ip + 1) > data_end)
			return DROP_MALFORMED;
		fib.family = FERRITE_AF_INET;
		fib.tos = ip->tos;
		fib.l4_protocol = ip->protocol;
		fib.ipv4_src = ip->saddr;
		fib.ipv4_dst = ip->daddr;
		rc = fib_resolve(skb, &fib);
		/* Translated already: the stack takes it as it is now. */
		if (rc < 0)
			return TC_ACT_OK;
		if (decrement_ttl(skb) < 0)
			return DROP_CSUM_ERR;
		count_redirect(st, skb);
		return fib_send(skb, &fib, rc);
	}

	ret = translate(skb, dir);
	if (ret)
		return ret;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return DROP_MALFORMED;
	mac_copy(eth->h_dest, dst->pod_mac);
	mac_copy(eth->h_source, dst->host_mac);
	/* Invalidates packet pointers: nothing reads the packet after this. */
	if (decrement_ttl(skb) < 0)
		return DROP_CSUM_ERR;

	return redirect_to(skb, st, dst);
}

static __always_inline int is_link_local_or_unspec(const union v6addr *a)
{
	if (a->b[0] == 0xfe && (a->b[1] & 0xc0) == 0x80)
		return 1;
	return (a->w[0] | a->w[1] | a->w[2] | a->w[3]) == 0;
}

static __always_inline int is_neighbour_discovery(__u8 type)
{
	return type >= NDISC_ROUTER_SOLICITATION && type <= NDISC_REDIRECT;
}

static __noinline int handle_ipv6(struct __sk_buff *skb,
				       struct endpoint_stats *st, __u32 ifindex)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	struct scratch *sc = scratch();
	struct endpoint *dst = NULL;
	union v6addr saddr;
	int via_stack, dir, kind, nat_ok, ret;
	__u32 src_flags = 0;

	if (!sc)
		return DROP_MALFORMED;
	if ((void *)(ip6 + 1) > data_end)
		return DROP_MALFORMED;
	if (ip6->version != 6)
		return DROP_MALFORMED;

	__builtin_memcpy(&saddr, &ip6->saddr, sizeof(saddr));
	if (is_link_local_or_unspec(&saddr)) {
		/*
		 * DAD, NDP, MLD: not one of the pod's addresses, so check
		 * the MAC against the endpoint that owns this veth. Such
		 * packets never leave the link, so the stack gets them.
		 */
		struct iface *ifc = bpf_map_lookup_elem(&ferrite_ifaces, &ifindex);

		if (!ifc)
			return DROP_NO_ENDPOINT;
		if (!mac_eq(ifc->pod_mac, eth->h_source))
			return DROP_SPOOFED_MAC;
		return TC_ACT_OK;
	}

	ret = check_source(&saddr, eth->h_source, ifindex, &src_flags);
	if (ret != 0 && ret != TC_ACT_UNSPEC)
		return ret;
	via_stack = ret == TC_ACT_UNSPEC;

	kind = flow_of_ipv6(skb, &sc->key, ETH_HLEN);
	if (kind == FLOW_MALFORMED)
		return DROP_MALFORMED;
	/* flow_of_ipv6 reads with helpers: reload the pointers it may move. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	ip6 = (void *)(eth + 1);
	if ((void *)(ip6 + 1) > data_end)
		return DROP_MALFORMED;
	if (ip6->nexthdr == IPPROTO_ICMPV6) {
		struct icmp_echo *icmp6 = (void *)(ip6 + 1);

		if ((void *)(icmp6 + 1) > data_end)
			return DROP_MALFORMED;
		if (is_neighbour_discovery(icmp6->type))
			return via_stack ? TC_ACT_UNSPEC : TC_ACT_OK;
	}
	/* Translation rewrites a transport header right after the IPv6 one. */
	nat_ok = ip6->nexthdr == sc->key.proto;

	ret = judge(skb, sc, kind, nat_ok, ETH_HLEN + sizeof(struct ipv6hdr),
		    &dst, &dir, ifindex, src_flags);
	if (ret == FLOW_REJECT)
		return reject(skb, sc->key.proto, ifindex);
	if (settled(ret))
		return ret;
	if (via_stack || ret == TC_ACT_OK)
		return to_stack(skb, dir, via_stack);

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	ip6 = data + sizeof(struct ethhdr);
	if ((void *)(ip6 + 1) > data_end)
		return DROP_MALFORMED;
	if (ip6->hop_limit <= 1)
		return to_stack(skb, dir, 0);
	if (dst) {
		dst = fast_path_target(&sc->key, dst, ifindex, dir != XLATE_NONE);
		if (!dst)
			return to_stack(skb, dir, 0);
	} else {
		struct bpf_fib_lookup fib = {};
		long rc;

		/*
		 * A NodePort's answer leaves with this node's address as its
		 * source: the stack would take it for a martian.
		 */
		if (!to_other_node(&sc->key) && dir != XLATE_REVERSE)
			return to_stack(skb, dir, 0);
		ret = translate(skb, dir);
		if (ret)
			return ret;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		ip6 = data + sizeof(struct ethhdr);
		if ((void *)(ip6 + 1) > data_end)
			return DROP_MALFORMED;
		fib.family = FERRITE_AF_INET6;
		fib.flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0fffffff);
		fib.l4_protocol = ip6->nexthdr;
		__builtin_memcpy(fib.ipv6_src, &ip6->saddr, sizeof(fib.ipv6_src));
		__builtin_memcpy(fib.ipv6_dst, &ip6->daddr, sizeof(fib.ipv6_dst));
		rc = fib_resolve(skb, &fib);
		/* Translated already: the stack takes it as it is now. */
		if (rc < 0)
			return TC_ACT_OK;
		/* fib_resolve may move the packet: reload before writing. */
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		ip6 = data + sizeof(struct ethhdr);
		if ((void *)(ip6 + 1) > data_end)
			return DROP_MALFORMED;
		ip6->hop_limit--;
		count_redirect(st, skb);
		return fib_send(skb, &fib, rc);
	}

	ret = translate(skb, dir);
	if (ret)
		return ret;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	ip6 = (void *)(eth + 1);
	if ((void *)(ip6 + 1) > data_end)
		return DROP_MALFORMED;
	mac_copy(eth->h_dest, dst->pod_mac);
	mac_copy(eth->h_source, dst->host_mac);
	ip6->hop_limit--;

	return redirect_to(skb, st, dst);
}

static __always_inline int handle(struct __sk_buff *skb,
				  struct endpoint_stats *st, __u32 ifindex)
{
	void *data, *data_end;
	struct ethhdr *eth;

	pull_headers(skb);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return DROP_MALFORMED;

	switch (eth->h_proto) {
	case bpf_htons(ETH_P_ARP):
		return handle_arp(eth, data_end, ifindex);
	case bpf_htons(ETH_P_IP):
		return handle_ipv4(skb, st, ifindex);
	case bpf_htons(ETH_P_IPV6):
		return handle_ipv6(skb, st, ifindex);
	default:
		return DROP_UNSUPPORTED_L3;
	}
}

SEC("classifier")
int from_pod(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint_stats *st = stats_of(ifindex);
	int ret;

	if (st) {
		st->from_pod_packets++;
		st->from_pod_bytes += skb->len;
	}

	ret = handle(skb, st, ifindex);
	/* Drop reasons are all below TC_ACT_UNSPEC, which passes through. */
	if (ret < TC_ACT_UNSPEC) {
		count_drop(st, ret);
		return TC_ACT_SHOT;
	}
	return ret;
}

char _license[] SEC("license") = "Dual BSD/GPL";
