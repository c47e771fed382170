// SPDX-License-Identifier: Apache-2.0
/*
 * probe: the UDP and TCP tools of scripts/cluster's test image (busybox's
 * nc speaks no UDP and stops at nothing in particular). Built static into
 * the image as /bin/probe.
 *
 *   probe udp-serve PORT            answer each datagram with "<hostname> <sender address>"
 *   probe udp-ask ADDR PORT N       N datagrams, one at a time, 1 s for each answer;
 *                                   prints "<answered>/<N> <last answer>", fails unless all came
 *   probe echo-serve PORT           TCP: echo each connection back (a process per connection)
 *   probe sink-serve PORT           TCP: read each connection to its end
 *   probe send ADDR PORT BYTES      TCP: send BYTES, wait for the close; prints bytes, seconds, Gbit/s
 *   probe udp-stream ADDR PORT STOPFILE  one connected UDP socket, a datagram every 20 ms
 *                                   (100 ms for each answer) until STOPFILE exists; prints
 *                                   "<unix ms> <first word of the answer>" whenever that word
 *                                   changes, then "asked <n>, answered <m>"
 *   probe rr-serve PORT             TCP: one process, every connection echoed (poll), for rr and conns
 *   probe rr ADDR PORT SECONDS      TCP: one connection, one byte each way at a time; prints
 *                                   "<round trips> <p50 us> <p99 us>"
 *   probe conns ADDR PORT SECONDS   TCP: connect, one byte each way, close, again; prints
 *                                   "<connections> <per second> <failed>"
 *   probe stream ADDR PORT STOPFILE TCP: one connection; a line every 100 ms, each echo awaited,
 *                                   until STOPFILE exists. Prints "connected", then at the end
 *                                   "kept: <lines> lines, longest gap <ms> ms" or
 *                                   "broken after <lines> lines: <why>" (and fails)
 *
 * Servers listen on a dual-stack socket; addresses print without ::ffff:.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "probe: %s: %s\n", what, strerror(errno));
	exit(2);
}

static int listener(int type, const char *port)
{
	struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(atoi(port))};
	int s = socket(AF_INET6, type, 0), off = 0, on = 1;

	if (s < 0)
		die("socket");
	setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off));
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
	if (bind(s, (struct sockaddr *)&a, sizeof(a)) < 0)
		die("bind");
	if (type == SOCK_STREAM && listen(s, 64) < 0)
		die("listen");
	return s;
}

static int connected(int type, const char *addr, const char *port)
{
	struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons(atoi(port))};
	struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons(atoi(port))};
	struct sockaddr *sa = (struct sockaddr *)&a4;
	socklen_t len = sizeof(a4);
	int s;

	if (inet_pton(AF_INET, addr, &a4.sin_addr) != 1) {
		if (inet_pton(AF_INET6, addr, &a6.sin6_addr) != 1) {
			fprintf(stderr, "probe: bad address %s\n", addr);
			exit(2);
		}
		sa = (struct sockaddr *)&a6;
		len = sizeof(a6);
	}
	s = socket(sa->sa_family, type, 0);
	if (s < 0)
		die("socket");
	if (connect(s, sa, len) < 0)
		die("connect");
	return s;
}

static const char *ntop(struct sockaddr_in6 *a, char *buf)
{
	inet_ntop(AF_INET6, &a->sin6_addr, buf, INET6_ADDRSTRLEN);
	return strncmp(buf, "::ffff:", 7) == 0 ? buf + 7 : buf;
}

static _Noreturn void udp_serve(const char *port)
{
	int s = listener(SOCK_DGRAM, port);
	char host[256] = "?", buf[2048], reply[512], ip[INET6_ADDRSTRLEN];
	struct sockaddr_in6 from;
	socklen_t len;

	gethostname(host, sizeof(host) - 1);
	for (;;) {
		len = sizeof(from);
		if (recvfrom(s, buf, sizeof(buf), 0, (struct sockaddr *)&from, &len) < 0)
			continue;
		int n = snprintf(reply, sizeof(reply), "%s %s\n", host, ntop(&from, ip));
		sendto(s, reply, n, 0, (struct sockaddr *)&from, len);
	}
}

static int udp_ask(const char *addr, const char *port, int count)
{
	int s = connected(SOCK_DGRAM, addr, port), answered = 0;
	char buf[512] = "", last[512] = "(none)";

	for (int i = 0; i < count; i++) {
		int n = snprintf(buf, sizeof(buf), "ask %d", i);
		struct pollfd p = {.fd = s, .events = POLLIN};

		send(s, buf, n, 0);
		if (poll(&p, 1, 1000) == 1 && (n = recv(s, buf, sizeof(buf) - 1, 0)) > 0) {
			buf[n] = 0;
			buf[strcspn(buf, "\n")] = 0;
			snprintf(last, sizeof(last), "%s", buf);
			answered++;
		}
	}
	printf("%d/%d %s\n", answered, count, last);
	return answered == count ? 0 : 1;
}

static int udp_stream(const char *addr, const char *port, const char *stop)
{
	int s = connected(SOCK_DGRAM, addr, port), asked = 0, answered = 0;
	char buf[512], who[512] = "";

	while (access(stop, F_OK) != 0) {
		struct pollfd p = {.fd = s, .events = POLLIN};
		struct timespec ts;
		int n;

		send(s, "ask", 3, 0);
		asked++;
		if (poll(&p, 1, 100) == 1 && (n = recv(s, buf, sizeof(buf) - 1, 0)) > 0) {
			buf[n] = 0;
			buf[strcspn(buf, " \n")] = 0;
			answered++;
			if (strcmp(buf, who)) {
				clock_gettime(CLOCK_REALTIME, &ts);
				printf("%lld %s\n", (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000, buf);
				snprintf(who, sizeof(who), "%s", buf);
			}
		}
		usleep(20000);
	}
	printf("asked %d, answered %d\n", asked, answered);
	return 0;
}

#define RR_MAX_FDS 1024

static _Noreturn void rr_serve(const char *port)
{
	static struct pollfd fds[RR_MAX_FDS];
	int s = listener(SOCK_STREAM, port), n = 1, on = 1;
	char buf[4096];

	fds[0].fd = s;
	fds[0].events = POLLIN;
	for (;;) {
		if (poll(fds, n, -1) < 0)
			continue;
		if ((fds[0].revents & POLLIN) && n < RR_MAX_FDS) {
			int c = accept(s, NULL, NULL);

			if (c >= 0) {
				setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
				fds[n].fd = c;
				fds[n].events = POLLIN;
				fds[n].revents = 0;
				n++;
			}
		}
		for (int i = 1; i < n; i++) {
			ssize_t r;

			if (!fds[i].revents)
				continue;
			r = read(fds[i].fd, buf, sizeof(buf));
			if (r <= 0 || write(fds[i].fd, buf, r) != r) {
				close(fds[i].fd);
				fds[i--] = fds[--n];
			}
		}
	}
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static int rr(const char *addr, const char *port, double seconds)
{
	int s = connected(SOCK_STREAM, addr, port), on = 1, cap = 1 << 20, n = 0;
	double *lat = malloc(sizeof(double) * cap), t0 = now();
	char b = 'x';

	setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
	while (now() - t0 < seconds && n < cap) {
		double t = now();

		if (write(s, &b, 1) != 1 || read(s, &b, 1) != 1)
			die("rr");
		lat[n++] = (now() - t) * 1e6;
	}
	qsort(lat, n, sizeof(double), cmp_double);
	printf("%d %.1f %.1f\n", n, lat[n / 2], lat[(int)(n * 0.99)]);
	return 0;
}

static int conns(const char *addr, const char *port, double seconds)
{
	struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons(atoi(port))};
	struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons(atoi(port))};
	struct sockaddr *sa = (struct sockaddr *)&a4;
	socklen_t len = sizeof(a4);
	int n = 0, failed = 0;
	double t0 = now(), took;

	if (inet_pton(AF_INET, addr, &a4.sin_addr) != 1) {
		if (inet_pton(AF_INET6, addr, &a6.sin6_addr) != 1) {
			fprintf(stderr, "probe: bad address %s\n", addr);
			exit(2);
		}
		sa = (struct sockaddr *)&a6;
		len = sizeof(a6);
	}
	while ((took = now() - t0) < seconds) {
		int s = socket(sa->sa_family, SOCK_STREAM, 0), on = 1;
		struct linger lg = {.l_onoff = 1, .l_linger = 0};
		struct timeval tv = {.tv_sec = 1};
		char b = 'x';

		if (s < 0)
			die("socket");
		setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
		/* A connection that does not complete in 1 s counts as failed. */
		setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
		setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
		/* RST at close: no TIME_WAIT to run the client's ports out. */
		setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		if (connect(s, sa, len) < 0 || write(s, &b, 1) != 1 || read(s, &b, 1) != 1)
			failed++;
		else
			n++;
		close(s);
	}
	printf("%d %.0f %d\n", n, n / took, failed);
	return 0;
}

static _Noreturn void tcp_serve(const char *port, int echo)
{
	int s = listener(SOCK_STREAM, port);
	char buf[65536];

	signal(SIGCHLD, SIG_IGN);
	for (;;) {
		int c = accept(s, NULL, NULL);
		ssize_t n;

		if (c < 0)
			continue;
		if (fork() == 0) {
			close(s);
			while ((n = read(c, buf, sizeof(buf))) > 0)
				if (echo && write(c, buf, n) != n)
					break;
			_exit(0);
		}
		close(c);
	}
}

static int send_bytes(const char *addr, const char *port, long long total)
{
	static char buf[1 << 16];
	int s = connected(SOCK_STREAM, addr, port);
	long long sent = 0;
	double t = now();

	while (sent < total) {
		long long left = total - sent;
		ssize_t n = write(s, buf, left < (long long)sizeof(buf) ? (size_t)left : sizeof(buf));
		if (n <= 0)
			die("write");
		sent += n;
	}
	shutdown(s, SHUT_WR);
	while (read(s, buf, sizeof(buf)) > 0) {
	}
	t = now() - t;
	printf("%lld bytes in %.3f s, %.2f Gbit/s\n", sent, t, sent * 8 / t / 1e9);
	return 0;
}

static int stream(const char *addr, const char *port, const char *stop)
{
	int s = connected(SOCK_STREAM, addr, port), lines = 0;
	double last, gap = 0;
	char line[64], buf[256];

	printf("connected\n");
	fflush(stdout);
	last = now();
	while (access(stop, F_OK) != 0) {
		double sent = now();
		int n = snprintf(line, sizeof(line), "line %d\n", lines), got = 0;

		if (write(s, line, n) != n) {
			printf("broken after %d lines: write: %s\n", lines, strerror(errno));
			return 1;
		}
		while (got < n) {  /* the whole echo, however it arrives */
			struct pollfd p = {.fd = s, .events = POLLIN};
			ssize_t r;

			if (poll(&p, 1, 30000) != 1) {
				printf("broken after %d lines: no echo for 30 s\n", lines);
				return 1;
			}
			r = read(s, buf, n - got);
			if (r <= 0) {
				printf("broken after %d lines: %s\n", lines, r == 0 ? "closed" : strerror(errno));
				return 1;
			}
			got += r;
		}
		double t = now();
		if (t - last > gap)
			gap = t - last;
		last = t;
		lines++;
		double wait = 0.1 - (t - sent);
		if (wait > 0)
			usleep((useconds_t)(wait * 1e6));
	}
	printf("kept: %d lines, longest gap %.0f ms\n", lines, gap * 1000);
	return 0;
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : "";

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(cmd, "udp-serve") && argc == 3)
		udp_serve(argv[2]);
	if (!strcmp(cmd, "udp-ask") && argc == 5)
		return udp_ask(argv[2], argv[3], atoi(argv[4]));
	if (!strcmp(cmd, "rr-serve") && argc == 3)
		rr_serve(argv[2]);
	if (!strcmp(cmd, "rr") && argc == 5)
		return rr(argv[2], argv[3], atof(argv[4]));
	if (!strcmp(cmd, "conns") && argc == 5)
		return conns(argv[2], argv[3], atof(argv[4]));
	if (!strcmp(cmd, "udp-stream") && argc == 5)
		return udp_stream(argv[2], argv[3], argv[4]);
	if (!strcmp(cmd, "echo-serve") && argc == 3)
		tcp_serve(argv[2], 1);
	if (!strcmp(cmd, "sink-serve") && argc == 3)
		tcp_serve(argv[2], 0);
	if (!strcmp(cmd, "send") && argc == 5)
		return send_bytes(argv[2], argv[3], atoll(argv[4]));
	if (!strcmp(cmd, "stream") && argc == 5)
		return stream(argv[2], argv[3], argv[4]);
	fprintf(stderr, "usage: probe udp-serve|udp-ask|udp-stream|echo-serve|sink-serve|rr-serve|rr|conns|send|stream ...\n");
	return 2;
}
