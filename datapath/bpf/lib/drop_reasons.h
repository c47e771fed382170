// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Every reason ferrite drops a packet, as a negative code.
 *
 * Codes start at -130 so they never overlap a TC_ACT_* verdict (TC_ACT_UNSPEC
 * is -1, the rest are small positive numbers): internal helpers return either
 * a verdict or one of these, and the entry program turns a reason into
 * TC_ACT_SHOT plus a per-reason counter in ferrite_stats.
 *
 * One "#define DROP_<NAME> <code>" per line: the Rust DropReason enum mirrors
 * this list and a test parses this file to check that they agree.
 */
#ifndef FERRITE_DROP_REASONS_H
#define FERRITE_DROP_REASONS_H

#define DROP_SPOOFED_IP -130
#define DROP_SPOOFED_MAC -131
#define DROP_ARP_SPOOF -132
#define DROP_UNSUPPORTED_L3 -133
#define DROP_MALFORMED -134
#define DROP_NO_ENDPOINT -135
#define DROP_CSUM_ERR -136
#define DROP_UPLINK_SPOOF -137

/* First code, and how many counter slots ferrite_stats reserves for drops. */
#define DROP_REASON_FIRST DROP_SPOOFED_IP
#define DROP_REASON_SLOTS 16

/* Slot of a reason in struct endpoint_stats.drops[]. */
#define DROP_SLOT(reason) ((__u32)(DROP_REASON_FIRST - (reason)))

#endif /* FERRITE_DROP_REASONS_H */
