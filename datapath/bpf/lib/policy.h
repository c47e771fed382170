// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * NetworkPolicy: whether a flow's first packet may pass.
 *
 * The node agent compiles the policies that select an endpoint into one
 * rule set per direction and gives each distinct rule set an id; endpoints
 * with the same rules share it. A rule set's rules are numbered, 64 to a
 * word, and two LPM tries answer, per word, which rules a packet matches:
 *
 *   ferrite_polport (set, word, protocol, port) -> rules whose ports
 *     include it (a port range is a few prefixes; a rule without ports
 *     matches every protocol through a prefix that stops before it);
 *   ferrite_polpeer (set, word, address) -> rules whose peers include it
 *     (a pod is a /32 or /128, an ipBlock its prefix, every longer prefix
 *     inside it carries the union of the rules covering it, and an except
 *     is a prefix that carries only the others).
 *
 * A packet is allowed when, for some word, the two answers share a bit.
 * Sizes grow with the rules and their peers and ports, never with their
 * product. Only a flow's first packet pays this: conntrack.h remembers the
 * flows allowed.
 */
#ifndef FERRITE_POLICY_H
#define FERRITE_POLICY_H

#include "common.h"
#include "conntrack.h"
#include "flow.h"
#include "stats.h"

/* Rule words one rule set may have: 64 * 16 = 1,024 rules per direction. */
#define FERRITE_POLICY_MAX_WORDS 16
#define FERRITE_MAX_POLICY_PORTS 65536
#define FERRITE_MAX_POLICY_PEERS 262144

/* One direction's rules: id 0 means the direction is not isolated. */
struct rule_set {
	__u32 id;
	__u32 words;		/* rule words in use, 0 to _MAX_WORDS */
};

/* ep_policy.flags: the agent has not programmed this endpoint yet. */
#define EP_POLICY_F_PENDING 0x1
/* Never stored: policy_bits() marks an endpoint that has a policy entry. */
#define EP_POLICY_PRESENT 0x80000000

/* ferrite_eppol value, keyed by host veth ifindex. */
struct ep_policy {
	struct rule_set ingress;
	struct rule_set egress;
	__u32 flags;		/* EP_POLICY_F_* */
	__u32 _pad;
};
_Static_assert(sizeof(struct ep_policy) == 24, "ep_policy size");

/* Prefix lengths count the bits after prefixlen: set, word, pad, then... */
#define POLICY_KEY_HEAD_BITS 64

struct polport_key {
	__u32 prefixlen;	/* 64: any protocol, 80: any port, 80 + n */
	__u32 set;
	__u8 word;
	__u8 _pad[3];
	__u8 proto;
	__u8 _pad2;
	__be16 port;
};
_Static_assert(sizeof(struct polport_key) == 16, "polport_key size");

struct polpeer_key {
	__u32 prefixlen;	/* 64 + the address's prefix (IPv4: 96 + n) */
	__u32 set;
	__u8 word;
	__u8 _pad[3];
	union v6addr addr;
};
_Static_assert(sizeof(struct polpeer_key) == 28, "polpeer_key size");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FERRITE_MAX_ENDPOINTS);
	__type(key, __u32);
	__type(value, struct ep_policy);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_eppol SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, FERRITE_MAX_POLICY_PORTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct polport_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_polport SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, FERRITE_MAX_POLICY_PEERS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct polpeer_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_polpeer SEC(".maps");

/*
 * ferrite_hostips: the node's own addresses (the agent writes them). The
 * node reaches its pods whatever their policies say (kubelet probes), as
 * the NetworkPolicy API documents.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, union v6addr);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_hostips SEC(".maps");

/*
 * ferrite_svcnets: the cluster's Service CIDRs, same layout as
 * ferrite_podnets. A pod's packet to a Service address is judged by its
 * egress rules where its real destination is known: after the stack's
 * DNAT, in to_pod or to_uplink.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct podnet_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_svcnets SEC(".maps");

/*
 * Traffic no rule ever judges: IPv6 link-local, multicast and unspecified
 * addresses (neighbour discovery, DAD, MLD), which never leave the link.
 */
static __always_inline int policy_exempt(const struct flow_key *key)
{
	const union v6addr *a[2] = { &key->saddr, &key->daddr };
	int i;

	for (i = 0; i < 2; i++) {
		__u8 b0 = a[i]->b[0], b1 = a[i]->b[1];

		if ((b0 == 0xfe && (b1 & 0xc0) == 0x80) || b0 == 0xff)
			return 1;
		if ((a[i]->w[0] | a[i]->w[1] | a[i]->w[2] | a[i]->w[3]) == 0)
			return 1;
	}
	return 0;
}

/*
 * User space only (no program reads them), pinned with the rest:
 *
 * ferrite_polns: the namespaces that have a NetworkPolicy (the agent
 * writes them). ADD starts an endpoint there as pending.
 *
 * ferrite_podids: which pod each host veth serves (ADD writes it), so the
 * agent programs an endpoint as soon as it exists, before the API server
 * has heard of its address.
 *
 * ferrite_podpol: the policy the agent computed for each pod scheduled to
 * this node in a namespace with policies, before its sandbox exists; ADD
 * copies it into ferrite_eppol, so the endpoint starts programmed rather
 * than pending.
 */
#define FERRITE_NAMESPACE_LEN 64
#define FERRITE_POD_NAME_LEN 256

struct namespace_key {
	char name[FERRITE_NAMESPACE_LEN];
};

struct pod_id {
	char namespace[FERRITE_NAMESPACE_LEN];
	char name[FERRITE_POD_NAME_LEN];
};
_Static_assert(sizeof(struct pod_id) == 320, "pod_id size");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct namespace_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_polns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FERRITE_MAX_ENDPOINTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct pod_id);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_podids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FERRITE_MAX_ENDPOINTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pod_id);
	__type(value, struct ep_policy);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_podpol SEC(".maps");

static __always_inline struct ep_policy *policy_of(__u32 ifindex)
{
	return bpf_map_lookup_elem(&ferrite_eppol, &ifindex);
}

/*
 * @p's flags plus EP_POLICY_PRESENT, or 0 for NULL. Tests on two
 * endpoints go through these scalars: clang would otherwise OR the two
 * pointers, which the verifier refuses.
 */
static __always_inline __u32 policy_bits(const struct ep_policy *p)
{
	return p ? (p->flags | EP_POLICY_PRESENT) : 0;
}

static __always_inline int is_host_address(const union v6addr *addr)
{
	return bpf_map_lookup_elem(&ferrite_hostips, addr) != NULL;
}

static __always_inline int is_service_address(const union v6addr *addr)
{
	struct podnet_key key = { .prefixlen = 128 };

	key.addr = *addr;
	return bpf_map_lookup_elem(&ferrite_svcnets, &key) != NULL;
}

/* Whether one of @rs's rules lets @peer talk to @port of @proto. */
static __always_inline int rules_allow(const struct rule_set *rs, __u8 proto,
				       __be16 port, const union v6addr *peer)
{
	struct polport_key pk = {
		.prefixlen = POLICY_KEY_HEAD_BITS + 32,
		.set = rs->id,
		.proto = proto,
		.port = port,
	};
	struct polpeer_key qk = {
		.prefixlen = POLICY_KEY_HEAD_BITS + 128,
		.set = rs->id,
	};
	__u32 words = rs->words;
	__u32 w;

	qk.addr = *peer;
	for (w = 0; w < FERRITE_POLICY_MAX_WORDS; w++) {
		__u64 *ports, *peers;

		if (w >= words)
			break;
		pk.word = w;
		qk.word = w;
		ports = bpf_map_lookup_elem(&ferrite_polport, &pk);
		if (!ports || !*ports)
			continue;
		peers = bpf_map_lookup_elem(&ferrite_polpeer, &qk);
		if (peers && (*ports & *peers))
			return 1;
	}
	return 0;
}

/*
 * Whether a packet of @key (what flow_of_frame() said: @kind) may go from
 * an endpoint whose policy is @src to one whose policy is @dst. NULL: that
 * end is not an endpoint of this node, or no policy selects it. Returns 0 to
 * allow, or DROP_POLICY_{PENDING,EGRESS,INGRESS}. @check_egress is 0 where
 * the source's egress rules are judged later (a packet to a Service
 * address, before the stack translates it).
 *
 * A flow allowed here is remembered (conntrack.h); its later packets and
 * its answers then pass on that alone, even after a policy change: rules
 * judge connections when they begin.
 */
static __always_inline int policy_verdict(const struct flow_key *key, int kind,
					  const struct ep_policy *src,
					  const struct ep_policy *dst,
					  int check_egress)
{
	__u32 egress = src && check_egress ? src->egress.id : 0;
	__u32 ingress = dst ? dst->ingress.id : 0;
	__u32 bits = policy_bits(src) | policy_bits(dst);
	struct ct_key ck;
	__u64 now;

	if (!bits)
		return 0;
	if (bits & EP_POLICY_F_PENDING)
		return DROP_POLICY_PENDING;
	/*
	 * An endpoint with a policy in either direction has every flow
	 * remembered, even one no rule judges here: the answers coming back
	 * meet its ingress rules, and must pass as answers.
	 */

	now = bpf_ktime_get_ns();
	ct_key_of(&ck, key);
	if (kind == FLOW_FRAGMENT)
		ct_fragments_key(&ck);
	if (ct_alive(&ck, now))
		return 0;
	/*
	 * Only a flow's own first packet opens it: not an ICMP error, a later
	 * fragment, or what the parser could not name.
	 */
	if (kind != FLOW_OK && kind != FLOW_FIRST_FRAGMENT)
		return egress ? DROP_POLICY_EGRESS : DROP_POLICY_INGRESS;
	if (egress && !rules_allow(&src->egress, key->proto, key->dport,
				   &key->daddr))
		return DROP_POLICY_EGRESS;
	if (ingress && !rules_allow(&dst->ingress, key->proto, key->dport,
				    &key->saddr))
		return DROP_POLICY_INGRESS;
	ct_create(&ck, now, 0);
	if (kind == FLOW_FIRST_FRAGMENT) {
		ct_fragments_key(&ck);
		ct_create(&ck, now, CT_F_FRAGMENTS);
	}
	return 0;
}

/*
 * Counts a policy drop on the endpoint it protects (the source for egress,
 * the destination otherwise) and returns TC_ACT_SHOT.
 */
static __always_inline int policy_drop(int reason, __u32 src_ifindex,
				       __u32 dst_ifindex,
				       const struct ep_policy *src)
{
	__u32 ifindex = dst_ifindex;

	if (reason == DROP_POLICY_EGRESS ||
	    (reason == DROP_POLICY_PENDING &&
	     (policy_bits(src) & EP_POLICY_F_PENDING)))
		ifindex = src_ifindex;
	count_drop(stats_of(ifindex), reason);
	return TC_ACT_SHOT;
}

#endif /* FERRITE_POLICY_H */
