// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Per-endpoint counters. User space creates the (zeroed) entry when it adds
 * the endpoint; programs only update entries that exist, so an interface
 * ferrite does not know is never counted.
 */
#ifndef FERRITE_STATS_H
#define FERRITE_STATS_H

#include "common.h"

static __always_inline struct endpoint_stats *stats_of(__u32 ifindex)
{
	return bpf_map_lookup_elem(&ferrite_stats, &ifindex);
}

static __always_inline void count_drop(struct endpoint_stats *st, int reason)
{
	__u32 slot = DROP_SLOT(reason);

	if (st && slot < DROP_REASON_SLOTS)
		st->drops[slot]++;
}

#endif /* FERRITE_STATS_H */
