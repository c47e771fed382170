// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Connection tracking: the flows a policy allowed, so that their later
 * packets and their answers pass without another rule lookup.
 *
 * One entry per flow, both directions: the key is the flow's tuple with its
 * two ends in a fixed order (the lower address first, ports with their
 * address), so a packet and its answer find the same entry. An ICMP error
 * is keyed by flow_of_frame() as its flow's answer, so it finds it too.
 *
 * The map is an LRU: when it is full the least recently seen flow goes,
 * and that flow's next packet is judged by the rules again, as a new flow
 * would be (allowed only if the rules allow it in the direction it now
 * travels). Nothing is allowed because an entry went missing.
 */
#ifndef FERRITE_CONNTRACK_H
#define FERRITE_CONNTRACK_H

#include "common.h"
#include "flow.h"

/* The default size; the loader sets the real one (conntrackSize). */
#define FERRITE_CT_DEFAULT_ENTRIES 262144

/* How long an idle flow stays allowed. */
#define CT_LIFETIME_TCP_NS (21600ULL * 1000000000ULL)
#define CT_LIFETIME_OTHER_NS (120ULL * 1000000000ULL)
/* Later fragments of an allowed datagram: the kernel's reassembly timeout. */
#define CT_LIFETIME_FRAGMENTS_NS (30ULL * 1000000000ULL)
/* A live entry's time stamp is rewritten at most this often. */
#define CT_REFRESH_NS 1000000000ULL

/* ct_entry.flags: the entry stands for the later fragments of datagrams. */
#define CT_F_FRAGMENTS 0x1

struct ct_key {
	union v6addr lo;	/* the lower address of the two */
	union v6addr hi;
	__be16 lo_port;		/* lo's port; ICMP echo: the identifier */
	__be16 hi_port;		/* hi's port; ICMP echo: 0 */
	__u8 proto;
	__u8 _pad[3];
};
_Static_assert(sizeof(struct ct_key) == 40, "ct_key size");

struct ct_entry {
	__u64 seen;		/* bpf_ktime_get_ns() of the last packet */
	__u32 flags;		/* CT_F_* */
	__u32 _pad;
};
_Static_assert(sizeof(struct ct_entry) == 16, "ct_entry size");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FERRITE_CT_DEFAULT_ENTRIES);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_ct SEC(".maps");

/* Whether address @a sorts before @b (any fixed order serves). */
static __always_inline int addr_before(const union v6addr *a,
				       const union v6addr *b)
{
	if (a->w[0] != b->w[0])
		return bpf_ntohl(a->w[0]) < bpf_ntohl(b->w[0]);
	if (a->w[1] != b->w[1])
		return bpf_ntohl(a->w[1]) < bpf_ntohl(b->w[1]);
	if (a->w[2] != b->w[2])
		return bpf_ntohl(a->w[2]) < bpf_ntohl(b->w[2]);
	return bpf_ntohl(a->w[3]) < bpf_ntohl(b->w[3]);
}

static __always_inline int addr_eq(const union v6addr *a,
				   const union v6addr *b)
{
	return ((a->w[0] ^ b->w[0]) | (a->w[1] ^ b->w[1]) |
		(a->w[2] ^ b->w[2]) | (a->w[3] ^ b->w[3])) == 0;
}

static __always_inline int is_icmp(__u8 proto)
{
	return proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
}

/* The entry of @key's flow, whichever way @key travels. */
static __always_inline void ct_key_of(struct ct_key *ck,
				      const struct flow_key *key)
{
	int swap = addr_before(&key->daddr, &key->saddr);

	if (addr_eq(&key->saddr, &key->daddr))
		swap = bpf_ntohs(key->dport) < bpf_ntohs(key->sport);
	ck->proto = key->proto;
	ck->_pad[0] = 0;
	ck->_pad[1] = 0;
	ck->_pad[2] = 0;
	if (swap) {
		ck->lo = key->daddr;
		ck->hi = key->saddr;
		ck->lo_port = key->dport;
		ck->hi_port = key->sport;
	} else {
		ck->lo = key->saddr;
		ck->hi = key->daddr;
		ck->lo_port = key->sport;
		ck->hi_port = key->dport;
	}
	/* ICMP echo keys the identifier as sport both ways: keep it first. */
	if (is_icmp(key->proto)) {
		ck->lo_port = key->sport;
		ck->hi_port = 0;
	}
}

static __always_inline __u64 ct_lifetime(const struct ct_key *ck,
					 const struct ct_entry *e)
{
	if (e->flags & CT_F_FRAGMENTS)
		return CT_LIFETIME_FRAGMENTS_NS;
	return ck->proto == IPPROTO_TCP ? CT_LIFETIME_TCP_NS :
					  CT_LIFETIME_OTHER_NS;
}

/* Whether @ck is a live flow; refreshes it if so. */
static __always_inline int ct_alive(const struct ct_key *ck, __u64 now)
{
	struct ct_entry *e = bpf_map_lookup_elem(&ferrite_ct, ck);

	if (!e)
		return 0;
	if (now - e->seen > ct_lifetime(ck, e))
		return 0;
	if (now - e->seen > CT_REFRESH_NS)
		e->seen = now;
	return 1;
}

static __always_inline void ct_create(const struct ct_key *ck, __u64 now,
				      __u32 flags)
{
	struct ct_entry e = { .seen = now, .flags = flags };

	bpf_map_update_elem(&ferrite_ct, ck, &e, BPF_ANY);
}

/*
 * The entry that lets the later fragments of @ck's datagrams through:
 * the same ends without ports, as flow_of_frame() keys such a fragment.
 */
static __always_inline void ct_fragments_key(struct ct_key *ck)
{
	ck->lo_port = 0;
	ck->hi_port = 0;
}

#endif /* FERRITE_CONNTRACK_H */
