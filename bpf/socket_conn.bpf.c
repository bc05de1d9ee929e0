/* SPDX-License-Identifier: Apache-2.0 */
/*
 * socket_conn.bpf.c: the life of a traced connection.
 *
 * connect() and accept()/accept4() add a connection to `conns` and tell user
 * space (PROBE_EVENT_OPEN: at once for a client, with its first record for a
 * server, see struct probe_conn_state); close() removes it (PROBE_EVENT_CLOSE,
 * if its OPEN was sent); a process exit is reported (PROBE_EVENT_EXIT) so user
 * space can drop its connections.
 *
 * Addresses without kprobes: the syscalls give only the peer's address (in
 * user memory). The local side comes from the stable tcp tracepoint
 * sock:inet_sock_set_state, joined by socket address (clients: the connecting
 * thread moves the socket to SYN_SENT, then ESTABLISHED carries the ports)
 * or by the peer's address and port (servers: the child socket becomes
 * ESTABLISHED before accept() returns). TCP sockets are the only ones that
 * pass through SYN_SENT, which is also how connect() on UDP is told apart.
 *
 * A thread that is not traced (its process is not wanted, or its name is
 * excluded) is judged at the entry of connect() and accept(): its calls are
 * not saved, and its connections cost no map update, here or at SYN_SENT and
 * ESTABLISHED.
 */
#include "common.h"

struct tuple {
	struct probe_endpoint local;
	struct probe_endpoint peer;
};

/* A traced thread's TCP connect, from SYN_SENT until both connect() has
 * returned and the socket is ESTABLISHED: whichever comes first leaves what
 * it knows for the other, which tells user space. On loopback and for a
 * blocking connect() ESTABLISHED comes first; on a network, for a
 * non-blocking one, the return. */
struct connecting {
	struct tuple tuple;       /* from ESTABLISHED; local.family 0 until then */
	struct probe_conn_id conn; /* from connect()'s return; generation 0 until then */
};
BPF_TABLE("lru_hash", u64, struct connecting, connecting, 4096);

/* A freshly established server-side socket's local address, kept by its peer's
 * address from ESTABLISHED (in softirq: no process is known yet) until accept()
 * returns it, in a slot (common.h). An accept() that finds no slot of its
 * peer leaves the local address to user space, which looks it up while the
 * socket is open (counted: addresses_looked_up). */
struct __attribute__((aligned(8))) peer_key {
	u8 addr[16];
	u16 port;
	u16 family;
	u32 _pad;
};

#define ACCEPTED_SLOT_BITS 12
struct __attribute__((aligned(8))) accepted_entry {
	struct peer_key peer; /* the key */
	struct probe_endpoint local;
};
struct accepted {
	u64 seal;
	struct accepted_entry entry;
};
BPF_ARRAY(accepted_local, struct accepted, 1 << ACCEPTED_SLOT_BITS);

static __always_inline struct accepted *accepted_slot(const struct peer_key *peer)
{
	/* On one host the peers differ mostly in their port. */
	u32 index = slot_index(address_key(peer->addr) ^ peer->port, ACCEPTED_SLOT_BITS);
	return accepted_local.lookup(&index);
}

/* Saves connect()'s or accept()'s arguments, if the thread is traced: its
 * name is judged again here, since a thread may rename itself (prctl). */
static __always_inline void save_conn_args(s32 fd, const void *addr, u8 syscall)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!process_wanted(id >> 32))
		return;
	struct syscall_args *slot = thread_syscall((u32)id, true);
	if (!slot || judge_thread(slot))
		return;
	struct syscall_args args = {};
	args.fd = fd;
	args.buf = (u64)addr;
	args.syscall = syscall;
	save_into(slot, &args);
}

/* Adds a connection to `conns`; false if it is not traced. */
static __always_inline bool open_connection(u32 pid, u32 tid, s32 fd, u8 role,
					    struct probe_conn_event *event)
{
	struct probe_conn_key key = {.pid = pid, .fd = fd};
	struct probe_conn_state state = {};
	u64 now = bpf_ktime_get_ns();
	state.generation = now;
	state.role = role;
	state.ignored = !connection_wanted(event->local.port, event->peer.port);
	if (role == PROBE_ROLE_SERVER && !state.ignored) {
		state.unannounced = 1; /* see struct probe_conn_state */
		state.local = event->local;
		state.peer = event->peer;
	}
	conns.update(&key, &state);
	if (!state.ignored && !state.unannounced)
		emit_open(event, pid, fd, tid, now, role);
	event->header.conn.generation = now;
	return !state.ignored;
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
	save_conn_args(args->fd, args->uservaddr, SYSCALL_CONNECT);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 pid = id >> 32, tid = (u32)id;
	struct syscall_args call;
	if (!take_syscall(tid, SYSCALL_CONNECT, &call) || !call.sock)
		return 0; /* not traced, or not TCP: no SYN_SENT happened in this connect() */
	u64 skaddr = call.sock;
	struct connecting *pending = connecting.lookup(&skaddr);
	if (!pending)
		return 0;

	struct probe_conn_event event = {};
	if ((args->ret != 0 && args->ret != -EINPROGRESS) ||
	    !read_sockaddr(&event.peer, (const void *)call.buf)) {
		connecting.delete(&skaddr);
		return 0;
	}
	bool established = pending->tuple.local.family != PROBE_AF_UNSPEC;
	if (established)
		event.local = pending->tuple.local;
	if (!open_connection(pid, tid, call.fd, PROBE_ROLE_CLIENT, &event)) {
		connecting.delete(&skaddr);
		return 0;
	}
	struct probe_conn_id conn = {.pid = pid, .fd = call.fd,
				     .generation = event.header.conn.generation};
	if (!established) {
		pending->conn = conn; /* ESTABLISHED sends the address */
		return 0;
	}
	connecting.delete(&skaddr);
#if PROBE_EXCHANGE_RATE
	remember_client(&conn, &event.local, &event.peer);
#endif
	return 0;
}

static __always_inline void accept_returned(long ret)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 pid = id >> 32, tid = (u32)id;
	struct syscall_args call;
	if (!take_syscall(tid, SYSCALL_ACCEPT, &call))
		return;
	if (ret < 0)
		return;

	struct probe_conn_event event = {};
	if (!call.buf) {
		/* libuv's way: the ends come at the first read (tcp_rcv_space_adjust),
		 * which the count tells user space to attach */
		set_thread_bits(tid, THREAD_ACCEPTS_BARE);
		count(PROBE_COUNTER_BARE_ACCEPTS);
	} else {
		if (!read_sockaddr(&event.peer, (const void *)call.buf)) {
			/* A unix socket or similar: remember not to sniff it. */
			struct probe_conn_key key = {.pid = pid, .fd = (s32)ret};
			struct probe_conn_state state = {.generation = bpf_ktime_get_ns(),
							 .role = PROBE_ROLE_SERVER, .ignored = 1};
			conns.update(&key, &state);
			return;
		}
		struct peer_key peer = {};
		__builtin_memcpy(peer.addr, event.peer.addr, 16);
		peer.port = event.peer.port;
		peer.family = event.peer.family;
		struct accepted *slot = accepted_slot(&peer);
		struct accepted_entry taken;
		if (slot && take_entry(&slot->seal, &slot->entry, &taken, sizeof(taken), &peer,
				       sizeof(peer)))
			event.local = taken.local;
	}
	open_connection(pid, tid, (s32)ret, PROBE_ROLE_SERVER, &event);
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept)
{
	save_conn_args(args->fd, args->upeer_sockaddr, SYSCALL_ACCEPT);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept)
{
	accept_returned(args->ret);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept4)
{
	save_conn_args(args->fd, args->upeer_sockaddr, SYSCALL_ACCEPT);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept4)
{
	accept_returned(args->ret);
	return 0;
}

static __always_inline void tracepoint_endpoints(struct tuple *tuple, u16 family, u16 sport,
						 u16 dport, const u8 *saddr, const u8 *daddr,
						 const u8 *saddr6, const u8 *daddr6)
{
	tuple->local.family = family;
	tuple->peer.family = family;
	tuple->local.port = sport;
	tuple->peer.port = dport;
	/* The barriers keep each branch's copy whole: clang would otherwise share
	 * one copy through a pointer into the context chosen by family, which the
	 * verifier refuses (a context pointer may not be moved). */
	if (family == PROBE_AF_INET) {
		__builtin_memcpy(tuple->local.addr, saddr, 4);
		__builtin_memcpy(tuple->peer.addr, daddr, 4);
		asm volatile("" ::: "memory");
	} else {
		__builtin_memcpy(tuple->local.addr, saddr6, 16);
		__builtin_memcpy(tuple->peer.addr, daddr6, 16);
		asm volatile("" ::: "memory");
	}
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->protocol != IP_PROTOCOL_TCP)
		return 0;
	u64 skaddr = (u64)args->skaddr;

	if (args->oldstate == TCP_CLOSE && args->newstate == TCP_SYN_SENT) {
		/* Inside connect(), on the connecting thread: followed if its call was saved. */
		struct syscall_args *slot = thread_syscall((u32)bpf_get_current_pid_tgid(), false);
		if (slot && slot->syscall == SYSCALL_CONNECT) {
			struct connecting fresh = {};
			connecting.update(&skaddr, &fresh);
			slot->sock = skaddr;
		}
		return 0;
	}
	if (args->newstate != TCP_ESTABLISHED)
		return 0;

	struct tuple tuple = {};
	tracepoint_endpoints(&tuple, args->family, args->sport, args->dport, args->saddr,
			     args->daddr, args->saddr_v6, args->daddr_v6);
	if (args->oldstate == TCP_SYN_SENT) {
		struct connecting *pending = connecting.lookup(&skaddr);
		if (!pending)
			return 0; /* not a traced thread's */
		if (!pending->conn.generation) {
			pending->tuple = tuple; /* connect() has not returned: it takes them */
			return 0;
		}
		struct probe_conn_id conn = pending->conn;
		connecting.delete(&skaddr);
		struct probe_conn_event event = {};
		fill_header(&event.header, PROBE_EVENT_ADDR, 0, &conn, bpf_ktime_get_ns());
		event.local = tuple.local;
		event.peer = tuple.peer;
		event.role = PROBE_ROLE_CLIENT;
#if PROBE_EXCHANGE_RATE
		remember_client(&conn, &tuple.local, &tuple.peer);
#endif
		emit_conn_event(&event);
	} else if (args->oldstate == TCP_SYN_RECV) {
		struct accepted_entry entry = {};
		__builtin_memcpy(entry.peer.addr, tuple.peer.addr, 16);
		entry.peer.port = tuple.peer.port;
		entry.peer.family = tuple.peer.family;
		entry.local = tuple.local;
		struct accepted *slot = accepted_slot(&entry.peer);
		if (slot)
			fill_slot(&slot->seal, &slot->entry, &entry, sizeof(entry));
	}
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 pid = id >> 32;
	if (!process_wanted(pid))
		return 0;
	struct probe_conn_key key = {.pid = pid, .fd = (s32)args->fd};
	struct probe_conn_state *state = conns.lookup(&key);
	if (!state)
		return 0;
	if (!state->ignored && !state->unannounced) {
		struct probe_event_header event;
		struct probe_conn_id conn = {.pid = pid, .fd = key.fd,
					     .generation = state->generation};
		fill_header(&event, PROBE_EVENT_CLOSE, (u32)id, &conn, bpf_ktime_get_ns());
		emit(&event, sizeof(event));
	}
	conns.delete(&key);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 pid = id >> 32;
	u32 tid = (u32)id;
	forget_thread(tid);
	/* The group leader's exit stands for the process's. */
	if (pid != tid || !process_wanted(pid))
		return 0;
	u64 now = bpf_ktime_get_ns();
	descriptors_reset(pid, now);
	struct probe_event_header event;
	struct probe_conn_id process = {.pid = pid, .fd = -1};
	fill_header(&event, PROBE_EVENT_EXIT, tid, &process, now);
	emit(&event, sizeof(event));
	return 0;
}

/* A new image: user space looks in it for TLS libraries and Go to probe.
 *
 * An image it has not examined yet wakes it at once: the image's own TLS
 * functions (Go's, a static OpenSSL's) must be probed before it calls them.
 * Waking it is nearly all that an exec costs here (12-15 us of the program's
 * 13-16 on this machine), and most execs run an image examined before (a
 * shell's commands, a health check's), whose file's uprobes are on already:
 * those wait for the reader's next poll. */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 pid = id >> 32;
	clear_thread_bits((u32)id, THREAD_JUDGED); /* a new name */
	if (!process_wanted(pid))
		return 0;
	u64 now = bpf_ktime_get_ns();
	descriptors_reset(pid, now);
	struct probe_exec_event event = {};
	struct probe_conn_id process = {.pid = pid, .fd = -1};
	fill_header(&event.header, PROBE_EVENT_EXEC, (u32)id, &process, now);
	bpf_get_current_comm(event.comm, sizeof(event.comm));
	/* The path as execve() was given it: a relative or cut path names no one file. */
	long length = bpf_probe_read_kernel_str(event.image.path, sizeof(event.image.path),
						(char *)args + (args->data_loc_filename & 0xFFFF));
	if (length > 0 && length < (long)sizeof(event.image.path) && event.image.path[0] == '/') {
		event.image.cgroup_id = bpf_get_current_cgroup_id();
		event.known = known_images.lookup(&event.image) != 0;
	} else {
		__builtin_memset(event.image.path, 0, sizeof(event.image.path));
	}
	emit_record(&event, sizeof(event), !event.known);
	return 0;
}
