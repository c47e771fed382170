// SPDX-License-Identifier: Apache-2.0
// scripts/veth-contention's timer (built by it): how long one RTM_NEWLINK
// takes that either makes a veth pair with its peer in a pod's network
// namespace (what ferrite's ADD does), or moves a pre-made peer into the
// pod's namespace renaming it eth0 (what a pool of pairs made ahead by
// the agent would do), WORKERS processes at a time.
// usage: veth-contention create|pool N WORKERS PREFIX
//   the node's namespace is /run/netns/PREFIX-node, the pods' PREFIX-p<i>;
//   in pool mode the pairs xh<i>/xp<i> already exist in the node's.
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <time.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/if_link.h>
#include <linux/veth.h>
#include <net/if.h>

struct req { struct nlmsghdr n; struct ifinfomsg i; char buf[1024]; };
static void addattr(struct nlmsghdr *n, int type, const void *d, int len) {
  struct rtattr *rta = (void *)((char *)n + NLMSG_ALIGN(n->nlmsg_len));
  rta->rta_type = type; rta->rta_len = RTA_LENGTH(len);
  if (len) memcpy(RTA_DATA(rta), d, len);
  n->nlmsg_len = NLMSG_ALIGN(n->nlmsg_len) + RTA_ALIGN(rta->rta_len);
}
static struct rtattr *nest(struct nlmsghdr *n, int type) {
  struct rtattr *r = (void *)((char *)n + NLMSG_ALIGN(n->nlmsg_len));
  addattr(n, type, NULL, 0); return r;
}
static void endnest(struct nlmsghdr *n, struct rtattr *r) { r->rta_len = (char *)n + n->nlmsg_len - (char *)r; }
static int talk(int fd, struct nlmsghdr *n) {
  if (send(fd, n, n->nlmsg_len, 0) < 0) return -1;
  char buf[4096]; int len = recv(fd, buf, sizeof buf, 0);
  struct nlmsghdr *h = (void *)buf;
  if (len > 0 && h->nlmsg_type == NLMSG_ERROR) { int e = ((struct nlmsgerr *)NLMSG_DATA(h))->error; if (e) { fprintf(stderr, "err %s\n", strerror(-e)); return e; } }
  return 0;
}
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e3 + t.tv_nsec / 1e6; }
static int cmp(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return x < y ? -1 : x > y; }

int main(int argc, char **argv) {
  if (argc != 5) { fprintf(stderr, "usage: %s create|pool N WORKERS PREFIX\n", argv[0]); return 2; }
  const char *mode = argv[1], *prefix = argv[4]; int n = atoi(argv[2]), w = atoi(argv[3]);
  char nodepath[128]; snprintf(nodepath, sizeof nodepath, "/run/netns/%s-node", prefix);
  int node = open(nodepath, O_RDONLY); if (node < 0 || setns(node, CLONE_NEWNET)) { perror("node"); return 1; }
  int pipefd[2]; if (pipe(pipefd)) { perror("pipe"); return 1; }
  for (int k = 0; k < w; k++) if (fork() == 0) {
    int fd = socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
    for (int i = k; i < n; i += w) {
      char path[128]; snprintf(path, sizeof path, "/run/netns/%s-p%d", prefix, i);
      int ns = open(path, O_RDONLY);
      struct req r = {0}; char host[16], peer[16]; snprintf(host, 16, "xh%d", i); snprintf(peer, 16, "xp%d", i);
      r.n.nlmsg_len = NLMSG_LENGTH(sizeof r.i); r.n.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK; r.i.ifi_family = AF_UNSPEC;
      if (!strcmp(mode, "create")) {
        r.n.nlmsg_type = RTM_NEWLINK; r.n.nlmsg_flags |= NLM_F_CREATE | NLM_F_EXCL;
        addattr(&r.n, IFLA_IFNAME, host, strlen(host) + 1);
        struct rtattr *li = nest(&r.n, IFLA_LINKINFO); addattr(&r.n, IFLA_INFO_KIND, "veth", 4);
        struct rtattr *d = nest(&r.n, IFLA_INFO_DATA); struct rtattr *p = nest(&r.n, VETH_INFO_PEER);
        struct ifinfomsg pi = {0}; memcpy((char *)&r.n + r.n.nlmsg_len, &pi, sizeof pi); r.n.nlmsg_len += sizeof pi;
        addattr(&r.n, IFLA_IFNAME, "eth0", 5); addattr(&r.n, IFLA_NET_NS_FD, &ns, 4);
        endnest(&r.n, p); endnest(&r.n, d); endnest(&r.n, li);
      } else { // pool: xp<i> exists in node; move it into the pod as eth0
        r.n.nlmsg_type = RTM_NEWLINK; r.i.ifi_index = if_nametoindex(peer);
        addattr(&r.n, IFLA_NET_NS_FD, &ns, 4); addattr(&r.n, IFLA_IFNAME, "eth0", 5);
      }
      double t0 = now(); int e = talk(fd, &r.n); double t = now() - t0;
      if (e) t = -1;
      if (write(pipefd[1], &t, sizeof t) != sizeof t) _exit(1);
      close(ns);
    }
    _exit(0);
  }
  close(pipefd[1]);
  double *ts = malloc(n * sizeof *ts); int m = 0, bad = 0; double t;
  while (read(pipefd[0], &t, sizeof t) == sizeof t) { if (t < 0) bad++; else ts[m++] = t; }
  while (wait(NULL) > 0) {}
  if (!m) { printf("%s: every request failed (%d)\n", mode, bad); return 1; }
  qsort(ts, m, sizeof *ts, cmp);
  printf("%s n=%d workers=%d errors=%d p50 %.2f p95 %.2f max %.2f ms\n", mode, m, w, bad, ts[m / 2], ts[m * 95 / 100], ts[m - 1]);
  return 0;
}
