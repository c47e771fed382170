// SPDX-License-Identifier: Apache-2.0
/*
 * pingpong: TCP request/response latency, the exchange that
 * `sockperf ping-pong --tcp -m SIZE` makes, for the IPv6 rows of
 * scripts/bench: sockperf 3.7 (Debian 12) parses IPv4 addresses only.
 *
 *   pingpong server ADDR PORT                  echo until killed
 *   pingpong client ADDR PORT SECONDS [SIZE]   SIZE defaults to 64
 *
 * The client sends one SIZE-byte message at a time and waits for the whole
 * echo, TCP_NODELAY on both ends, for SECONDS seconds. As sockperf does, it
 * leaves out the first 400 ms (warm-up) and the last 50 ms, counts half of
 * each round trip as one observation, and prints sockperf's summary lines
 * ("---> percentile 50.000 = ..."), in microseconds, so one parser reads
 * both. Built by scripts/bench: cc -O2 -o pingpong pingpong.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define WARMUP_NS 400000000LL
#define COOLDOWN_NS 50000000LL
#define MAX_SIZE 65536

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "pingpong: %s: %s\n", what, strerror(errno));
	exit(1);
}

static struct addrinfo *resolve(const char *addr, const char *port, int passive)
{
	struct addrinfo hints = {
		.ai_family = AF_UNSPEC,
		.ai_socktype = SOCK_STREAM,
		.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | (passive ? AI_PASSIVE : 0),
	};
	struct addrinfo *ai;
	int err = getaddrinfo(addr, port, &hints, &ai);

	if (err) {
		fprintf(stderr, "pingpong: %s port %s: %s\n", addr, port, gai_strerror(err));
		exit(2);
	}
	return ai;
}

static void nodelay(int fd)
{
	int one = 1;

	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)))
		die("TCP_NODELAY");
}

static void __attribute__((noreturn)) serve(const char *addr, const char *port)
{
	struct addrinfo *ai = resolve(addr, port, 1);
	char buf[MAX_SIZE];
	int one = 1;
	int lfd;

	lfd = socket(ai->ai_family, SOCK_STREAM, 0);
	if (lfd < 0)
		die("socket");
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, ai->ai_addr, ai->ai_addrlen) || listen(lfd, 4))
		die("bind/listen");
	freeaddrinfo(ai);
	for (;;) {
		int fd = accept(lfd, NULL, NULL);
		ssize_t n;

		if (fd < 0)
			die("accept");
		nodelay(fd);
		while ((n = read(fd, buf, sizeof(buf))) > 0) {
			ssize_t off = 0;

			while (off < n) {
				ssize_t w = write(fd, buf + off, n - off);

				if (w <= 0)
					break;
				off += w;
			}
		}
		close(fd);
	}
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/* The nearest-rank percentile of sorted samples. */
static double pct(const double *s, size_t n, double p)
{
	size_t k = (size_t)ceil(p / 100.0 * n);

	return s[k ? k - 1 : 0];
}

static int client(const char *addr, const char *port, double seconds, size_t size)
{
	struct addrinfo *ai = resolve(addr, port, 0);
	char msg[MAX_SIZE], back[MAX_SIZE];
	size_t n = 0, cap = 1 << 16;
	double *obs = malloc(cap * sizeof(*obs)), sum = 0;
	long long start, end;
	int fd = -1, tries;

	if (!obs)
		die("malloc");
	/* The server may still be starting: retry a refused connect for 2 s. */
	for (tries = 0; tries < 200; tries++) {
		fd = socket(ai->ai_family, SOCK_STREAM, 0);
		if (fd < 0)
			die("socket");
		if (!connect(fd, ai->ai_addr, ai->ai_addrlen))
			break;
		if (errno != ECONNREFUSED)
			die("connect");
		close(fd);
		fd = -1;
		usleep(10000);
	}
	if (fd < 0)
		die("connect");
	freeaddrinfo(ai);
	nodelay(fd);
	memset(msg, 0x5a, size);

	start = now_ns();
	end = start + (long long)(seconds * 1e9);
	for (;;) {
		long long t0 = now_ns(), t1;
		size_t got = 0;

		if (t0 >= end)
			break;
		if (write(fd, msg, size) != (ssize_t)size)
			die("write");
		while (got < size) {
			ssize_t r = read(fd, back + got, size - got);

			if (r <= 0)
				die("read");
			got += r;
		}
		t1 = now_ns();
		if (t0 - start < WARMUP_NS || t1 > end - COOLDOWN_NS)
			continue;
		if (n == cap) {
			cap *= 2;
			obs = realloc(obs, cap * sizeof(*obs));
			if (!obs)
				die("realloc");
		}
		obs[n] = (t1 - t0) / 2e3; /* half the round trip, in µs */
		sum += obs[n++];
	}
	close(fd);
	if (!n) {
		fprintf(stderr, "pingpong: no observation (run longer than 0.45 s)\n");
		return 1;
	}
	qsort(obs, n, sizeof(*obs), cmp);
	printf("pingpong: Summary: Latency is %.3f usec\n", sum / n);
	printf("pingpong: Total %zu observations\n", n);
	printf("pingpong: ---> <MAX> observation = %8.3f\n", obs[n - 1]);
	printf("pingpong: ---> percentile 99.900 = %8.3f\n", pct(obs, n, 99.9));
	printf("pingpong: ---> percentile 99.000 = %8.3f\n", pct(obs, n, 99.0));
	printf("pingpong: ---> percentile 90.000 = %8.3f\n", pct(obs, n, 90.0));
	printf("pingpong: ---> percentile 50.000 = %8.3f\n", pct(obs, n, 50.0));
	printf("pingpong: ---> <MIN> observation = %8.3f\n", obs[0]);
	free(obs);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "server"))
		serve(argv[2], argv[3]);
	if ((argc == 5 || argc == 6) && !strcmp(argv[1], "client")) {
		size_t size = argc == 6 ? strtoul(argv[5], NULL, 10) : 64;

		if (size == 0 || size > MAX_SIZE) {
			fprintf(stderr, "pingpong: SIZE must be 1..%d\n", MAX_SIZE);
			return 2;
		}
		return client(argv[2], argv[3], atof(argv[4]), size);
	}
	fprintf(stderr, "usage: pingpong server ADDR PORT\n"
			"       pingpong client ADDR PORT SECONDS [SIZE]\n");
	return 2;
}
