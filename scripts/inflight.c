// SPDX-License-Identifier: Apache-2.0
/*
 * inflight: starts one CNI ADD process per container id, all at once, and
 * times each from its own start to its exit. scripts/bench builds it for
 * the "all in flight" row: Python's subprocess, spawning 100 processes
 * from 100 threads, costs about as much CPU as the ADDs it would time
 * (100 runs of /bin/true had a p95 of 100-130 ms on 2 cores).
 *
 *   inflight PLUGIN CONF OUTDIR ID...
 *
 * Each ID gets a process running PLUGIN with CNI_COMMAND=ADD,
 * CNI_CONTAINERID=ID, CNI_NETNS=/run/netns/ID, CNI_IFNAME=eth0, CNI_PATH
 * and PATH from this process's environment, stdin from CONF, stdout to
 * OUTDIR/ID.json and stderr to OUTDIR/ID.err. The children are all made
 * first and wait on one pipe; closing it releases them together, which is
 * when a runtime would have started them all. Each notes CLOCK_MONOTONIC
 * just before its execve, in a shared page (how long it waited for a CPU
 * before it could exec is the difference); this process notes each exit
 * as it reaps it. Prints "release RELEASE_NS", then, per ID, one line:
 * "ID exec_ns end_ns status" (status as waitpid gives it).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static char *var(const char *name, const char *value)
{
	char *s;

	if (asprintf(&s, "%s=%s", name, value ? value : "") < 0)
		die("asprintf");
	return s;
}

int main(int argc, char **argv)
{
	int n = argc - 4, gate[2], i;
	uint64_t *start, *end;
	int *status;
	pid_t *pids;

	if (n < 1) {
		fprintf(stderr, "usage: inflight PLUGIN CONF OUTDIR ID...\n");
		return 2;
	}
	start = mmap(NULL, n * sizeof(*start), PROT_READ | PROT_WRITE,
		     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	end = calloc(n, sizeof(*end));
	status = calloc(n, sizeof(*status));
	pids = calloc(n, sizeof(*pids));
	if (start == MAP_FAILED || !end || !status || !pids)
		die("memory");
	if (pipe(gate))
		die("pipe");
	for (i = 0; i < n; i++) {
		const char *id = argv[4 + i];
		char *out, *err, *netns;

		if (asprintf(&out, "%s/%s.json", argv[3], id) < 0 ||
		    asprintf(&err, "%s/%s.err", argv[3], id) < 0 ||
		    asprintf(&netns, "/run/netns/%s", id) < 0)
			die("asprintf");
		pids[i] = fork();
		if (pids[i] < 0)
			die("fork");
		if (pids[i] == 0) {
			char *env[] = { "CNI_COMMAND=ADD",
					var("CNI_CONTAINERID", id),
					var("CNI_NETNS", netns),
					"CNI_IFNAME=eth0",
					var("CNI_PATH", getenv("CNI_PATH")),
					var("PATH", getenv("PATH")),
					NULL };
			char *args[] = { argv[1], NULL };
			int in = open(argv[2], O_RDONLY);
			int o = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0600);
			int e = open(err, O_WRONLY | O_CREAT | O_TRUNC, 0600);
			char c;

			if (in < 0 || o < 0 || e < 0)
				_exit(126);
			dup2(in, 0);
			dup2(o, 1);
			dup2(e, 2);
			close(gate[1]);
			/* Blocks until the parent closes the gate. */
			if (read(gate[0], &c, 1) != 0)
				_exit(126);
			start[i] = now_ns();
			execve(argv[1], args, env);
			_exit(127);
		}
		free(out);
		free(err);
		free(netns);
	}
	close(gate[0]);
	printf("release %llu\n", (unsigned long long)now_ns());
	fflush(stdout);
	close(gate[1]);
	for (int left = n; left > 0; left--) {
		int st;
		pid_t pid = wait(&st);
		uint64_t t = now_ns();

		if (pid < 0)
			die("wait");
		for (i = 0; i < n; i++)
			if (pids[i] == pid) {
				end[i] = t;
				status[i] = st;
			}
	}
	for (i = 0; i < n; i++)
		printf("%s %llu %llu %d\n", argv[4 + i],
		       (unsigned long long)start[i],
		       (unsigned long long)end[i], status[i]);
	return 0;
}
