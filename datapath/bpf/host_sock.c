// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * host_sock: the node's own sockets (and hostNetwork pods') reaching
 * hostPorts, and Services when kube-proxy does not run. Attached by the
 * node agent at the root cgroup (cgroup/connect4, connect6, sendmsg4,
 * sendmsg6, recvmsg4, recvmsg6, getpeername4, getpeername6), each program
 * acts only for sockets of the host's network namespace (ferrite_hostns
 * holds its cookie): a pod's sockets keep the Service address, and
 * from_pod translates their packets as for any pod, so a sidecar proxy in
 * the pod still sees which Service its application dialled.
 *
 * connect() (TCP, connected UDP) and sendmsg() (unconnected UDP) to a
 * frontend are sent to one of its backends instead, chosen as from_pod
 * chooses (affinity, else at random): a hostPort on one of the node's
 * addresses or loopback when the node serves them, a NodePort on the
 * node's addresses and a Service when the agent programs them (kube-proxy
 * does not run). The socket and the backend are remembered in
 * ferrite_sockrev so that getpeername() and recvmsg() give the
 * application the frontend's address back. A frontend without backends
 * refuses the connect() or sendmsg() with ECONNREFUSED, as
 * kube-proxy's REJECT does.
 */
#include <linux/in.h>
#include <linux/in6.h>

#include "lib/common.h"
#include "lib/policy.h"
#include "lib/service.h"

#define ECONNREFUSED 111

/* SOCK_STREAM and SOCK_DGRAM from linux/net.h (not a UAPI header). */
#define FERRITE_SOCK_STREAM 1
#define FERRITE_SOCK_DGRAM 2

/* ferrite_hostns[0]: the host network namespace's cookie, 0 when unset. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_hostns SEC(".maps");

/* ferrite_sockrev key: a socket and the backend it was sent to. */
struct sock_rev_key {
	__u64 cookie;
	union v6addr addr;
	__be16 port;
	__u16 _pad;
	__u32 _pad2;
};
_Static_assert(sizeof(struct sock_rev_key) == 32, "sock_rev_key size");

/* ferrite_sockrev value: the frontend the application addressed. */
struct sock_rev {
	union v6addr vip;
	__be16 vport;
	__u16 _pad;
	__u32 frontend;
};
_Static_assert(sizeof(struct sock_rev) == 24, "sock_rev size");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FERRITE_SVC_CT_DEFAULT_ENTRIES);
	__type(key, struct sock_rev_key);
	__type(value, struct sock_rev);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferrite_sockrev SEC(".maps");

static __always_inline int host_socket(struct bpf_sock_addr *ctx)
{
	__u32 zero = 0;
	__u64 *cookie = bpf_map_lookup_elem(&ferrite_hostns, &zero);

	return cookie && *cookie && *cookie == bpf_get_netns_cookie(ctx);
}

static __always_inline __u8 sock_proto(struct bpf_sock_addr *ctx)
{
	if (ctx->type == FERRITE_SOCK_STREAM && ctx->protocol == IPPROTO_TCP)
		return IPPROTO_TCP;
	if (ctx->type == FERRITE_SOCK_DGRAM && ctx->protocol == IPPROTO_UDP)
		return IPPROTO_UDP;
	return 0;
}

/* The address in @ctx's user fields, v4-mapped for IPv4. */
static __always_inline void user_addr(struct bpf_sock_addr *ctx, int v6,
				      union v6addr *a)
{
	if (v6) {
		a->w[0] = ctx->user_ip6[0];
		a->w[1] = ctx->user_ip6[1];
		a->w[2] = ctx->user_ip6[2];
		a->w[3] = ctx->user_ip6[3];
	} else {
		v4_mapped(a, ctx->user_ip4);
	}
}

static __always_inline void set_user_addr(struct bpf_sock_addr *ctx, int v6,
					  const union v6addr *a, __be16 port)
{
	if (v6) {
		ctx->user_ip6[0] = a->w[0];
		ctx->user_ip6[1] = a->w[1];
		ctx->user_ip6[2] = a->w[2];
		ctx->user_ip6[3] = a->w[3];
	} else {
		ctx->user_ip4 = a->w[3];
	}
	ctx->user_port = port;
}

static __always_inline int is_loopback(const union v6addr *a, int v6)
{
	if (v6)
		return !a->w[0] && !a->w[1] && !a->w[2] &&
		       a->w[3] == bpf_htonl(1);
	return (bpf_ntohl(a->w[3]) >> 24) == 127;
}

/*
 * The hostPort (or, without kube-proxy, the NodePort) the address and
 * port in @sk stand for, if it is one of the node's own addresses or
 * loopback: a hostPort of that very address (127.0.0.1 included), then
 * one of every address, then a NodePort; @lookup says which the node
 * serves (SVC_LOOKUP_*). @sk's address may change.
 */
static __always_inline struct svc_value *node_frontend(struct svc_key *sk,
						       int v6, int lookup)
{
	struct svc_value *svc = NULL;
	union v6addr addr = sk->addr;

	if (!lookup)
		return NULL;
	if (!is_loopback(&addr, v6) && !is_host_address(&addr))
		return NULL;
	if (lookup & SVC_LOOKUP_HOSTPORT) {
		sk->scope = SVC_SCOPE_HOSTPORT;
		svc = bpf_map_lookup_elem(&ferrite_svc, sk);
		if (!svc) {
			unspecified_like(&sk->addr, &addr);
			svc = bpf_map_lookup_elem(&ferrite_svc, sk);
		}
	}
	/* NodePorts as kube-proxy serves them: not on loopback. */
	if (!svc && (lookup & SVC_LOOKUP_NODEPORT) && !is_loopback(&addr, v6)) {
		sk->scope = SVC_SCOPE_SERVICE;
		unspecified_like(&sk->addr, &addr);
		svc = bpf_map_lookup_elem(&ferrite_svc, sk);
	}
	return svc;
}

/*
 * connect() or sendmsg() to @ctx's address: if it is a frontend (or a
 * NodePort on one of the node's addresses), points the socket at a
 * backend. Returns what the hook returns: 1 to go on, 0 to refuse.
 */
static __always_inline int sock_forward(struct bpf_sock_addr *ctx, int v6)
{
	struct sock_rev_key rk = {};
	struct sock_rev rev = {};
	union v6addr host = {};
	struct svc_stats *stats;
	struct svc_key sk = {};
	struct svc_value *svc;
	struct backend *be;
	int lookup;
	__u32 id;
	__u8 proto;

	if (!host_socket(ctx))
		return 1;
	proto = sock_proto(ctx);
	if (!proto)
		return 1;
	user_addr(ctx, v6, &sk.addr);
	sk.port = (__be16)ctx->user_port;
	sk.proto = proto;
	rev.vip = sk.addr;
	rev.vport = sk.port;
	lookup = node_frontends();
	svc = node_frontend(&sk, v6, lookup);
	/* Services only where kube-proxy does not serve them. */
	if (!svc && (lookup & SVC_LOOKUP_NODEPORT)) {
		sk.addr = rev.vip;
		sk.scope = SVC_SCOPE_SERVICE;
		svc = bpf_map_lookup_elem(&ferrite_svc, &sk);
	}
	if (!svc)
		return 1;
	stats = svc_stats_of(svc->id);
	/* The node's sockets are one client, as they are one source address
	 * to kube-proxy: the unspecified address stands for it. */
	id = svc_pick(svc, &host, proto, bpf_ktime_get_ns());
	be = id ? usable_backend(id, svc->id, proto, 0) : NULL;
	if (!be) {
		if (stats)
			stats->rejected++;
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}
	if (stats)
		stats->flows++;
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = be->addr;
	rk.port = be->port;
	rev.frontend = svc->id;
	bpf_map_update_elem(&ferrite_sockrev, &rk, &rev, BPF_ANY);
	set_user_addr(ctx, v6, &be->addr, be->port);
	return 1;
}

/*
 * getpeername() or recvmsg() of a socket sock_forward sent to a backend:
 * the frontend's address instead of the backend's. Always returns 1.
 */
static __always_inline int sock_reverse(struct bpf_sock_addr *ctx, int v6)
{
	struct sock_rev_key rk = {};
	struct sock_rev *rev;

	if (!host_socket(ctx))
		return 1;
	rk.cookie = bpf_get_socket_cookie(ctx);
	user_addr(ctx, v6, &rk.addr);
	rk.port = (__be16)ctx->user_port;
	rev = bpf_map_lookup_elem(&ferrite_sockrev, &rk);
	if (rev)
		set_user_addr(ctx, v6, &rev->vip, rev->vport);
	return 1;
}

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	return sock_forward(ctx, 0);
}

SEC("cgroup/connect6")
int sock_connect6(struct bpf_sock_addr *ctx)
{
	return sock_forward(ctx, 1);
}

SEC("cgroup/sendmsg4")
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock_forward(ctx, 0);
}

SEC("cgroup/sendmsg6")
int sock_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock_forward(ctx, 1);
}

SEC("cgroup/recvmsg4")
int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock_reverse(ctx, 0);
}

SEC("cgroup/recvmsg6")
int sock_recvmsg6(struct bpf_sock_addr *ctx)
{
	return sock_reverse(ctx, 1);
}

SEC("cgroup/getpeername4")
int sock_getpeer4(struct bpf_sock_addr *ctx)
{
	return sock_reverse(ctx, 0);
}

SEC("cgroup/getpeername6")
int sock_getpeer6(struct bpf_sock_addr *ctx)
{
	return sock_reverse(ctx, 1);
}

char _license[] SEC("license") = "Dual BSD/GPL";
