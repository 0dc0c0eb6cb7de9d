// SPDX-License-Identifier: (MIT OR GPL-2.0-only)
/*
 * A minimal sockmap redirect, built only for the benchmarks: it shows what
 * fastpath.bpf.c's safety checks cost per message. It is NOT safe to use:
 * IPv4 only, no netns in the key (namespaces collide), no policy, no
 * owner tracking, no ordering fallback.
 *
 * With cork_bytes set (the benchmark's cork experiment) it also holds each
 * socket's sends until that many bytes have accumulated, then redirects
 * them as one message. That is NOT correct in general: a request smaller
 * than cork_bytes waits forever for bytes that never come (there is no
 * timer), and bytes still corked when the socket closes are dropped.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct ref_key {
	__u32 local_ip, remote_ip, local_port, remote_port;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__type(key, struct ref_key);
	__type(value, __u64);
	__uint(max_entries, 65536);
} ref_map SEC(".maps");

SEC("sockops")
int ref_sock_ops(struct bpf_sock_ops *skops)
{
	struct ref_key key = {};
	__u32 op = skops->op;

	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (skops->family != 2 /* AF_INET */)
		return 1;
	key.local_ip = skops->local_ip4;
	key.remote_ip = skops->remote_ip4;
	key.local_port = skops->local_port;
	key.remote_port = bpf_ntohl(skops->remote_port);
	bpf_sock_hash_update(skops, &ref_map, &key, BPF_ANY);
	return 1;
}

const volatile __u32 cork_bytes = 0;
/* The apply-bytes experiment: one verdict covers this many bytes, so the
 * program runs once per that many bytes instead of once per message. */
const volatile __u32 apply_bytes = 0;

SEC("sk_msg")
int ref_sk_msg(struct sk_msg_md *msg)
{
	struct ref_key peer = {};

	if (cork_bytes && msg->size < cork_bytes) {
		bpf_msg_cork_bytes(msg, cork_bytes);
		return SK_PASS; /* re-run on the whole corked message */
	}
	if (apply_bytes)
		bpf_msg_apply_bytes(msg, apply_bytes);

	peer.local_ip = msg->remote_ip4;
	peer.remote_ip = msg->local_ip4;
	peer.local_port = bpf_ntohl(msg->remote_port);
	peer.remote_port = msg->local_port;
	bpf_msg_redirect_hash(msg, &ref_map, &peer, BPF_F_INGRESS);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
