// SPDX-License-Identifier: (MIT OR GPL-2.0-only)
/*
 * The kernel side of sockmap-fastpath.
 *
 *  fp_sock_ops  (cgroup sock_ops): records which process owns a socket when
 *               it connects or listens, and puts established sockets that the
 *               policy selects into sock_map.
 *  fp_sk_msg    (sk_msg on sock_map): moves each sendmsg chunk straight to the
 *               peer socket, or lets it through as plain TCP.
 *  fp_sk_msg_both (both mode, instead of fp_sk_msg): the same, except that
 *               an application's bytes to a proxy's forwarded downstream
 *               socket leave straight through the paired upstream socket.
 *  fp_fwd_verdict (sk_skb stream verdict on fwd_map, egress and both
 *               modes): bytes a proxy's socket receives leave through its
 *               paired socket's send path, never crossing user space.
 *  fp_splice_guard (lsm/file_permission): refuses splice(2), sendfile(2)
 *               and io_uring splice reads from accelerated sockets with
 *               EINVAL, which programs already treat as "splice
 *               unsupported, use read()", and remembers the
 *               process (and an accepted socket's service) so its later
 *               connections stay plain. (The kernel's
 *               splice path does not read redirected bytes: false EOF or
 *               endless EAGAIN.)
 *
 * Rules that keep every byte (see ../shared/FACTS.md):
 *  - a lookup miss returns SK_PASS: SK_DROP would fail the sender's send;
 *  - once a socket has sent one chunk as plain TCP it never redirects again:
 *    the receiver reads its redirect queue before its TCP queue, so a later
 *    redirected chunk would overtake the plain one;
 *  - only the two sockets of one connection, both in the map, redirect to
 *    each other (the `pairs` handshake below). A map member that receives
 *    plain TCP misreports FIONREAD on some kernels, so a socket whose peer
 *    does not join leaves the map, which is safe only because nothing was
 *    ever redirected into it. Paired sockets are never deleted (that would
 *    lose unread bytes); they leave when they close. Detaching sets
 *    live.paused: nothing new is inserted, existing pairs stay paired.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "fastpath.h"

/* x86: the thread's status, whose TS_COMPAT bit marks a 32-bit syscall. */
struct thread_info {
	__u32 status;
} __attribute__((preserve_access_index));

/* The task_struct fields we read, relocated against the running kernel's
 * BTF (CO-RE), so no vmlinux.h is needed. */
struct task_struct {
	struct thread_info thread_info;
	unsigned int flags;
	struct task_struct *group_leader;
	__u64 start_boottime;
	char comm[FP_COMM_LEN];
} __attribute__((preserve_access_index));

/* For the splice guard and the blocking-mode check, likewise relocated
 * (CO-RE). */
struct sock;
struct file {
	unsigned int f_flags;
} __attribute__((preserve_access_index));
struct socket {
	struct sock *sk;
	struct file *file;
} __attribute__((preserve_access_index));
/* The kernel's TCP memory in use, in pages: struct proto's counter, an
 * atomic_long_t, read as the long it holds; and its pressure flag
 * (tcp_memory_pressure: nonzero from crossing tcp_mem[1] until use falls
 * below tcp_mem[0]). */
struct proto {
	long *memory_allocated;
	unsigned long *memory_pressure;
} __attribute__((preserve_access_index));
/* A list's head (psock queues; kernel_word_set). */
struct list_head {
	struct list_head *next;
} __attribute__((preserve_access_index));
/* A namespace's TCP_NOTSENT_LOWAT default (net.ipv4.tcp_notsent_lowat). */
struct netns_ipv4 {
	unsigned int sysctl_tcp_notsent_lowat;
} __attribute__((preserve_access_index));
struct net {
	struct netns_ipv4 ipv4;
} __attribute__((preserve_access_index));
struct sock_common {
	struct proto *skc_prot;
	struct {
		__s64 counter;
	} skc_cookie;
	struct {
		struct net *net;
	} skc_net;
} __attribute__((preserve_access_index));
/* The fields of struct sock read here. sk_rmem_alloc is a macro for
 * sk_backlog.rmem_alloc, an atomic_t; sk_prot for __sk_common.skc_prot. */
struct sock {
	struct sock_common __sk_common;
	struct socket *sk_socket;
	void *sk_user_data;
	int sk_sndbuf;
	int sk_wmem_queued;
	struct {
		struct {
			int counter;
		} rmem_alloc;
	} sk_backlog;
} __attribute__((preserve_access_index));

#define O_NONBLOCK 04000 /* the same value on x86_64 and arm64 */

#if defined(__TARGET_ARCH_x86)
struct pt_regs {
	unsigned long orig_ax;
} __attribute__((preserve_access_index));
#define SYSCALL_NR(regs) ((regs)->orig_ax)
#define NR_SENDFILE 40
#define NR_SPLICE 275
/* 32-bit programs (IA32 emulation) number them differently. */
#define TS_COMPAT 0x0002
#define IN_COMPAT_SYSCALL(task, regs) ((void)(regs), (task)->thread_info.status & TS_COMPAT)
#define IS_COMPAT_SPLICE(nr) ((nr) == 187 || (nr) == 239 || (nr) == 313)
#elif defined(__TARGET_ARCH_arm64)
/* pstate is the saved user PSTATE (in an anonymous union, which CO-RE
 * looks through), syscallno the number the entry code took from x8, or
 * from r7 for an AArch32 caller. */
struct pt_regs {
	__u64 pstate;
	int syscallno;
} __attribute__((preserve_access_index));
#define SYSCALL_NR(regs) ((regs)->syscallno)
#define NR_SENDFILE 71
#define NR_SPLICE 76
/* 32-bit (AArch32) programs: the mode bit of their saved PSTATE
 * (architectural, unlike the TIF_32BIT flag number), which the kernel's
 * compat_user_mode() tests too; their own numbers: sendfile 187,
 * sendfile64 239, splice 340 (tests/arm64/). */
#define PSR_MODE32_BIT 0x10
#define IN_COMPAT_SYSCALL(task, regs) ((void)(task), (regs)->pstate & PSR_MODE32_BIT)
#define IS_COMPAT_SPLICE(nr) ((nr) == 187 || (nr) == 239 || (nr) == 340)
#else
/* Elsewhere the guard cannot tell splice(2) from read(2): the Rust side
 * refuses SpliceGuard::On (splice_guard::ARCH_SUPPORTED) and never loads
 * fp_splice_guard; these definitions only let the object build. */
struct pt_regs {
	unsigned long unused;
} __attribute__((preserve_access_index));
#define SYSCALL_NR(regs) ((void)(regs), 0UL)
#define NR_SENDFILE (~0UL)
#define NR_SPLICE (~0UL)
#define IN_COMPAT_SYSCALL(task, regs) ((void)(task), (void)(regs), 0)
#define IS_COMPAT_SPLICE(nr) ((void)(nr), 0)
#endif

#define MAY_READ 4
#define EINVAL 22

/* io_uring: its syscall (one number on every architecture since 5.1) and
 * the flag of its worker threads, which run a request's splice. */
#define NR_IO_URING_ENTER 426
#define PF_IO_WORKER 0x00000010

#define AF_INET 2
#define AF_INET6 10

/* Written live by the Rust side through the mmapped .bss. */
struct fp_live live;

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__type(key, struct fp_sock_key);
	__type(value, __u64);
	__uint(max_entries, 65536); /* resized before load */
} sock_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct fp_stats);
	__uint(max_entries, 1);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct fp_sock_state);
} sock_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32); /* port, host byte order */
	__type(value, __u8);
	__uint(max_entries, FP_MAX_PORTS);
} policy_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct fp_cidr_key);
	__type(value, __u8);
	__uint(max_entries, FP_MAX_CIDRS);
} policy_cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, char[FP_COMM_LEN]);
	__type(value, __u8);
	__uint(max_entries, FP_MAX_COMMS);
} policy_comms SEC(".maps");

/* Namespace groups (src/netns.rs): netns cookie -> the id of the address
 * space it shares with other namespaces, used in keys instead of the
 * cookie. Written before attach. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, __u64);
	__uint(max_entries, FP_MAX_GROUPED_NAMESPACES);
} netns_spaces SEC(".maps");

/* Egress mode: a proxy's forwarded sockets, by socket cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__type(key, __u64);
	__type(value, __u64);
	__uint(max_entries, 65536); /* resized before load */
} fwd_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct fp_fwd_dir);
	__uint(max_entries, 65536); /* resized before load */
} fwd_dirs SEC(".maps");

/* Bytes Forwarding has copied out of each forwarded socket's own queue so
 * far, by the socket's cookie; written by Rust only. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, __u64);
	__uint(max_entries, 65536); /* resized before load */
} fwd_copied SEC(".maps");

/* Both mode: forwarded pairs by the downstream socket's key. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct fp_sock_key);
	__type(value, struct fp_proxy_pair);
	__uint(max_entries, 65536); /* resized before load */
} proxy_pairs SEC(".maps");

/* One entry per connecting socket while its pairing is undecided or
 * unseen by it: enum fp_pair_state, keyed by that socket's own key. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct fp_sock_key);
	__type(value, __u64); /* 64-bit: BPF's compare-and-swap of any CPU version */
	__uint(max_entries, 65536); /* resized before load */
} pairs SEC(".maps");

/* Processes caught splicing from an accelerated socket, by tgid. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __u32);
	__type(value, struct fp_splice_exclusion);
	__uint(max_entries, FP_MAX_SPLICE_EXCLUDED);
} splice_excluded SEC(".maps");

/* Services whose accepted sockets the splice guard caught being spliced,
 * keyed by the local address alone (fp_sock_key with the remote half
 * zero): the process that splices an accepted socket is often not the one
 * that listened (pre-fork workers, socket activation, listeners made
 * before attach), so the service's later connections stay plain too. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct fp_sock_key);
	__type(value, __u64); /* splice reads refused */
	__uint(max_entries, FP_MAX_SPLICE_EXCLUDED);
} splice_excluded_services SEC(".maps");

/* Streaming demotion: each socket's part in its pair's demotion, by its
 * fp_sock_key (LRU: an entry left by a connection that closed mid-way
 * gives way; losing a live one only stops that pair's demotion). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct fp_sock_key);
	__type(value, struct fp_demotion);
	__uint(max_entries, 65536); /* resized before load */
} demotions SEC(".maps");

static __always_inline struct fp_stats *this_cpu_stats(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&stats, &zero);
}

#define COUNT(field, n)                                                        \
	do {                                                                   \
		struct fp_stats *s__ = this_cpu_stats();                       \
		if (s__) /* atomic: softirq and process context share a CPU */ \
			__sync_fetch_and_add(&s__->field, (n));                \
	} while (0)

/* The address fields of bpf_sock_ops, read once each with a plain 32-bit
 * load. Reading local_ip4 on one branch and local_ip6[i] on
 * another lets clang-19 emit a modified-ctx-pointer load the verifier
 * rejects; reading everything up front avoids it. */
struct endpoint_fields {
	__u32 family;
	__u32 local_ip4, remote_ip4;
	__u32 local_ip6[4], remote_ip6[4];
	__u32 local_port, remote_port;
};

#define READ_ENDPOINT_FIELDS(ctx, f)                                           \
	do {                                                                   \
		(f)->family = (ctx)->family;                                   \
		(f)->local_ip4 = (ctx)->local_ip4;                             \
		(f)->remote_ip4 = (ctx)->remote_ip4;                           \
		(f)->local_ip6[0] = (ctx)->local_ip6[0];                       \
		(f)->local_ip6[1] = (ctx)->local_ip6[1];                       \
		(f)->local_ip6[2] = (ctx)->local_ip6[2];                       \
		(f)->local_ip6[3] = (ctx)->local_ip6[3];                       \
		(f)->remote_ip6[0] = (ctx)->remote_ip6[0];                     \
		(f)->remote_ip6[1] = (ctx)->remote_ip6[1];                     \
		(f)->remote_ip6[2] = (ctx)->remote_ip6[2];                     \
		(f)->remote_ip6[3] = (ctx)->remote_ip6[3];                     \
		(f)->local_port = (ctx)->local_port;                           \
		(f)->remote_port = (ctx)->remote_port;                         \
		asm volatile("" ::: "memory");                                 \
	} while (0)

static __always_inline void ip_to_v6(__u32 family, __u32 ip4, const __u32 *ip6,
				     __u32 *out)
{
	if (family == AF_INET) {
		out[0] = 0;
		out[1] = 0;
		out[2] = bpf_htonl(0x0000ffff);
		out[3] = ip4;
	} else {
		out[0] = ip6[0];
		out[1] = ip6[1];
		out[2] = ip6[2];
		out[3] = ip6[3];
	}
}

/* Key of the socket itself (as_peer = 0) or of the socket it talks to
 * (as_peer = 1): the peer's local side is our remote side. */
static __always_inline int make_key(const struct endpoint_fields *f,
				    __u64 netns_cookie, int as_peer,
				    struct fp_sock_key *key)
{
	__u32 local_port = f->local_port;
	__u32 remote_port = bpf_ntohl(f->remote_port);

	if (f->family != AF_INET && f->family != AF_INET6)
		return -1;
	if (as_peer) {
		ip_to_v6(f->family, f->remote_ip4, f->remote_ip6, key->local_ip);
		ip_to_v6(f->family, f->local_ip4, f->local_ip6, key->remote_ip);
		key->local_port = remote_port;
		key->remote_port = local_port;
	} else {
		ip_to_v6(f->family, f->local_ip4, f->local_ip6, key->local_ip);
		ip_to_v6(f->family, f->remote_ip4, f->remote_ip6, key->remote_ip);
		key->local_port = local_port;
		key->remote_port = remote_port;
	}
	key->netns_cookie = netns_cookie;
	return 0;
}

/* What keys use in place of the netns cookie: the namespace group's
 * shared id, or the cookie itself. */
static __always_inline __u64 address_space(__u64 netns_cookie)
{
	__u64 *space = bpf_map_lookup_elem(&netns_spaces, &netns_cookie);

	return space ? *space : netns_cookie;
}

/* Set before load: 0 where sock_ops programs cannot see the current task
 * (Linux 6.1 lacks bpf_get_current_pid_tgid there); comm policies and the
 * splice guard's process exclusion then have no owner to match. */
const volatile __u32 record_owners = 1;

/* Streaming demotion watches a paired socket's segments both ways: an
 * incoming data segment on the fast path skips the parse callback, the
 * ACK it makes the socket send does not skip this one. */
#define DEMOTION_CB_FLAGS \
	(BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG)

/* Streaming demotion (AcceleratorBuilder::demote_streaming), set before
 * load: a paired socket whose peer had not read its previous messages at
 * this many redirects in a row, each of at most demote_max_msg_size bytes,
 * takes its pair off the shortcut; 0: never. */
const volatile __u32 demote_after_msgs = 0;
const volatile __u32 demote_max_msg_size = 0;

/* Set before load: 0 to accelerate sockets that are blocking when they
 * connect (BlockingSockets::Accelerate). */
const volatile __u32 keep_blocking_plain = 1;

/* Set before load: the receive-memory use (bytes) above which a socket's
 * local peer stops redirecting into it and sends plain TCP, where TCP's flow
 * control pushes back (AcceleratorBuilder::receive_queue_limit); 0: none. */
const volatile __u32 receive_queue_limit = 0;

/* Set before load: how many segments a forwarded socket's psock backlog
 * (bytes forwarded to it, waiting for room in its send buffer) may hold
 * before the forwarding program keeps what its peer receives on the peer
 * instead, where TCP's window pushes back on the sender; 0: no bound. */
const volatile __u32 fwd_backlog_limit = 0;

/* Set before load: both mode, where an application's bytes queued on a
 * forwarded downstream socket share its queue with the bytes the
 * forwarding program keeps there (kept_bytes_wait). */
const volatile __u32 apps_queue_on_forwarded = 0;

/* Set before load: the kernel's TCP memory pressure threshold in pages
 * (tcp_mem[1] at attach); 0: not known. Above it redirected bytes go plain
 * too: at the hard limit the receiver's memory charge fails and the sender
 * gets ENOMEM, where plain TCP waits for memory. */
const volatile __u64 tcp_memory_pressure_pages = 0;

/* Whether the socket's file is in blocking mode (no O_NONBLOCK) now. A
 * blocking read of a socket in a socket map returns EAGAIN when another
 * thread's activity wakes it with nothing queued (tcp_bpf_recvmsg), which
 * blocking programs treat as fatal. A socket without a file (not accepted
 * yet) counts as not blocking. */
static __always_inline int file_is_blocking(struct bpf_sock *bsk)
{
	struct sock *sk = (struct sock *)bpf_skc_to_tcp_sock(bsk);
	struct socket *sock;
	struct file *file;

	if (!sk)
		return 0;
	sock = sk->sk_socket;
	if (!sock)
		return 0;
	file = sock->file;
	if (!file)
		return 0;
	return !(file->f_flags & O_NONBLOCK);
}

/* Called in the connect() or listen() syscall, where the current task is the
 * socket's owner. Accepted sockets inherit the listener's record
 * (BPF_F_CLONE), so both ends of a connection know their owner. */
static __always_inline void on_connect_or_listen(struct bpf_sock_ops *skops, int connecting)
{
	struct bpf_sock *sk = skops->sk;
	struct task_struct *leader;
	struct fp_sock_state *st;

	if (!sk)
		return;
	st = bpf_sk_storage_get(&sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return;
	st->flags = 0;
	if (connecting && keep_blocking_plain && file_is_blocking(sk))
		st->flags |= FP_BLOCKING;
	if (!record_owners)
		return;
	st->owner_tgid = bpf_get_current_pid_tgid() >> 32;
	/* The process name (the thread group leader's, as /proc/<pid>/comm),
	 * not the calling thread's: worker threads often rename themselves. */
	leader = bpf_get_current_task_btf()->group_leader;
	__builtin_memcpy(st->owner_comm, leader->comm, sizeof(st->owner_comm));
	st->owner_started = leader->start_boottime;
	st->flags |= FP_OWNER_KNOWN;
}

/* Whether the splice guard caught the socket's owner: its pid and its start
 * time, since an entry for the pid may be left from an earlier process. */
static __always_inline int owner_was_caught_splicing(const struct fp_sock_state *st)
{
	struct fp_splice_exclusion *caught;

	if (!(st->flags & FP_OWNER_KNOWN))
		return 0;
	caught = bpf_map_lookup_elem(&splice_excluded, &st->owner_tgid);
	return caught && caught->owner_started == st->owner_started;
}

/* The service a socket belongs to: its own key without the remote side. */
static __always_inline void service_of(const struct fp_sock_key *own, struct fp_sock_key *service)
{
	__builtin_memcpy(service->local_ip, own->local_ip, sizeof(service->local_ip));
	service->local_port = own->local_port;
	service->netns_cookie = own->netns_cookie;
}

/* Whether the splice guard caught a socket of the service an accepted
 * socket belongs to. */
static __always_inline int service_was_caught_splicing(const struct fp_sock_key *key)
{
	struct fp_sock_key service = {};

	service_of(key, &service);
	return bpf_map_lookup_elem(&splice_excluded_services, &service) != NULL;
}

static __always_inline int policy_selects(const struct fp_sock_key *key,
					  const struct fp_sock_state *st)
{
	__u32 flags = live.match_flags;

	if (flags & FP_MATCH_PORTS) {
		__u32 local_port = key->local_port, remote_port = key->remote_port;

		if (!bpf_map_lookup_elem(&policy_ports, &local_port) &&
		    !bpf_map_lookup_elem(&policy_ports, &remote_port))
			return 0;
	}
	if (flags & FP_MATCH_CIDRS) {
		struct fp_cidr_key cidr = { .prefixlen = 128 };

		__builtin_memcpy(cidr.addr, key->remote_ip, sizeof(cidr.addr));
		if (!bpf_map_lookup_elem(&policy_cidrs, &cidr))
			return 0;
	}
	if (flags & FP_MATCH_COMMS) {
		if (!(st->flags & FP_OWNER_KNOWN) ||
		    !bpf_map_lookup_elem(&policy_comms, st->owner_comm))
			return 0;
	}
	return 1;
}

/* Whether an established socket may join the shortcut (counting why not). */
static __always_inline int may_insert(struct bpf_sock_ops *skops,
				      const struct fp_sock_key *key,
				      const struct fp_sock_state *st,
				      __u64 bytes_received, __u32 data_segs_out, int passive)
{
	if (!policy_selects(key, st)) {
		COUNT(policy_skipped, 1);
		return 0;
	}
	if (owner_was_caught_splicing(st) || (passive && service_was_caught_splicing(key))) {
		COUNT(splice_excluded, 1);
		return 0;
	}
	/* Its accepting peer then finds nothing waiting and stays out too. */
	if (st->flags & FP_BLOCKING) {
		COUNT(blocking_skipped, 1);
		return 0;
	}
	/* Bytes that already moved as plain TCP (e.g. TCP Fast Open data in the
	 * SYN) could be overtaken by redirected ones: keep such sockets plain. */
	if (bytes_received || data_segs_out) {
		COUNT(late_skipped, 1);
		return 0;
	}
	return 1;
}

/* Removes a socket that never paired from the map. Safe: only its peer
 * could have redirected into it, and its peer never joined. */
static __always_inline void remove_unpaired(struct fp_sock_key *key)
{
	if (!bpf_map_delete_elem(&sock_map, key))
		COUNT(unpaired_removed, 1);
}

/* Connecting side (established first): joins the map and waits for its
 * peer's decision, watching its own segments, both ways, until it knows. */
static __always_inline void connect_side_established(struct bpf_sock_ops *skops,
						     struct fp_sock_key *key,
						     struct fp_sock_state *st)
{
	__u64 pending = FP_PAIR_PENDING;

	if (bpf_sock_hash_update(skops, &sock_map, key, BPF_NOEXIST)) {
		COUNT(insert_failed, 1);
		return;
	}
	if (bpf_map_update_elem(&pairs, key, &pending, BPF_ANY)) {
		bpf_map_delete_elem(&sock_map, key);
		COUNT(insert_failed, 1);
		return;
	}
	st->flags |= FP_ACCELERATED | FP_WAITING;
	bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG |
					 BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG |
					 BPF_SOCK_OPS_STATE_CB_FLAG);
	COUNT(sockets_inserted, 1);
}

/* Accepting side (established second, when its peer, if local and
 * selected, is already waiting in the map): joins only together with it. */
static __always_inline void accept_side_established(struct bpf_sock_ops *skops,
						    struct fp_sock_key *key,
						    struct fp_sock_state *st,
						    int selected)
{
	__u64 *peer_pair = bpf_map_lookup_elem(&pairs, &st->peer);

	if (!peer_pair) {
		if (selected)
			COUNT(unpaired_skipped, 1);
		return;
	}
	if (!selected || bpf_sock_hash_update(skops, &sock_map, key, BPF_NOEXIST)) {
		if (selected)
			COUNT(insert_failed, 1);
		__sync_val_compare_and_swap(peer_pair, FP_PAIR_PENDING, FP_PAIR_PLAIN);
		remove_unpaired(&st->peer);
		return;
	}
	if (__sync_val_compare_and_swap(peer_pair, FP_PAIR_PENDING, FP_PAIR_PAIRED) !=
	    FP_PAIR_PENDING) {
		/* The peer already sent plain bytes: neither side redirected. */
		bpf_map_delete_elem(&sock_map, key);
		remove_unpaired(&st->peer);
		COUNT(unpaired_skipped, 1);
		return;
	}
	st->flags |= FP_ACCELERATED | FP_PAIRED | FP_ACCEPTED;
	if (demote_after_msgs)
		bpf_sock_ops_cb_flags_set(skops, DEMOTION_CB_FLAGS);
	COUNT(sockets_inserted, 1);
}

static __always_inline void on_established(struct bpf_sock_ops *skops, int passive)
{
	struct endpoint_fields f;
	struct fp_sock_key key = {};
	struct fp_sock_state *st;
	struct bpf_sock *sk;
	__u64 netns_cookie;
	__u64 bytes_received; /* 64-bit: a multiple of 4 GiB must not read as 0 */
	__u32 data_segs_out, snd_nxt;
	int selected;

	READ_ENDPOINT_FIELDS(skops, &f);
	bytes_received = skops->bytes_received;
	data_segs_out = skops->data_segs_out;
	snd_nxt = skops->snd_nxt;
	sk = skops->sk;
	if (!sk || live.paused)
		return;
	netns_cookie = address_space(bpf_get_netns_cookie(skops));
	if (make_key(&f, netns_cookie, 0, &key))
		return;
	st = bpf_sk_storage_get(&sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		COUNT(insert_failed, 1);
		return;
	}
	make_key(&f, netns_cookie, 1, &st->peer);
	/* An earlier connection's demotion record with the same key. */
	if (demote_after_msgs)
		bpf_map_delete_elem(&demotions, &key);
	/* Nothing is queued yet (may_insert refuses sockets that moved data):
	 * its write_seq is snd_nxt. */
	st->expected_write_seq = snd_nxt;
	selected = may_insert(skops, &key, st, bytes_received, data_segs_out, passive);
	if (passive)
		accept_side_established(skops, &key, st, selected);
	else if (selected)
		connect_side_established(skops, &key, st);
}

/* A forwarded socket that was waiting to pair (a both-mode proxy's
 * upstream socket) was refused: the application's bytes may now leave
 * straight through it (upstream_on_shortcut). */
static __always_inline void left_shortcut(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct fp_fwd_dir *dir = bpf_map_lookup_elem(&fwd_dirs, &cookie);

	if (dir)
		dir->on_shortcut = 0;
}

/* The connecting side learns its pair's decision: on its first outgoing
 * segment after the peer decided, or at the first segment that brings it
 * bytes (its peer sends only after its own establishment, so it has decided
 * by then). `sent` is the outgoing segment's payload, `received` the
 * incoming one's. A refused socket leaves the map before its plain bytes
 * can be misread: an incoming segment is seen before the kernel queues it
 * and wakes the reader, which then reads FIONREAD from a plain socket (a
 * FIONREAD begun while the socket was still a map member reads 0 even when
 * it returns after the removal, measured on 6.18.44). */
static __always_inline void on_connect_side_segment(struct bpf_sock_ops *skops, __u32 sent,
						    __u32 received)
{
	struct endpoint_fields f;
	struct fp_sock_key key = {};
	struct fp_sock_state *st;
	__u64 *pair, state;
	__u64 bytes_received = skops->bytes_received;

	READ_ENDPOINT_FIELDS(skops, &f);
	if (!skops->sk)
		return;
	/* Another guard's socket (nested cgroups run both guards' programs):
	 * not ours to settle. */
	st = bpf_sk_storage_get(&sock_state, skops->sk, 0, 0);
	if (!st || !(st->flags & FP_WAITING))
		return;
	if (make_key(&f, address_space(bpf_get_netns_cookie(skops)), 0, &key))
		goto done;
	pair = bpf_map_lookup_elem(&pairs, &key);
	state = pair ? *pair : FP_PAIR_PLAIN;
	if (state == FP_PAIR_PENDING) {
		if (!bytes_received && !sent && !received)
			return; /* e.g. the handshake's last ACK: keep waiting */
		state = __sync_val_compare_and_swap(pair, FP_PAIR_PENDING, FP_PAIR_PLAIN);
		if (state == FP_PAIR_PENDING)
			state = FP_PAIR_PLAIN;
	}
	st->flags &= ~FP_WAITING;
	if (state == FP_PAIR_PAIRED) {
		st->flags |= FP_PAIRED;
		/* Plain bytes a send() queued before the insertion: later
		 * redirected ones would overtake them. */
		if (sent) {
			st->flags |= FP_FELL_BACK;
			COUNT(late_plain, 1);
		}
	} else {
		st->flags &= ~FP_ACCELERATED;
		remove_unpaired(&key);
		left_shortcut(skops);
	}
	bpf_map_delete_elem(&pairs, &key);
done:
	bpf_sock_ops_cb_flags_set(skops, demote_after_msgs && (st->flags & FP_PAIRED)
						 ? DEMOTION_CB_FLAGS
						 : 0);
}

/* Payload bytes of the incoming segment a BPF_SOCK_OPS_PARSE_HDR_OPT_CB
 * shows (skb_len counts its TCP header, which skb_data..skb_data_end
 * covers; the data offset is the high nibble of header byte 12). A header
 * that cannot be read counts as payload: deciding early is always safe. */
static __always_inline __u32 incoming_payload(struct bpf_sock_ops *skops)
{
	__u8 *header = (__u8 *)(long)skops->skb_data;
	__u8 *end = (__u8 *)(long)skops->skb_data_end;
	__u32 header_len;

	if (header + 13 > end)
		return 1;
	header_len = (header[12] >> 4) * 4;
	return skops->skb_len > header_len ? skops->skb_len - header_len : 0;
}

/* A connecting socket closed before learning its pair's decision. */
static __always_inline void on_state_change(struct bpf_sock_ops *skops)
{
	struct endpoint_fields f;
	struct fp_sock_key key = {};

	if (skops->args[1] != BPF_TCP_CLOSE)
		return;
	READ_ENDPOINT_FIELDS(skops, &f);
	if (!make_key(&f, address_space(bpf_get_netns_cookie(skops)), 0, &key))
		bpf_map_delete_elem(&pairs, &key);
}

extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym __weak;
static __always_inline void own_key(const struct fp_sock_state *st, struct fp_sock_key *key);
static __always_inline int psock_has_queue(struct sock *sk);

#if defined(__TARGET_ARCH_x86)
/* The registers a thread's entry into the kernel saved at the top of its
 * kernel stack (x86_64: THREAD_SIZE 16 KiB without KASAN; a frame that
 * does not look like a 64-bit user entry is not used). */
struct pt_regs___entry {
	unsigned long ip, cs, sp, ss, orig_ax;
} __attribute__((preserve_access_index));
struct task_struct___stack {
	void *stack;
} __attribute__((preserve_access_index));
#define FP_THREAD_SIZE 16384
#define FP_USER_CS 0x33
#define FP_USER_SS 0x2b

/* The user-entry frame of the thread at `task`: whether it is one. */
static __always_inline int read_user_entry(__u64 task, __u64 *ip, __u64 *sp, __u64 *nr)
{
	struct task_struct___stack *t =
		bpf_rdonly_cast((void *)task, bpf_core_type_id_kernel(struct task_struct___stack));
	unsigned long top = (unsigned long)t->stack + FP_THREAD_SIZE -
			    bpf_core_type_size(struct pt_regs___entry);
	struct pt_regs___entry *regs =
		bpf_rdonly_cast((void *)top, bpf_core_type_id_kernel(struct pt_regs___entry));

	if (regs->cs != FP_USER_CS || regs->ss != FP_USER_SS)
		return 0;
	*ip = regs->ip;
	*sp = regs->sp;
	*nr = regs->orig_ax;
	return 1;
}
#else
/* Elsewhere only the thread's next verdict shows that its redirect landed. */
static __always_inline int read_user_entry(__u64 task, __u64 *ip, __u64 *sp, __u64 *nr)
{
	return 0;
}
#endif

/* A slot no thread's next verdict can clear: the socket had more threads
 * redirecting at once than it has slots. */
#define FP_SLOT_UNPROVABLE (~0ULL)

/* Whether the redirect recorded in `slot` has landed (see
 * fp_redirect_slot). A recorded frame that is no longer a user-entry
 * frame: the thread has exited (its stack freed) or entered the kernel
 * anew, either way after the redirect. */
static __always_inline int slot_landed(const struct fp_redirect_slot *slot)
{
	__u64 ip = 0, sp = 0, nr = 0;

	if (!slot->task)
		return 1;
	if (!slot->frame_known)
		return 0;
	if (!read_user_entry(slot->task, &ip, &sp, &nr))
		return 1;
	return ip != slot->ip || sp != slot->sp || nr != slot->nr;
}

/* Records a redirect the current thread is making from the socket. */
static __always_inline void record_redirect(struct fp_sock_state *st, struct fp_stats *s)
{
	__u64 task = (__u64)bpf_get_current_task_btf();
	struct fp_redirect_slot *slot;

	if (st->slots[0].task == task || slot_landed(&st->slots[0]))
		slot = &st->slots[0];
	else if (st->slots[1].task == task || slot_landed(&st->slots[1]))
		slot = &st->slots[1];
	else {
		if (!(st->flags & FP_UNPROVABLE)) {
			st->flags |= FP_UNPROVABLE;
			__sync_fetch_and_add(&s->demote_unprovable, 1); /* atomic: softirqs count on this CPU too */
		}
		return;
	}
	slot->task = task;
	slot->tid = (__u32)bpf_get_current_pid_tgid();
	slot->frame_known = read_user_entry(task, &slot->ip, &slot->sp, &slot->nr);
}

/* A verdict of the current thread on the socket: its earlier redirect from
 * it has landed (tcp_bpf_sendmsg runs one verdict after the other). */
static __always_inline void forget_own_redirect(struct fp_redirect_slot *slots)
{
	__u64 task = (__u64)bpf_get_current_task_btf();

	if (slots[0].task == task)
		slots[0].task = 0;
	if (slots[1].task == task)
		slots[1].task = 0;
}

/* Stops the socket's redirecting: its later messages go plain, behind
 * what it redirected, which its peer reads first. Its slots are published
 * for the peer, which may leave the map once they have landed. Runs where
 * no verdict of the socket can run meanwhile: in its verdict (socket
 * locked), or in sock_ops on a segment it received (the socket is not
 * owned by a user thread, or its owner is releasing it after a verdict). */
static __always_inline void stop_redirecting(struct fp_sock_state *st, struct fp_demotion *own,
					     struct fp_stats *s)
{
	st->flags |= FP_DEMOTE_STOPPED_SELF | FP_FELL_BACK;
	__builtin_memcpy(own->slots, st->slots, sizeof(own->slots));
	if (st->flags & FP_UNPROVABLE) {
		own->slots[0].task = FP_SLOT_UNPROVABLE;
		own->slots[0].frame_known = 0;
	}
	/* An atomic exchange orders the slots before the state. */
	__sync_lock_test_and_set(&own->state, FP_DEMOTE_STOPPED);
	__sync_fetch_and_add(&s->demote_stopped, 1); /* atomic: softirqs count on this CPU too */
}

/* Takes the socket out of the socket map once nothing can be redirected
 * into it any more (its peer has stopped and each of the peer's redirects
 * has landed) and its reader has read its BPF queue: deleting the entry
 * drops the psock and whatever it still holds. Its bytes then come only
 * from its peer's plain sends, behind what it has read. */
static __always_inline int try_leave_map(struct fp_sock_state *st, struct fp_demotion *own,
					 struct sock *sk, struct fp_stats *s)
{
	struct fp_sock_key key = {};
	struct fp_demotion *peer = bpf_map_lookup_elem(&demotions, &st->peer);

	/* An atomic read: the peer's slots are read after its state. */
	if (!peer || __sync_fetch_and_add(&peer->state, 0) < FP_DEMOTE_STOPPED)
		return 0;
	if (!slot_landed(&peer->slots[0]) || !slot_landed(&peer->slots[1]))
		return 0;
	if (psock_has_queue(sk))
		return 0;
	own_key(st, &key);
	bpf_map_delete_elem(&sock_map, &key);
	st->flags |= FP_DEMOTED;
	own->state = FP_DEMOTE_DONE;
	__sync_fetch_and_add(&s->demoted_sockets, 1); /* atomic: softirqs count on this CPU too */
	if (peer->state == FP_DEMOTE_DONE) {
		bpf_map_delete_elem(&demotions, &key);
		bpf_map_delete_elem(&demotions, &st->peer);
	}
	return 1;
}

/* Moves a paired socket's demotion on, if its pair is being demoted:
 * stops its redirecting, and from sock_ops (`may_leave`: sk_msg programs
 * may not delete socket map entries) takes it out of the map when safe. */
static __always_inline int advance_demotion(struct fp_sock_state *st, struct sock *sk,
					    struct fp_stats *s, int may_leave)
{
	struct fp_sock_key key = {};
	struct fp_demotion *own;

	if (!sk || !(st->flags & FP_PAIRED) || (st->flags & FP_DEMOTED))
		return 0;
	own_key(st, &key);
	own = bpf_map_lookup_elem(&demotions, &key);
	if (!own)
		return 0;
	if (!(st->flags & FP_DEMOTE_STOPPED_SELF))
		stop_redirecting(st, own, s);
	return may_leave && try_leave_map(st, own, sk, s);
}

/* Asks for the pair's demotion and stops the socket's own redirecting
 * (after the message just redirected, which its slots hold). */
static __always_inline void request_demotion(struct fp_sock_state *st, struct sock *sk,
					     struct fp_stats *s)
{
	struct fp_demotion requested = { .state = FP_DEMOTE_REQUESTED };
	struct fp_sock_key key = {};

	own_key(st, &key);
	if (bpf_map_update_elem(&demotions, &key, &requested, BPF_NOEXIST) &&
	    !bpf_map_lookup_elem(&demotions, &key))
		return;
	bpf_map_update_elem(&demotions, &st->peer, &requested, BPF_NOEXIST);
	__sync_fetch_and_add(&s->demote_requested, 1); /* atomic: softirqs count on this CPU too */
	advance_demotion(st, sk, s, 0);
}

/* sock_ops, on a segment a paired socket sent or received: its peer's
 * plain bytes, its acknowledgements of them, its own plain bytes once it
 * has stopped redirecting. A socket that left the map is watched no more. */
static __always_inline void on_paired_segment(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct fp_sock_state *st;
	struct fp_stats *s;

	if (!demote_after_msgs || !sk)
		return;
	st = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	s = this_cpu_stats();
	if (st && s && advance_demotion(st, (struct sock *)bpf_skc_to_tcp_sock(sk), s, 1))
		bpf_sock_ops_cb_flags_set(skops, 0);
}

SEC("sockops")
int fp_sock_ops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		on_connect_or_listen(skops, 1);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		on_connect_or_listen(skops, 0);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		on_established(skops, 0);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		on_established(skops, 1);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		on_connect_side_segment(skops, skops->skb_len, 0);
		on_paired_segment(skops);
		break;
	case BPF_SOCK_OPS_PARSE_HDR_OPT_CB:
		on_connect_side_segment(skops, 0, incoming_payload(skops));
		on_paired_segment(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		on_state_change(skops);
		break;
	}
	return 1;
}

/* How an sk_msg verdict ended, for the counters. */
enum msg_outcome { MSG_PASSED, MSG_REDIRECTED, MSG_DIRECT, MSG_DROPPED };

/* Counts a message (st: its socket's state, to count its bytes sent around
 * TCP; NULL not to) and lets it go where the verdict sent it. */
static __always_inline int count_msg(struct fp_stats *s, struct fp_sock_state *st,
				     enum msg_outcome outcome, __u32 size)
{
	if (st && (outcome == MSG_REDIRECTED || outcome == MSG_DIRECT))
		st->bytes_redirected += size;
	switch (outcome) {
	case MSG_DROPPED:
		return SK_DROP;
	case MSG_REDIRECTED:
		s->msgs_redirected += 1;
		s->bytes_redirected += size;
		break;
	case MSG_DIRECT:
		s->fwd_direct_msgs += 1;
		s->fwd_direct_bytes += size;
		break;
	default:
		s->msgs_passed += 1;
		s->bytes_passed += size;
	}
	return SK_PASS;
}

/* The socket's own key, from the peer key it keeps. */
static __always_inline void own_key(const struct fp_sock_state *st, struct fp_sock_key *key)
{
	__builtin_memcpy(key->local_ip, st->peer.remote_ip, sizeof(key->local_ip));
	__builtin_memcpy(key->remote_ip, st->peer.local_ip, sizeof(key->remote_ip));
	key->local_port = st->peer.remote_port;
	key->remote_port = st->peer.local_port;
	key->netns_cookie = st->peer.netns_cookie;
}

/* A connecting socket about to send while its pair is undecided: the
 * decision is taken now, PLAIN unless the peer has already joined. */
static __always_inline int settle_pair(struct fp_sock_state *st, struct fp_stats *s)
{
	struct fp_sock_key key = {};
	__u64 *pair, state;

	own_key(st, &key);
	pair = bpf_map_lookup_elem(&pairs, &key);
	state = pair ? __sync_val_compare_and_swap(pair, FP_PAIR_PENDING, FP_PAIR_PLAIN)
		     : FP_PAIR_PLAIN;
	if (state == FP_PAIR_PAIRED) {
		st->flags |= FP_PAIRED;
		return 1;
	}
	/* Plain from now on; the socket leaves the map at its next
	 * outgoing segment (fp_sock_ops). */
	st->flags |= FP_FELL_BACK;
	s->peer_missing += 1;
	return 0;
}

/* Sequence numbers of a TCP socket (CO-RE). A receiver's copied_seq counts
 * the plain TCP bytes its application has read, in its peer's sequence
 * space; redirected bytes move neither. */
struct tcp_sock {
	__u32 write_seq;
	__u32 copied_seq;
	__u32 snd_nxt;
	__u32 notsent_lowat;
} __attribute__((preserve_access_index));

/* Whether `send()`s that did not pass through the sk_msg program queued
 * plain bytes on the socket since it was last known to have none the peer
 * might not have read (a send() made while connecting picks the plain send
 * path before the socket joins the map; with MSG_MORE, TCP may not even
 * have sent them yet): redirected bytes would overtake them. Redirected
 * bytes do not move write_seq. */
static __always_inline int plain_bytes_queued(struct sk_msg_md *msg, struct fp_sock_state *st)
{
	struct tcp_sock *self = bpf_skc_to_tcp_sock(msg->sk);

	return self && !(st->flags & FP_QUEUE_LIMITED) && self->write_seq != st->expected_write_seq;
}

/* The socket's state (`st`, its storage) if its messages may be
 * redirected, or NULL if they go plain. */
static __always_inline struct fp_sock_state *
paired_state_of(struct sk_msg_md *msg, struct fp_sock_state *st, struct fp_stats *s)
{
	if (!st || (st->flags & FP_FELL_BACK))
		return NULL;
	if (!(st->flags & FP_PAIRED) && !((st->flags & FP_WAITING) && settle_pair(st, s)))
		return NULL;
	if (plain_bytes_queued(msg, st)) {
		st->flags |= FP_FELL_BACK;
		s->late_plain += 1;
		return NULL;
	}
	/* Counted, not changed: a paired socket cannot leave the map without
	 * losing what is queued for it. */
	if (!(st->flags & FP_SEEN_SEND)) {
		st->flags |= FP_SEEN_SEND;
		if (file_is_blocking(msg->sk))
			s->blocking_paired += 1;
	}
	return st;
}

/* The same, looking the storage up. */
static __always_inline struct fp_sock_state *paired_state(struct sk_msg_md *msg,
							  struct fp_stats *s)
{
	if (!msg->sk)
		return NULL;
	return paired_state_of(msg, bpf_sk_storage_get(&sock_state, msg->sk, 0, 0), s);
}

/* Kernel internals read after a redirect (read-only, CO-RE relocated): the
 * socket the kernel recorded as this message's target. */
struct sk_msg {
	struct sock *sk_redir;
} __attribute__((preserve_access_index));

/* Weak: kernels before 6.2 lack these kfuncs. fp_sk_msg calls them only
 * where they exist (bpf_ksym_exists); fp_sk_msg_both needs them and then
 * fails to load (Error::KernelFeature); a strong extern would fail the
 * whole object, every mode. */
extern void *bpf_cast_to_kern_ctx(void *ctx) __ksym __weak;
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym __weak;

/* The socket this message was just redirected to. */
static __always_inline struct sock *redirect_target(struct sk_msg_md *msg)
{
	struct sk_msg *kmsg = bpf_cast_to_kern_ctx(msg);

	return kmsg->sk_redir;
}

/* Sends the message plain: an egress redirect to the sending socket itself,
 * which replaces the redirect to the peer (a verdict cannot take one back)
 * and puts the bytes into the socket's own TCP send queue, as SK_PASS
 * would. */
static __always_inline int redirect_to_self(struct sk_msg_md *msg, struct fp_sock_state *st)
{
	struct fp_sock_key key = {};

	own_key(st, &key);
	return bpf_msg_redirect_hash(msg, &sock_map, &key, 0) == SK_PASS;
}

/* A kernel word, read through a struct whose first member is one. */
struct fp_kernel_word {
	unsigned long value;
};

/* Whether the unsigned long at `word` is nonzero. Verifiers before 6.13
 * (6.12 measured) refuse to dereference a pointer to a scalar type read
 * out of a kernel struct ("invalid mem access 'scalar'"), and
 * bpf_rdonly_cast casts only to a kernel struct: so the word is read as
 * the first member of one, struct list_head's `next` (6.2 kfunc; callers
 * run only where it exists). */
static __always_inline int kernel_word_set(unsigned long *word)
{
	struct fp_kernel_word *w =
		bpf_rdonly_cast(word, bpf_core_type_id_kernel(struct list_head));

	return w->value != 0;
}

/* Whether the kernel's TCP memory is under pressure: above its threshold
 * (tcp_mem[1]), or the kernel's flag still set (it stays set until use
 * falls below tcp_mem[0]). Past the hard limit, charging new bytes to a
 * socket fails, and under the flag so does charging a socket that holds
 * more than its share of tcp_mem[2]: a redirect into such a socket then
 * fails the sender's send() with ENOMEM (measured before the flag was
 * read: 51 of 1,000 both-mode 64 KiB uploads, TCP memory below tcp_mem[1]
 * at the end). */
static __always_inline int tcp_memory_under_pressure(struct sock *sk)
{
	struct proto *prot = sk->__sk_common.skc_prot;

	if (prot->memory_pressure && kernel_word_set(prot->memory_pressure))
		return 1;
	return tcp_memory_pressure_pages &&
	       *prot->memory_allocated > (long)tcp_memory_pressure_pages;
}

/* Whether `sk` is one of a proxy's forwarded sockets (its cookie, made when
 * forward() read it, has a fwd_dirs entry). */
static __always_inline int is_forwarded(struct sock *sk)
{
	__u64 cookie = sk->__sk_common.skc_cookie.counter;

	return cookie && bpf_map_lookup_elem(&fwd_dirs, &cookie);
}

/* The receive-queue bound, for a message just redirected to its local peer
 * (receive_queue_limit set, and the kfuncs that show the target exist).
 * Above the limit the message goes plain instead and so do the next ones,
 * where TCP's flow control pushes back on the sender; the peer reads its
 * BPF queue before its TCP queue, so the order holds. Redirecting resumes
 * once the peer holds at most half the limit and has read every plain byte
 * (its copied_seq has reached the sender's write_seq): nothing plain can
 * then be overtaken. Redirected bytes are charged to the receiver's
 * sk_rmem_alloc from 6.12.8 on; before, it counts only its TCP queue and
 * the bound never acts (probe(): receive queue bound).
 * `peer_may_be_forwarded` (both mode): into a proxy's forwarded socket
 * the bound applies too, but a sender past it stays plain for good: its
 * plain bytes reach the forwarding program, which takes them off the TCP
 * queue (so the peer's copied_seq says nothing about them) and keeps them
 * behind the queued ones, where they may wait unseen in the socket's own
 * backlog (kept_bytes_wait). */
static __always_inline enum msg_outcome bound_receive_queue(struct sk_msg_md *msg,
							    struct fp_sock_state *st,
							    struct fp_stats *s,
							    int peer_may_be_forwarded)
{
	struct sock *target = redirect_target(msg);
	__u32 held = target->sk_backlog.rmem_alloc.counter;
	int pressure = tcp_memory_under_pressure(target);
	int forwarded = peer_may_be_forwarded && is_forwarded(target);
	struct tcp_sock *self, *peer;

	if (!(st->flags & FP_QUEUE_LIMITED)) {
		if (held <= receive_queue_limit && !pressure)
			return MSG_REDIRECTED;
		st->flags |= FP_QUEUE_LIMITED;
		s->queue_limit_fallbacks += 1;
	} else if (!forwarded && held <= receive_queue_limit / 2 && !pressure) {
		self = bpf_skc_to_tcp_sock(msg->sk);
		peer = bpf_rdonly_cast(target, bpf_core_type_id_kernel(struct tcp_sock));
		if (self && peer->copied_seq == self->write_seq) {
			st->flags &= ~FP_QUEUE_LIMITED;
			st->expected_write_seq = self->write_seq;
			s->queue_limit_resumed += 1;
			return MSG_REDIRECTED;
		}
	}
	if (redirect_to_self(msg, st))
		return MSG_PASSED;
	/* Cannot happen while the socket is open (it is in the map); were it
	 * to, the message would overtake plain bytes: fail the send instead. */
	s->queue_limit_dropped += 1;
	return MSG_DROPPED;
}

/* Redirects the message into its local peer's receive queue, within
 * receive_queue_limit. On a miss the chunk goes plain, and so must every
 * later one, or it could overtake this one. `peer_may_be_forwarded`: see
 * bound_receive_queue. */
static __always_inline enum msg_outcome redirect_to_peer(struct sk_msg_md *msg,
							 struct fp_sock_state *st,
							 struct fp_stats *s,
							 int peer_may_be_forwarded)
{
	if (bpf_msg_redirect_hash(msg, &sock_map, &st->peer, BPF_F_INGRESS) != SK_PASS) {
		st->flags |= FP_FELL_BACK;
		s->peer_missing += 1;
		return MSG_PASSED;
	}
	if (!receive_queue_limit || !bpf_ksym_exists(bpf_cast_to_kern_ctx))
		return MSG_REDIRECTED;
	return bound_receive_queue(msg, st, s, peer_may_be_forwarded);
}

/* Streaming demotion, before the verdict: the current thread's earlier
 * redirect from the socket has landed (also in its published record, once
 * it has stopped redirecting). */
static __always_inline void demotion_before_verdict(struct fp_sock_state *st)
{
	struct fp_sock_key key = {};
	struct fp_demotion *own;

	if (!st || !(st->flags & FP_PAIRED) || (st->flags & FP_DEMOTED))
		return;
	forget_own_redirect(st->slots);
	if (!(st->flags & FP_DEMOTE_STOPPED_SELF))
		return;
	own_key(st, &key);
	own = bpf_map_lookup_elem(&demotions, &key);
	if (own)
		forget_own_redirect(own->slots);
}

/* Streaming demotion, after a redirect: records it, and asks for the
 * pair's demotion after demote_after_msgs small messages in a row that
 * found the peer's queue still holding earlier ones (streaming, where a
 * request/response peer would have read the request before replying). */
static __always_inline void demotion_after_redirect(struct sk_msg_md *msg,
						    struct fp_sock_state *st, struct fp_stats *s)
{
	record_redirect(st, s);
	if (msg->size <= demote_max_msg_size && psock_has_queue(redirect_target(msg)))
		st->streak += 1;
	else
		st->streak = 0;
	if (st->streak >= demote_after_msgs)
		request_demotion(st, (struct sock *)bpf_skc_to_tcp_sock(msg->sk), s);
}

SEC("sk_msg")
int fp_sk_msg(struct sk_msg_md *msg)
{
	struct fp_sock_state *st;
	struct fp_stats *s = this_cpu_stats();
	enum msg_outcome outcome;

	if (!s || !msg->sk)
		return SK_PASS;
	/* One storage lookup per message, for both steps. */
	st = bpf_sk_storage_get(&sock_state, msg->sk, 0, 0);
	if (demote_after_msgs)
		demotion_before_verdict(st);
	st = paired_state_of(msg, st, s);
	outcome = st ? redirect_to_peer(msg, st, s, 0) : MSG_PASSED;
	if (demote_after_msgs && st && outcome == MSG_REDIRECTED)
		demotion_after_redirect(msg, st, s);
	/* No per-socket byte count here: only both mode's Forwarding reads it. */
	return count_msg(s, NULL, outcome, msg->size);
}

/* Both mode. Kernel internals read (read-only, CO-RE relocated): the
 * redirect target's psock (sk_user_data, tagged in its low bits) for its
 * receive queue, and its send buffer use. */
struct sk_buff_head {
	__u32 qlen;
} __attribute__((preserve_access_index));
struct sk_psock {
	struct list_head ingress_msg;
	struct sk_buff_head ingress_skb;
} __attribute__((preserve_access_index));

#define SK_USER_DATA_PTRMASK 7UL

/* A socket's psock: its sk_user_data, tagged in the low bits (0: none). */
static __always_inline unsigned long psock_address(struct sock *sk)
{
	return (unsigned long)sk->sk_user_data & ~SK_USER_DATA_PTRMASK;
}

/* Whether messages wait in a socket's own psock receive queue (redirected
 * into it with BPF_F_INGRESS, or passed by its stream verdict). The list
 * itself, not the psock's msg_tot_len: that byte count came with the 2026
 * sockmap FIONREAD change and is missing from kernels without it (mainline
 * 6.10-6.17, older stable releases), where reading it fails the load. */
static __always_inline int psock_has_queue(struct sock *sk)
{
	unsigned long data = psock_address(sk);
	struct sk_psock *psock;

	if (!data)
		return 1; /* no psock: treat as busy, stay on the queue path */
	psock = bpf_rdonly_cast((void *)data, bpf_core_type_id_kernel(struct sk_psock));
	/* An empty list_head points at itself. */
	return (unsigned long)psock->ingress_msg.next !=
	       data + bpf_core_field_offset(struct sk_psock, ingress_msg);
}

/* Segments waiting in a socket's psock backlog: bytes redirected to it for
 * sending (the backlog work sends them when its send buffer has room), and
 * bytes its own verdict passed while that backlog was busy. */
static __always_inline __u32 psock_backlog_len(struct sock *sk)
{
	unsigned long data = psock_address(sk);
	struct sk_psock *psock;

	if (!data)
		return 0;
	psock = bpf_rdonly_cast((void *)data, bpf_core_type_id_kernel(struct sk_psock));
	return psock->ingress_skb.qlen;
}

/* The socket's TCP_NOTSENT_LOWAT: its own, else its namespace's sysctl
 * (default: no limit, UINT_MAX). */
static __always_inline __u32 notsent_lowat(struct sock *sk, struct tcp_sock *tp)
{
	__u32 own = tp->notsent_lowat;

	return own ? own : sk->__sk_common.skc_net.net->ipv4.sysctl_tcp_notsent_lowat;
}

/* Whether the socket this message was just redirected to (without
 * BPF_F_INGRESS) takes `size` more bytes at once: none of the conditions
 * under which tcp_sendmsg would wait for room. Sent there anyway, the
 * message could (1) make the sender wait on a socket it does not own, which
 * hangs if the proxy dies meanwhile, or, for a non-blocking sender, (2) be
 * refused after the program counted it as forwarded, so the pair would
 * wait forever for bytes that never come before passing the FIN on, and
 * (3) leave bytes the refused push queued unsent: with TCP_NOTSENT_LOWAT
 * nothing pushes them again, and every later send is refused (measured:
 * a non-blocking client looped on EAGAIN for good). So: send-buffer room
 * with a margin for per-buffer overhead, unsent bytes staying under the
 * socket's notsent_lowat, and no TCP memory pressure. */
static __always_inline int redirect_target_has_room(struct sk_msg_md *msg, __u32 size)
{
	struct sock *sk = redirect_target(msg);
	struct tcp_sock *tp = bpf_rdonly_cast(sk, bpf_core_type_id_kernel(struct tcp_sock));
	__u32 unsent = tp->write_seq - tp->snd_nxt;

	if ((__s64)sk->sk_wmem_queued + 2 * (__s64)size > (__s64)sk->sk_sndbuf)
		return 0;
	if ((__u64)unsent + size >= notsent_lowat(sk, tp))
		return 0;
	return !tcp_memory_under_pressure(sk);
}

/* Whether the upstream socket of `pair` is itself paired with a local
 * server, or waiting to be: its own sends (the bytes Forwarding copies) are
 * then redirected into that server's queue, which the server reads before
 * its TCP queue, so a direct send through its TCP path could be read after
 * later bytes. Read from the socket's fwd_dirs entry (on_shortcut), which
 * forward() sets from the socket's state and fp_sock_ops clears when the
 * pairing is refused: once a socket has left the map it never pairs again,
 * so a direct send is never followed by the socket pairing. (Not from the
 * socket's storage: the socket is known here only through
 * bpf_cast_to_kern_ctx, and verifiers that mark pointers read through it
 * untrusted refuse them to bpf_sk_storage_get.) No entry counts as on the
 * shortcut. */
static __always_inline int upstream_on_shortcut(const struct fp_proxy_pair *pair)
{
	struct fp_fwd_dir *up = bpf_map_lookup_elem(&fwd_dirs, &pair->up_cookie);

	return !up || up->on_shortcut;
}

/* Both mode: like fp_sk_msg, except that a message to a proxy's forwarded
 * downstream socket leaves straight through the paired upstream socket when
 * (1) nothing waits in the downstream socket's queue: Forwarding
 * (src/forward.rs) copies queued bytes upstream and consumes them only
 * after they are written, so an empty queue means nothing sent earlier can
 * be overtaken; (2) the upstream socket has room, so the sender never
 * waits on a socket it does not own; and (3) the upstream socket is not
 * paired (or waiting to pair) with a local server itself (see
 * upstream_on_shortcut). Otherwise it joins the queue, within
 * receive_queue_limit: past it the sender goes plain for good, and the
 * forwarding program keeps its bytes behind the queued ones, charged to
 * the downstream socket, whose TCP window then pushes back. Every other
 * redirect (the downstream socket's bytes to its application, ordinary
 * pairs) is bounded as in fp_sk_msg. */
SEC("sk_msg")
int fp_sk_msg_both(struct sk_msg_md *msg)
{
	struct fp_proxy_pair *pair;
	struct fp_fwd_dir *dir;
	struct fp_sock_state *st;
	struct fp_stats *s = this_cpu_stats();
	enum msg_outcome outcome;
	__u32 size = msg->size;

	if (!s)
		return SK_PASS;
	st = paired_state(msg, s);
	if (!st)
		return count_msg(s, NULL, MSG_PASSED, size);
	pair = bpf_map_lookup_elem(&proxy_pairs, &st->peer);
	outcome = redirect_to_peer(msg, st, s, 1);
	if (!pair || outcome != MSG_REDIRECTED || psock_has_queue(redirect_target(msg)))
		return count_msg(s, st, outcome, size);
	dir = bpf_map_lookup_elem(&fwd_dirs, &pair->down_cookie);
	/* A failed redirect leaves the message redirected to the peer. */
	if (!dir || bpf_msg_redirect_hash(msg, &fwd_map, &pair->up_cookie, 0) != SK_PASS)
		return count_msg(s, st, MSG_REDIRECTED, size);
	if (!redirect_target_has_room(msg, size) || upstream_on_shortcut(pair)) {
		outcome = redirect_to_peer(msg, st, s, 1);
		/* Queued, or sent plain past the queue's bound (a miss falls
		 * through: see below). */
		if (outcome != MSG_PASSED || !(st->flags & FP_FELL_BACK))
			return count_msg(s, st, outcome, size);
	}
	/* Room upstream, or the peer left the map between the two redirects:
	 * a redirect that misses leaves the upstream socket as the target, so
	 * the message leaves there and is counted so (the socket sends plain
	 * from then on, behind it). Counted as forwarded from the downstream
	 * side (as direct: sent synchronously, unlike the forwarding
	 * program's bytes). */
	__sync_fetch_and_add(&dir->direct, size);
	return count_msg(s, st, MSG_DIRECT, size);
}

struct sk_buff {
	struct sock *sk;
	char cb[48];
} __attribute__((preserve_access_index));

/* The receiving socket (needs the kfunc, 6.2; NULL before). */
static __always_inline struct sock *receiving_socket(struct __sk_buff *skb)
{
	struct sk_buff *kskb;

	if (!bpf_ksym_exists(bpf_cast_to_kern_ctx))
		return 0;
	kskb = bpf_cast_to_kern_ctx(skb);
	return kskb->sk;
}

/* The most bpf_skb_adjust_room takes off an sk_skb segment at once, and
 * how many such steps cover the largest segment a verdict sees: 64 KiB as
 * sent on loopback, but a busy receiver coalesces segments up to 17 page
 * fragments of 32 KiB plus the head (about 576 KiB), and the repeated part
 * can be one such segment. */
#define TRIM_STEP 4095
#define TRIM_STEPS 145

/* What the segment repeats of the bytes this direction already took, cut
 * off its head. TCP queues a segment that starts before its next expected
 * byte whole (a retransmission overlapping bytes that arrived out of
 * order) and tcp_recvmsg skips the repeated part by offset, but the kernel
 * hands a stream verdict whole segments: forwarded or kept as they are,
 * the repeated bytes would reach the peer twice (measured: one 64 KiB
 * segment twice in about 1 of 10 runs of 18 stalled connections). Reads
 * TCP's sequence number from the segment's control block (the kfunc, 6.2;
 * nothing is checked before). Returns the bytes left: 0 if the segment
 * only repeats, or its length unchanged where the trim failed (counted in
 * neither counter; not expected: pulling 4 KiB off the head). */
static __always_inline __u32 trim_repeated(struct __sk_buff *skb, struct fp_fwd_dir *dir, __u32 len)
{
	struct sk_buff *kskb;
	__u32 seq, next, overlap, step;
	int i;

	if (!bpf_ksym_exists(bpf_cast_to_kern_ctx))
		return len;
	kskb = bpf_cast_to_kern_ctx(skb);
	seq = *(__u32 *)kskb->cb; /* TCP_SKB_CB(skb)->seq */
	next = (__u32)dir->next_seq;
	if (!(dir->next_seq & FP_SEQ_KNOWN) || (__s32)(seq - next) >= 0) {
		dir->next_seq = FP_SEQ_KNOWN | (__u32)(seq + len);
		return len;
	}
	overlap = next - seq;
	COUNT(fwd_overlaps, 1);
	if (overlap >= len) {
		COUNT(fwd_overlap_bytes, len);
		return 0;
	}
	for (i = 0; i < TRIM_STEPS && overlap; i++) {
		step = overlap < TRIM_STEP ? overlap : TRIM_STEP;
		if (bpf_skb_adjust_room(skb, -(__s32)step, 0, 0))
			break;
		overlap -= step;
		COUNT(fwd_overlap_bytes, step);
	}
	dir->next_seq = FP_SEQ_KNOWN | (__u32)(seq + len);
	return skb->len;
}

/* Whether bytes an earlier verdict kept on the receiving socket still wait
 * for Forwarding to copy them: its own psock queue holds messages (on
 * kernels before 6.2 this cannot be read, and segments that arrive while
 * forward() is between its two inserts can still be overtaken), a segment
 * was once kept while its own backlog was busy and that backlog still
 * holds anything (such segments wait there, unseen, and the backlog lets
 * go of one only after putting it in the queue), or fewer bytes were
 * copied than kept. The count alone misses unseen segments in both mode,
 * where the copy also takes an application's bytes queued on the socket
 * (without the backlog check, 3 of 9 runs of
 * tests/both.rs::an_upload_finished_while_its_download_stalls_arrives_whole
 * reordered the upload); in egress mode it is exact, and the check would
 * only keep segments the program could forward. */
static __always_inline int kept_bytes_wait(struct sock *sk, struct fp_fwd_dir *dir, __u64 cookie)
{
	__u64 *copied;

	if (sk && psock_has_queue(sk))
		return 1;
	if (apps_queue_on_forwarded && sk && dir->unseen && psock_backlog_len(sk))
		return 1;
	if (!dir->kept) /* nothing ever kept: no lookup per segment */
		return 0;
	copied = bpf_map_lookup_elem(&fwd_copied, &cookie);
	return dir->kept > (copied ? *copied : 0);
}

/* Counts a segment the verdict leaves on the receiving socket `sk` for
 * Forwarding to copy; kept while `sk`'s own backlog is busy, it waits
 * there unseen (fp_fwd_dir.unseen). */
static __always_inline void keep(struct sock *sk, struct fp_fwd_dir *dir, __u32 len)
{
	if (sk && psock_backlog_len(sk)) {
		COUNT(fwd_kept_unseen, 1);
		__sync_fetch_and_add(&dir->unseen, 1);
	}
	__sync_fetch_and_add(&dir->kept, len);
}

/* Whether the peer's psock backlog holds fwd_backlog_limit segments or
 * more: its receiver is not keeping up (6.2 kfuncs; never before). */
static __always_inline int peer_backlog_full(struct fp_fwd_dir *dir)
{
	struct bpf_sock *peer;
	__u32 queued;

	if (!fwd_backlog_limit || !bpf_ksym_exists(bpf_rdonly_cast))
		return 0;
	peer = bpf_map_lookup_elem(&fwd_map, &dir->peer_cookie);
	if (!peer)
		return 0;
	queued = psock_backlog_len(bpf_rdonly_cast(peer, bpf_core_type_id_kernel(struct sock)));
	bpf_sk_release(peer);
	return queued >= fwd_backlog_limit;
}

SEC("sk_skb/stream_verdict")
int fp_fwd_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct fp_fwd_dir *dir = bpf_map_lookup_elem(&fwd_dirs, &cookie);
	__u32 len = skb->len;
	struct sock *sk;

	/* An empty skb (a bare FIN; TCP has already recorded the FIN itself)
	 * carries no byte: drop it. Redirected, or passed while forwarded bytes
	 * wait in this socket's backlog, it makes the backlog "send" 0 bytes,
	 * which skmsg treats as a broken pipe: EPIPE, and transmission stops
	 * with bytes still queued. Forwarding::wait passes the half-close on. */
	if (len == 0)
		return SK_DROP;
	/* No peer (it closed, or the pair is not set up: forward() inserts
	 * one socket, then the other): the bytes stay with this socket, and
	 * Forwarding::wait copies them to the peer. */
	if (!dir) {
		COUNT(fwd_unpaired, 1);
		return SK_PASS;
	}
	len = trim_repeated(skb, dir, len);
	if (!len)
		return SK_DROP;
	sk = receiving_socket(skb);
	/* Bytes an earlier verdict kept here wait for that copy: later ones
	 * queue behind them, or they would overtake them. */
	if (kept_bytes_wait(sk, dir, cookie)) {
		COUNT(fwd_queued_behind, 1);
		keep(sk, dir, len);
		return SK_PASS;
	}
	/* The peer's receiver is not keeping up: keep the segment here, charged
	 * to this socket's receive memory, so TCP's window closes on the sender
	 * as it would in front of a proxy that stopped reading. Forwarding
	 * copies it once the peer's backlog has sent what came before. Only
	 * while this socket's own backlog is idle: a segment passed behind
	 * the other direction's bytes waits there unseen until they are sent,
	 * and would tie this direction to that one's receiver. */
	if (peer_backlog_full(dir)) {
		if (sk && psock_backlog_len(sk) == 0) {
			COUNT(fwd_backlog_kept, 1);
			keep(sk, dir, len);
			return SK_PASS;
		}
		COUNT(fwd_backlog_overrun, 1);
	}
	if (bpf_sk_redirect_hash(skb, &fwd_map, &dir->peer_cookie, 0) != SK_PASS) {
		COUNT(fwd_unpaired, 1);
		return SK_PASS;
	}
	/* Counted before the peer sends them: Forwarding::wait compares this
	 * with what reached the peer's send queue before it passes a FIN on. */
	__sync_fetch_and_add(&dir->bytes, len);
	COUNT(fwd_segments, 1);
	COUNT(fwd_bytes, len);
	return SK_PASS;
}

/* Both mode, on the cgroup: answers getsockopt(FP_SOL_FASTPATH,
 * FP_SO_BACKLOG_LEN) with the socket's psock backlog length (see
 * fastpath.h); every other getsockopt is left as the kernel answered it.
 * Runs for the sockets of the cgroup, which is where a both-mode proxy's
 * accelerated sockets are. */
SEC("cgroup/getsockopt")
int fp_backlog_query(struct bpf_sockopt *ctx)
{
	__u32 *len = ctx->optval;

	if (ctx->level != FP_SOL_FASTPATH || ctx->optname != FP_SO_BACKLOG_LEN) {
		/* The program sees at most a page of a larger buffer: 0 tells
		 * the kernel to keep its own answer (else it logs that it did). */
		if (ctx->optlen > 4096)
			ctx->optlen = 0;
		return 1;
	}
	if ((void *)(len + 1) > ctx->optval_end || !ctx->sk)
		return 1; /* too short a buffer: the kernel's error stands */
	*len = psock_backlog_len(bpf_rdonly_cast(ctx->sk, bpf_core_type_id_kernel(struct sock)));
	ctx->optlen = sizeof(*len);
	/* Two stores: merged into one 8-byte store, the verifier refuses it. */
	asm volatile("" ::: "memory");
	ctx->retval = 0;
	return 1;
}

/* Set before load (splice_guard.rs, from /proc/kallsyms): [start, end)
 * addresses of the kernel functions a splice read passes through (do_splice
 * and the functions below it, whichever this kernel has); zero pairs are
 * unused. */
const volatile __u64 splice_read_text[2 * FP_SPLICE_READ_FUNCTIONS] = {};

/* How many return addresses of the kernel stack are looked at: the splice
 * read function is a few frames above this program (the LSM trampoline,
 * security_file_permission, rw_verify_area, then do_splice on 6.7+). */
#define SPLICE_STACK_FRAMES 16

/* Whether the current kernel stack passes through a splice read: how an
 * io_uring IORING_OP_SPLICE is told apart from an IORING_OP_READ, which
 * reaches this hook too (both run in an io_uring worker, with no splice
 * syscall number to see). */
static __always_inline int called_from_splice_read(void *ctx)
{
	__u64 frames[SPLICE_STACK_FRAMES] = {};
	long copied = bpf_get_stack(ctx, frames, sizeof(frames), 0);
	int i, j;

	for (i = 0; i < SPLICE_STACK_FRAMES; i++) {
		if ((long)(i * sizeof(__u64)) >= copied)
			break;
		for (j = 0; j < FP_SPLICE_READ_FUNCTIONS; j++) {
			__u64 start = splice_read_text[2 * j], end = splice_read_text[2 * j + 1];

			if (start && frames[i] >= start && frames[i] < end)
				return 1;
		}
	}
	return 0;
}

SEC("lsm/file_permission")
int BPF_PROG(fp_splice_guard, struct file *file, int mask, int ret)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct fp_sock_state *st;
	struct pt_regs *regs;
	struct socket *sock;
	unsigned long nr;
	struct fp_splice_exclusion *caught;
	__u64 started;
	__u32 tgid;
	int splicing, in_io_uring;

	if (ret || !(mask & MAY_READ))
		return ret;
	/* Only reads made by splice(2) or sendfile(2): read(2) passes here too.
	 * In io_uring the syscall says nothing; the kernel stack does, looked
	 * at below only for accelerated sockets (it costs a stack walk). */
	regs = (struct pt_regs *)bpf_task_pt_regs(task);
	nr = SYSCALL_NR(regs);
	splicing = IN_COMPAT_SYSCALL(task, regs) ? IS_COMPAT_SPLICE(nr)
					   : nr == NR_SPLICE || nr == NR_SENDFILE;
	in_io_uring = (task->flags & PF_IO_WORKER) || nr == NR_IO_URING_ENTER;
	if (!splicing && !in_io_uring)
		return 0;
	sock = bpf_sock_from_file(file);
	if (!sock || !sock->sk)
		return 0;
	st = bpf_sk_storage_get(&sock_state, sock->sk, 0, 0);
	if (!st || !(st->flags & FP_ACCELERATED))
		return 0;
	if (!splicing && !called_from_splice_read(ctx))
		return 0;

	tgid = bpf_get_current_pid_tgid() >> 32;
	started = task->group_leader->start_boottime;
	caught = bpf_map_lookup_elem(&splice_excluded, &tgid);
	if (caught && caught->owner_started == started) {
		__sync_fetch_and_add(&caught->times, 1);
	} else {
		/* New, or left by an exited process whose pid this one reuses. */
		struct fp_splice_exclusion fresh = { .owner_started = started, .times = 1 };

		bpf_map_update_elem(&splice_excluded, &tgid, &fresh, BPF_ANY);
	}
	if (st->flags & FP_ACCEPTED) {
		struct fp_sock_key own = {}, service = {};
		__u64 *times, first = 1;

		own_key(st, &own);
		service_of(&own, &service);
		times = bpf_map_lookup_elem(&splice_excluded_services, &service);
		if (times)
			__sync_fetch_and_add(times, 1);
		else
			bpf_map_update_elem(&splice_excluded_services, &service, &first, BPF_ANY);
	}
	COUNT(splice_blocked, 1);
	return -EINVAL;
}

/* The smallest LSM program, loaded only when fp_splice_guard failed to load:
 * if this one loads, the kernel takes LSM programs and the guard itself
 * failed to verify (a bug to report, not a missing kernel feature). */
SEC("lsm/file_permission")
int BPF_PROG(fp_lsm_canary, struct file *file, int mask, int ret)
{
	return ret;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
