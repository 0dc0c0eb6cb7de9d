// SPDX-License-Identifier: MIT OR GPL-2.0-only
/*
 * The splice guard on arm64, run inside an arm64 guest by
 * scripts/vmtest-arm64.sh: this machine's Rust toolchain has no arm64
 * standard library, so this C program (static, libbpf) does what an
 * `Accelerator` in ingress mode with the splice guard does, with the real
 * BPF object built for arm64 (its bpftool skeleton): fp_sock_ops on a child cgroup, fp_sk_msg on
 * sock_map, fp_splice_guard on file_permission. The zeroed policy of a
 * fresh object selects every socket of the cgroup.
 *
 * Checks, each printed as "ok" or "FAIL":
 *  - a write on an accelerated pair is redirected (the stats counter);
 *  - an AArch32 program (tests/helpers/splice_arm32.s) splicing a plain
 *    socket reads its bytes, so the helper works;
 *  - the same program's splice, sendfile and sendfile64 of an accelerated
 *    socket are refused with EINVAL (without the guard's AArch32 numbers
 *    they return EAGAIN: the bytes wait where splice does not look), and
 *    the guard records each helper's pid and counts each refusal;
 *  - native arm64 splice (76) and sendfile (71) are refused too;
 *  - read(2) then gets the redirected bytes intact.
 *
 * Where the kernel refuses to attach the guard (Debian's arm64 6.1:
 * ENOTSUPP) only the redirect and read checks run, and it exits 3.
 *
 * Usage: splice_guard AARCH32_HELPER; exits 0 when every check held, 1 when
 * one failed, 2 when setting up failed, 3 as above.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "fastpath.h"
#include "fastpath.skel.h" /* bpftool gen skeleton, by the script */

#define CGROUP "/sys/fs/cgroup/fp-arm64-splice-guard"
#define MESSAGE "hello"
#define MESSAGE_LEN 5

static int checks, failures;

static void check(int held, const char *format, ...)
{
	va_list args;

	printf("%s ", held ? "ok  " : "FAIL");
	va_start(args, format);
	vprintf(format, args);
	va_end(args);
	printf("\n");
	checks++;
	failures += !held;
}

static void die(const char *what)
{
	fprintf(stderr, "splice_guard: %s: %s\n", what, strerror(errno));
	exit(2);
}

struct tcp_pair {
	int client, server;
};

/* A loopback connection, both ends non-blocking (the library keeps
 * sockets blocking at connect() plain). */
static struct tcp_pair tcp_pair(void)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	socklen_t len = sizeof(addr);
	struct tcp_pair pair;
	int listener;

	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	listener = socket(AF_INET, SOCK_STREAM, 0);
	if (listener < 0 || bind(listener, (struct sockaddr *)&addr, len) ||
	    listen(listener, 1) || getsockname(listener, (struct sockaddr *)&addr, &len))
		die("listener");
	pair.client = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (pair.client < 0 ||
	    (connect(pair.client, (struct sockaddr *)&addr, len) && errno != EINPROGRESS))
		die("connect");
	pair.server = accept4(listener, NULL, NULL, SOCK_NONBLOCK);
	if (pair.server < 0)
		die("accept");
	close(listener);
	/* The client's side is established once the server's is. */
	while (send(pair.client, "", 0, 0) && errno == EAGAIN)
		usleep(1000);
	return pair;
}

/* Runs the AArch32 helper with `socket` as its fd 3: its exit code. */
static int run_aarch32(const char *helper, const char *mode, int socket, pid_t *pid)
{
	int status;

	*pid = fork();
	if (*pid < 0)
		die("fork");
	if (*pid == 0) {
		if (dup2(socket, 3) < 0)
			_exit(126);
		execl(helper, helper, mode, (char *)NULL);
		_exit(127);
	}
	if (waitpid(*pid, &status, 0) < 0)
		die("waitpid");
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static __u64 stat_sum(int stats_fd, size_t offset)
{
	int cpus = libbpf_num_possible_cpus();
	struct fp_stats *values = calloc(cpus, sizeof(*values));
	__u32 zero = 0;
	__u64 sum = 0;

	if (!values || bpf_map_lookup_elem(stats_fd, &zero, values))
		die("reading the stats map");
	for (int cpu = 0; cpu < cpus; cpu++)
		sum += *(__u64 *)((char *)&values[cpu] + offset);
	free(values);
	return sum;
}

#define STAT(fd, field) stat_sum(fd, offsetof(struct fp_stats, field))

static void join_cgroup(const char *dir, pid_t pid)
{
	char path[256];
	FILE *procs;

	snprintf(path, sizeof(path), "%s/cgroup.procs", dir);
	procs = fopen(path, "w");
	if (!procs || fprintf(procs, "%d\n", pid) < 0 || fclose(procs))
		die(path);
}

/* The guard's checks, with the guard attached and MESSAGE waiting on both
 * pairs' servers (redirected on `fast`, plain on `plain`). */
static void guard_checks(const struct fastpath *skel, const char *helper, struct tcp_pair plain,
			 struct tcp_pair fast)
{
	static const struct {
		const char *mode, *call;
	} calls[] = { { "s", "splice (340)" }, { "f", "sendfile (187)" }, { "F", "sendfile64 (239)" } };
	int stats = bpf_map__fd(skel->maps.stats), excluded = bpf_map__fd(skel->maps.splice_excluded);
	int pipe_fds[2];
	pid_t pid;
	ssize_t n;

	n = run_aarch32(helper, "s", plain.server, &pid);
	check(n == 256 - MESSAGE_LEN, "AArch32 splice of a plain socket read %d bytes (exit %zd)",
	      MESSAGE_LEN, n);
	for (size_t i = 0; i < sizeof(calls) / sizeof(calls[0]); i++) {
		struct fp_splice_exclusion caught = {};
		__u32 key;

		n = run_aarch32(helper, calls[i].mode, fast.server, &pid);
		check(n == EINVAL,
		      "AArch32 %s of an accelerated socket: exit %zd (22 EINVAL; 11 EAGAIN is the bug)",
		      calls[i].call, n);
		key = pid;
		check(!bpf_map_lookup_elem(excluded, &key, &caught) && caught.times == 1,
		      "the guard recorded the AArch32 process %d (times %llu)", pid,
		      (unsigned long long)caught.times);
	}
	check(STAT(stats, splice_blocked) == 3, "splice_blocked counts the 3 refusals (%llu)",
	      (unsigned long long)STAT(stats, splice_blocked));

	if (pipe(pipe_fds))
		die("pipe");
	n = splice(fast.server, NULL, pipe_fds[1], NULL, 4096, SPLICE_F_NONBLOCK);
	check(n < 0 && errno == EINVAL, "arm64 splice (76): %zd, %s", n,
	      n < 0 ? strerror(errno) : "read");
	n = sendfile(pipe_fds[1], fast.server, NULL, 4096);
	check(n < 0 && errno == EINVAL, "arm64 sendfile (71): %zd, %s", n,
	      n < 0 ? strerror(errno) : "read");
	check(STAT(stats, splice_blocked) == 5, "splice_blocked counts 5 refusals (%llu)",
	      (unsigned long long)STAT(stats, splice_blocked));
}

int main(int argc, char **argv)
{
	struct fastpath *skel;
	struct bpf_program *prog;
	struct tcp_pair plain, fast;
	int cgroup, stats, guard_refused = 0;
	char buf[64];
	ssize_t n;

	if (argc != 2) {
		fprintf(stderr, "usage: %s AARCH32_HELPER\n", argv[0]);
		return 2;
	}
	skel = fastpath__open();
	if (!skel)
		die("fastpath__open");
	/* Ingress mode with the guard loads just these. */
	bpf_object__for_each_program(prog, skel->obj)
		bpf_program__set_autoload(prog, prog == skel->progs.fp_sock_ops ||
						prog == skel->progs.fp_sk_msg ||
						prog == skel->progs.fp_splice_guard);
	/* As the library decides it: sock_ops sees the current task from 6.10. */
	skel->rodata->record_owners =
		libbpf_probe_bpf_helper(BPF_PROG_TYPE_SOCK_OPS, BPF_FUNC_get_current_pid_tgid, NULL) > 0;
	if (fastpath__load(skel))
		die("fastpath__load");
	stats = bpf_map__fd(skel->maps.stats);

	/* Made before joining the cgroup: never accelerated. */
	plain = tcp_pair();

	if (mkdir(CGROUP, 0755) && errno != EEXIST)
		die("mkdir " CGROUP);
	join_cgroup(CGROUP, getpid());
	cgroup = open(CGROUP, O_RDONLY | O_DIRECTORY);
	if (cgroup < 0)
		die("open " CGROUP);
	if (!bpf_program__attach_cgroup(skel->progs.fp_sock_ops, cgroup))
		die("attaching fp_sock_ops");
	if (bpf_prog_attach(bpf_program__fd(skel->progs.fp_sk_msg), bpf_map__fd(skel->maps.sock_map),
			    BPF_SK_MSG_VERDICT, 0))
		die("attaching fp_sk_msg");

	fast = tcp_pair();
	if (send(fast.client, MESSAGE, MESSAGE_LEN, 0) != MESSAGE_LEN ||
	    send(plain.client, MESSAGE, MESSAGE_LEN, 0) != MESSAGE_LEN)
		die("send");
	check(STAT(stats, msgs_redirected) == 1 && STAT(stats, bytes_redirected) == MESSAGE_LEN,
	      "the accelerated pair's write was redirected (msgs_redirected %llu, bytes %llu)",
	      (unsigned long long)STAT(stats, msgs_redirected),
	      (unsigned long long)STAT(stats, bytes_redirected));
	usleep(100000); /* the plain bytes cross loopback */

	/* Where the kernel refuses LSM programs the library's attach() fails
	 * (SpliceGuardRefused) unless the guard is off: reported, exit 3. */
	if (bpf_program__attach_lsm(skel->progs.fp_splice_guard)) {
		guard_checks(skel, argv[1], plain, fast);
	} else {
		guard_refused = errno;
		printf("the kernel refuses fp_splice_guard: %s (errno %d)\n", strerror(errno), errno);
	}

	n = recv(fast.server, buf, sizeof(buf), 0);
	check(n == MESSAGE_LEN && !memcmp(buf, MESSAGE, MESSAGE_LEN),
	      "read(2) gets the redirected bytes intact (%zd bytes)", n);

	/* Leave the cgroup so that it can go; the object's links go at exit. */
	join_cgroup("/sys/fs/cgroup", getpid());
	if (rmdir(CGROUP))
		die("rmdir " CGROUP);
	printf("arm64 splice guard: %d of %d checks held%s\n", checks - failures, checks,
	       guard_refused ? ", guard refused" : "");
	return failures ? 1 : guard_refused ? 3 : 0;
}
