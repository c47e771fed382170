// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Every reason ferrite drops a packet, as a negative code.
 *
 * Codes start at -130 so they never overlap a TC_ACT_* verdict (TC_ACT_UNSPEC
 * is -1, the rest are small positive numbers): internal helpers return either
 * a verdict or one of these, and the entry program turns a reason into
 * TC_ACT_SHOT plus a per-reason counter in ferrite_stats.
 *
 * The Rust DropReason enum is generated from this file (datapath/build.rs):
 * one "#define DROP_<NAME> <code>" per line, codes consecutive from
 * DROP_REASON_FIRST down, each after a one-line comment that becomes the
 * variant's documentation.
 */
#ifndef FERRITE_DROP_REASONS_H
#define FERRITE_DROP_REASONS_H

/* The source IP is not an endpoint behind this veth. */
#define DROP_SPOOFED_IP -130
/* The source MAC is not the pod's. */
#define DROP_SPOOFED_MAC -131
/* An ARP sender (IP or MAC) is not the pod's own. */
#define DROP_ARP_SPOOF -132
/* Neither ARP, IPv4 nor IPv6. */
#define DROP_UNSUPPORTED_L3 -133
/* A header is truncated or invalid. */
#define DROP_MALFORMED -134
/* Link-local traffic from a veth with no endpoint. */
#define DROP_NO_ENDPOINT -135
/* `bpf_l3_csum_replace` failed after the TTL was decremented. */
#define DROP_CSUM_ERR -136
/* A packet from the uplink claims a pod of this node as its source. */
#define DROP_UPLINK_SPOOF -137
/* The destination's ingress rules (NetworkPolicy) do not allow the flow. */
#define DROP_POLICY_INGRESS -138
/* The source's egress rules (NetworkPolicy) do not allow the flow. */
#define DROP_POLICY_EGRESS -139
/* The endpoint's policy is not programmed yet (it starts closed). */
#define DROP_POLICY_PENDING -140
/* A Service's backends changed while its packet chose one: none usable. */
#define DROP_SVC_NO_BACKEND -141
/* A Service without backends: its "unreachable" answer could not be built. */
#define DROP_SVC_REJECT -142

/* First code, and how many counter slots ferrite_stats reserves for drops. */
#define DROP_REASON_FIRST DROP_SPOOFED_IP
#define DROP_REASON_SLOTS 16

/* Slot of a reason in struct endpoint_stats.drops[]. */
#define DROP_SLOT(reason) ((__u32)(DROP_REASON_FIRST - (reason)))

#endif /* FERRITE_DROP_REASONS_H */
