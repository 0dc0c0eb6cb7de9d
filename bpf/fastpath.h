/* SPDX-License-Identifier: (MIT OR GPL-2.0-only) */
/*
 * Types shared by the BPF programs and the Rust side (src/abi.rs).
 * Every struct here has a #[repr(C)] twin in src/abi.rs; the unit test
 * `abi::tests::layouts_match_bpf_object` compares sizes and field offsets
 * against the BTF of the compiled object, so a change on one side only
 * fails the tests.
 */
#ifndef FASTPATH_H
#define FASTPATH_H

#include <linux/types.h>

#define FP_COMM_LEN 16

/* Fixed map sizes, the one definition of each limit: the Rust side
 * refuses larger inputs before load with these numbers (src/abi.rs, whose
 * test checks them against this header and the compiled object). */
#define FP_MAX_PORTS 1024
#define FP_MAX_CIDRS 1024
#define FP_MAX_COMMS 256
#define FP_MAX_GROUPED_NAMESPACES 256
#define FP_MAX_SPLICE_EXCLUDED 4096
/* Kernel functions whose addresses the splice guard looks for on the stack
 * (src/splice_guard.rs: SPLICE_READ_FUNCTIONS). */
#define FP_SPLICE_READ_FUNCTIONS 8

/* One TCP endpoint, seen from the socket that owns it. IPv4 addresses are
 * stored as IPv4-mapped IPv6 (::ffff:a.b.c.d) so that an IPv4 client of a
 * dual-stack listener finds its peer. The netns cookie keeps identical
 * 4-tuples in different network namespaces apart (for namespaces in one
 * namespace group it is the group's shared id, see src/netns.rs). */
struct fp_sock_key {
	__u32 local_ip[4];  /* network byte order */
	__u32 remote_ip[4]; /* network byte order */
	__u32 local_port;   /* host byte order */
	__u32 remote_port;  /* host byte order */
	__u64 netns_cookie;
};

/* Counters, one copy per CPU; the Rust side sums them. */
struct fp_stats {
	__u64 msgs_redirected;  /* sendmsg chunks moved by the shortcut */
	__u64 bytes_redirected;
	__u64 msgs_passed;      /* chunks of accelerated sockets sent as plain TCP */
	__u64 bytes_passed;
	__u64 peer_missing;     /* of those: peer not in the map (sticky fallback) */
	__u64 sockets_inserted; /* sockets added to the socket map */
	__u64 insert_failed;    /* map full or other insert error: plain TCP */
	__u64 policy_skipped;   /* established sockets the policy did not select */
	__u64 late_skipped;     /* selected, but data moved before insertion */
	__u64 splice_blocked;   /* splice reads refused with EINVAL */
	__u64 splice_excluded;  /* sockets kept plain: their owner (or, accepted,
				 * their service) was caught splicing */
	__u64 fwd_segments;     /* egress mode: received segments forwarded */
	__u64 fwd_bytes;
	__u64 fwd_unpaired;     /* received with no peer to forward to */
	__u64 fwd_direct_msgs;  /* both mode: an application's messages sent */
	__u64 fwd_direct_bytes; /* straight out of a forwarded upstream socket */
	__u64 unpaired_skipped; /* accepted sockets kept out: peer not on the shortcut */
	__u64 unpaired_removed; /* sockets taken out of the map: peer never paired */
	__u64 late_plain;       /* plain bytes queued before insertion left a paired
				 * socket: it sends plain from then on */
	__u64 blocking_skipped; /* connecting sockets kept plain: blocking at connect() */
	__u64 blocking_paired;  /* paired sockets found blocking at their first send */
	__u64 queue_limit_fallbacks; /* paired sockets that went plain: their peer
				      * held more than receive_queue_limit */
	__u64 queue_limit_resumed;   /* of those, back on the shortcut: the peer
				      * drained and read every plain byte */
	__u64 queue_limit_dropped;   /* sends failed: could go neither way (never
				      * expected) */
	__u64 fwd_queued_behind;     /* egress/both: received segments kept behind
				      * bytes waiting to be copied by Forwarding */
	__u64 fwd_backlog_kept;      /* egress: received segments kept on the
				      * receiving socket (for Forwarding to copy)
				      * because the peer's backlog was full */
	__u64 fwd_backlog_overrun;   /* egress: forwarded into a full backlog anyway:
				      * the receiving socket's own backlog was busy
				      * (bytes kept there would be hidden) */
	__u64 fwd_kept_unseen;       /* of the segments kept behind, those kept
				      * while the receiving socket's own backlog
				      * was busy: they wait there, unseen by
				      * reads, until it reaches them */
	__u64 fwd_overlaps;          /* segments that began before bytes the
				      * verdict had already taken (TCP queues a
				      * partly retransmitted segment whole) */
	__u64 fwd_overlap_bytes;     /* the bytes trimmed off them */
	__u64 demote_requested;      /* streaming demotion: pairs a socket asked
				      * to leave the shortcut */
	__u64 demote_stopped;        /* sockets of those that stopped redirecting
				      * (their later messages go plain) */
	__u64 demoted_sockets;       /* sockets that then left the socket map:
				      * nothing could still be redirected into
				      * them and their queue was read */
	__u64 demote_unprovable;     /* sockets more threads redirected from at
				      * once than their record holds: they
				      * never leave the map */
};

/* Egress mode: one direction of a forwarded pair, keyed by the socket
 * cookie of the receiving socket. */
struct fp_fwd_dir {
	__u64 peer_cookie; /* where bytes received here are sent */
	__u64 bytes;       /* bytes the forwarding program sent on so far:
			    * queued to the peer's psock backlog, which sends
			    * them later (asynchronously) */
	__u64 direct;      /* both mode: an application's bytes sent straight
			    * out of the peer, inside the application's send()
			    * (as let through: the peer may refuse some) */
	__u64 kept;        /* bytes the forwarding program left in the receiving
			    * socket's own queue for Forwarding to copy (behind
			    * earlier ones, or while the peer's backlog is full) */
	__u64 next_seq;    /* FP_SEQ_KNOWN | the TCP sequence number after the
			    * last byte the verdict took in this direction */
	__u64 on_shortcut; /* both mode: 1 while the receiving socket is paired,
			    * or waiting to pair, with a local peer of its own
			    * (its sends then go into that peer's queue). Set by
			    * forward() from the socket's state, cleared by
			    * fp_sock_ops when the pairing is refused; it never
			    * turns on again (a socket pairs only when it is
			    * established, before forward() sees it). */
	__u64 unseen;      /* segments kept while the receiving socket's own
			    * psock backlog was busy (sending the other
			    * direction): they wait in that backlog, where no
			    * read sees them, until it reaches them. Once one
			    * was, in both mode nothing in this direction may
			    * overtake that backlog while it holds anything (in
			    * egress mode the kept-byte count is exact). */
};

/* fp_fwd_dir.next_seq holds a sequence number. */
#define FP_SEQ_KNOWN (1ULL << 32)

/* Both mode: a forwarded pair whose downstream socket's local peer (an
 * application in the same cgroup) may send straight out of the upstream
 * socket. Keyed by the downstream socket's fp_sock_key, which is what the
 * application's socket holds as its peer key. */
struct fp_proxy_pair {
	__u64 down_cookie; /* the proxy's downstream socket */
	__u64 up_cookie;   /* the proxy's upstream socket, in fwd_map */
};

/* Both mode: getsockopt(fd, FP_SOL_FASTPATH, FP_SO_BACKLOG_LEN, &u32)
 * on an accelerated socket reads how many segments wait in its psock
 * backlog (fp_backlog_query). A segment leaves that queue only after the
 * backlog has sent all of it, and a send redirected to a local peer is
 * counted at its verdict but queued there after the socket lock is let
 * go: Forwarding may write bytes of its own to the socket only once the
 * count says every forwarded byte was sent and this says none is in the
 * middle of it. */
#define FP_SOL_FASTPATH 0x46504654 /* "FPFT": a level no protocol uses */
#define FP_SO_BACKLOG_LEN 1

/* Streaming demotion: a redirect a thread made from a socket, until it is
 * known to have landed. A redirect is queued into the peer after the
 * sender's socket lock is let go (tcp_bpf_send_verdict), inside the
 * sending thread's system call; deleting the peer's map entry before it
 * lands would lose it. It has landed once the same thread runs another
 * verdict on the socket, or once the thread's user-entry frame (the
 * registers saved at the top of its kernel stack when it entered the
 * kernel) differs from the one saved at the verdict: it has left that
 * kernel entry since. */
struct fp_redirect_slot {
	__u64 task;        /* the thread's task_struct address; 0: free */
	__u64 ip, sp, nr;  /* its user-entry frame at the verdict */
	__u32 tid;
	__u32 frame_known; /* the frame looked like a 64-bit user entry (else
			    * only the thread's next verdict tells) */
};

#define FP_REDIRECT_SLOTS 2

/* One socket's part in its pair's demotion, keyed by its fp_sock_key. */
enum fp_demote_state {
	FP_DEMOTE_REQUESTED = 1, /* its peer (or itself) asked */
	FP_DEMOTE_STOPPED   = 2, /* it redirects no more; `slots` hold its
				  * redirects that may not have landed yet */
	FP_DEMOTE_DONE      = 3, /* it has left the socket map */
};

struct fp_demotion {
	__u64 state; /* enum fp_demote_state; 64-bit for BPF's atomics */
	struct fp_redirect_slot slots[FP_REDIRECT_SLOTS];
};

/* Per-socket state in socket-local storage. */
enum fp_sock_flags {
	FP_OWNER_KNOWN = 1, /* owner_tgid/owner_comm were recorded */
	FP_ACCELERATED = 2, /* the socket is in the socket map */
	FP_FELL_BACK   = 4, /* a message went plain: never redirect again */
	FP_PAIRED      = 8, /* its peer is in the map too: redirect */
	FP_WAITING     = 16, /* connecting side, inserted, peer undecided */
	FP_BLOCKING    = 32, /* connecting side, its file blocking at connect() */
	FP_SEEN_SEND   = 64, /* paired, its first send was looked at */
	FP_QUEUE_LIMITED = 128, /* its peer held too much: sending plain until
				 * the peer has drained (receive_queue_limit) */
	FP_ACCEPTED    = 256, /* accepting side: its local address is a service */
	FP_DEMOTE_STOPPED_SELF = 512, /* streaming demotion: redirects no more */
	FP_DEMOTED     = 1024, /* streaming demotion: has left the socket map */
	FP_UNPROVABLE  = 2048, /* more threads redirected at once than `slots`
				* holds: never demoted */
};

/* Whether a connection takes the shortcut, decided once per connection in
 * the `pairs` map (keyed by the connecting side's key): the connecting
 * side is inserted first and waits; the accepting side, established
 * second, either joins (PENDING -> PAIRED) or refuses (-> PLAIN); a
 * connecting side that must send before that goes plain (-> PLAIN). The
 * compare-and-swap makes the two sides agree. */
enum fp_pair_state {
	FP_PAIR_PENDING = 1,
	FP_PAIR_PAIRED  = 2,
	FP_PAIR_PLAIN   = 3,
};

struct fp_sock_state {
	__u32 owner_tgid;
	__u32 flags;
	char owner_comm[FP_COMM_LEN];
	/* When the owner process started (its thread group leader's
	 * start_boottime, ns since boot): with owner_tgid it names the process
	 * even after its pid is reused. */
	__u64 owner_started;
	/* The peer's key, computed once when the socket is inserted, so the
	 * per-message path does no key building. */
	struct fp_sock_key peer;
	/* Bytes its sk_msg program sent around TCP (into the peer's queue, or
	 * straight out of an upstream socket): Forwarding::wait adds them to
	 * what entered the TCP send queue to know what the socket has sent. */
	__u64 bytes_redirected;
	/* Its TCP write_seq while every byte it sent went by the shortcut or
	 * was read by its peer (set at insertion, and when redirecting resumes
	 * after the receive-queue bound): a different write_seq at a send means
	 * plain bytes it queued could be overtaken. */
	__u32 expected_write_seq;
	/* Streaming demotion: redirects in a row of at most
	 * demote_max_msg_size bytes into a peer that had not read the
	 * previous ones. */
	__u32 streak;
	/* Its redirects that may not have landed yet (fp_redirect_slot). */
	struct fp_redirect_slot slots[FP_REDIRECT_SLOTS];
};

/* A process the splice guard caught, keyed by its tgid. The start time
 * tells it apart from a later process that reuses the pid, whose sockets
 * must not stay plain for it. */
struct fp_splice_exclusion {
	__u64 owner_started; /* the caught process's start_boottime */
	__u64 times;         /* splice reads refused */
};

/* Key of the CIDR LPM trie: IPv6 or IPv4-mapped IPv6. */
struct fp_cidr_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Which policy knobs are set; an unset knob matches every connection. */
enum fp_match_flags {
	FP_MATCH_PORTS = 1,
	FP_MATCH_CIDRS = 2,
	FP_MATCH_COMMS = 4,
};

/* Live settings the Rust side writes through the mmapped .bss. */
struct fp_live {
	__u32 paused;      /* 1 after detach: insert nothing, redirect nothing */
	__u32 match_flags; /* enum fp_match_flags */
};

#endif /* FASTPATH_H */
