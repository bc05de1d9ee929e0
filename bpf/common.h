/* SPDX-License-Identifier: Apache-2.0 */
/*
 * common.h: maps and helpers shared by the BPF programs (kernel side only).
 *
 * Run-time knobs arrive as -D flags from probe/kernel/loader.py, because
 * bcc compiles at run time anyway:
 *   PROBE_SELF_PID       the probe's own pid, never traced
 *   PROBE_CAPTURE_BYTES  payload bytes copied per message (<= PROBE_MAX_CAPTURE)
 *   PROBE_RINGBUF_PAGES  ring buffer size in pages
 *   PROBE_NR_CPUS        possible CPUs (sizes per-CPU scratch space)
 *   PROBE_FILTER_PIDS    trace only the pids in `traced_pids`
 *   PROBE_FILTER_PORTS   trace only connections with a port in `traced_ports`
 *   PROBE_FILTER_COMM    trace only processes whose comm equals this string
 *   PROBE_EXCLUDE_COMMS  never trace processes whose comm is in `excluded_comms`
 *   PROBE_TASK_STORAGE   keep syscalls in flight in task storage, not a hash
 *   PROBE_EXCHANGE_RATE  exchanges sent per second at most (0: no limit)
 */
#ifndef PROBE_COMMON_H
#define PROBE_COMMON_H

#include <uapi/linux/ptrace.h>
#include <uapi/linux/uio.h>
#include <uapi/asm-generic/errno.h>

#include "probe.h"

/* bpf_probe_read_user under a name of its own. bcc checks each call of the
 * helper by that name against the kernel's symbols, to fall back on kernels
 * older than 5.5, and reads all of /proc/kallsyms again to do it: 38 ms of
 * compile time per call, a third of the probe's start-up here. The kernels
 * that run these programs (5.8 and later: the ring buffer) all have it. */
static long (*read_user)(void *dst, u32 size, const void *unsafe_ptr) =
	(void *)BPF_FUNC_probe_read_user;

/* What every syscall exit tracepoint hands its program (the format files
 * under tracefs' events/syscalls/sys_exit_*): one layout for all of them, so
 * one program can serve the exits of several syscalls. */
struct syscall_exit_ctx {
	u64 common; /* common_type, common_flags, common_preempt_count, common_pid */
	s32 nr;     /* __syscall_nr */
	s32 _pad;
	long ret;
};

/* The user-space ABI's socket addresses and message header, as the syscalls
 * take them. The kernel's own headers for them (<linux/in.h>,
 * <linux/socket.h>) pull in most of its internal headers, for another 0.3 s
 * of compile time at every start. */
struct abi_sockaddr_in {
	u16 family;
	__be16 port;
	u8 addr[4];
	u8 zero[8];
};

struct abi_sockaddr_in6 {
	u16 family;
	__be16 port;
	u32 flowinfo;
	u8 addr[16];
	u32 scope_id;
};

struct abi_msghdr {
	void *name;
	int namelen;
	struct iovec *iov;
	u64 iovlen;
	void *control;
	u64 controllen;
	u32 flags;
};

#define IP_PROTOCOL_TCP 6

#ifndef PROBE_CAPTURE_BYTES
#define PROBE_CAPTURE_BYTES 4096
#endif
#ifndef PROBE_EXCHANGE_RATE
#define PROBE_EXCHANGE_RATE 0
#endif
#ifndef PROBE_RINGBUF_PAGES
#define PROBE_RINGBUF_PAGES 1024
#endif
/* Unread bytes a CPU may add before it wakes user space (see emit()): a
 * quarter of the ring buffer shared among the CPUs, so that the ring is never
 * more than a quarter full of records nobody was woken for. */
#define PROBE_WAKEUP_BYTES (PROBE_RINGBUF_PAGES * PAGE_SIZE / 4 / PROBE_NR_CPUS)
#define PROBE_MAX_CONNS 65536
#define PROBE_MAX_INFLIGHT 16384

#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_CLOSE 7

/* Every record for user space. Read by probe/kernel/loader.py. */
BPF_RINGBUF_OUTPUT(events, PROBE_RINGBUF_PAGES);

/* enum probe_counter -> count, per CPU so counting never contends. */
BPF_PERCPU_ARRAY(counters, u64, PROBE_COUNTER_MAX);

/* Bytes written since this CPU last woke user space (see emit()). */
BPF_PERCPU_ARRAY(bytes_unwoken, u64, 1);

/* The traced connections: filled on connect/accept (or on the first HTTP
 * bytes of a connection opened before the probe), emptied on close. User
 * space deletes the entries of exited processes. LRU bounds it. */
BPF_TABLE("lru_hash", struct probe_conn_key, struct probe_conn_state, conns, PROBE_MAX_CONNS);

/* pid -> when its descriptors last stopped being what they were: its last
 * exec (which closes close-on-exec sockets without a close() to see) or its
 * exit (after which the pid may be another process's). An accepted connection
 * that user space was never told of, and so could not delete, is known by it
 * to be a leftover (socket_data.bpf.c, announce()). */
BPF_TABLE("lru_hash", u32, u64, fds_reset_ns, PROBE_MAX_INFLIGHT);

/* Slots of arrays through which one program hands another what it learnt of
 * a connection, where an LRU hash's update, then lookup and delete, would
 * allocate and free an element under the LRU's locks, and a full one evict at
 * every update: an accepted connection's local address cost about 500 ns of
 * its kernel time in one (nginx, a connection per request), and remembering a
 * client connection whose server is not traced here about 1 us in another.
 * A slot is picked by a Fibonacci hash of its key. It holds an entry (a key,
 * then what is handed over) and, written after it, the entry's seal: a hash
 * of its words, never 0. A writer overwrites whatever the slot held; a reader
 * copies the entry, takes it only if the seal fits the copy and the key is
 * the one it looks for, and empties the slot (seal 0). Two programs writing
 * one slot at once, or one reading it while another writes, leave or see
 * words of two entries, which their seal does not fit (but for one time in
 * 2^63): the reader misses the entry and does without, as it does one
 * overwritten by another connection's (see each use). Plain loads and
 * stores, on any architecture: the compare-and-swaps that took and gave back
 * a slot cost about 130 ns each here on a slot that the other CPU touched
 * last, as the writer of an accepted connection's slot (in softirq) and its
 * reader (accept() on the server's thread) always are, two each. */
static __always_inline u32 slot_index(u32 key, u32 bits)
{
	return (key * 2654435769u) >> (32 - bits);
}

/* An address's part of a slot's key: its first and last words (IPv4 lies in
 * the first; IPv6 hosts differ mostly in the last). */
static __always_inline u32 address_key(const u8 *addr)
{
	u32 first, last;
	__builtin_memcpy(&first, &addr[0], 4);
	__builtin_memcpy(&last, &addr[12], 4);
	return first ^ last;
}

/* A struct's memory read or written as 64-bit words: a type that may alias
 * any other, or clang, by C's aliasing rules, may move the word accesses
 * past the struct's own field stores (it did: a slot's copy lost a family
 * just written). */
typedef u64 __attribute__((__may_alias__)) struct_word;

/* Words of two structs of `size` bytes (a multiple of 8) equal: BPF has no memcmp. */
static __always_inline bool same_words(const void *a, const void *b, u32 size)
{
	const struct_word *x = a, *y = b;
#pragma unroll
	for (u32 i = 0; i < size / 8; i++)
		if (x[i] != y[i])
			return false;
	return true;
}

/* Copies `size` bytes (a multiple of 8) word by word, each read and written
 * once (volatile): a slot's words may change under a reader, and what it
 * checks must be what it keeps. */
static __always_inline void copy_words(volatile void *to, const volatile void *from, u32 size)
{
	volatile struct_word *x = to;
	const volatile struct_word *y = from;
#pragma unroll
	for (u32 i = 0; i < size / 8; i++)
		x[i] = y[i];
}

/* The seal of an entry of `size` bytes (a multiple of 8). */
static __always_inline u64 seal_of(const void *entry, u32 size)
{
	const struct_word *word = entry;
	u64 hash = 0x9e3779b97f4a7c15ULL;
#pragma unroll
	for (u32 i = 0; i < size / 8; i++) {
		hash = (hash ^ word[i]) * 0xff51afd7ed558ccdULL;
		hash ^= hash >> 32;
	}
	return hash | 1;
}

/* Writes an entry of `size` bytes into a slot: its words at `stored`, then its seal. */
static __always_inline void fill_slot(u64 *seal, void *stored, const void *entry, u32 size)
{
	copy_words(stored, entry, size);
	*(volatile u64 *)seal = seal_of(entry, size);
}

/* Copies a slot's entry of `size` bytes into `entry` and empties the slot, if
 * the entry is sealed and its first `key_size` bytes are `key`'s. Another
 * key's entry is left as it was. */
static __always_inline bool take_entry(u64 *seal, const void *stored, void *entry, u32 size,
				       const void *key, u32 key_size)
{
	u64 sealed = *(volatile u64 *)seal;
	if (!sealed)
		return false;
	copy_words(entry, stored, size);
	if (!same_words(entry, key, key_size) || seal_of(entry, size) != sealed)
		return false;
	*(volatile u64 *)seal = 0;
	return true;
}

#if PROBE_EXCHANGE_RATE
/* A TCP connection's two ends as its client names them, IPv4-mapped IPv6
 * addresses as IPv4 (a dual-stack socket's end must meet an IPv4 one). */
struct __attribute__((aligned(8))) conn_ends {
	struct probe_endpoint client;
	struct probe_endpoint server;
};

/* Traced client connections by their ends, for their server end, if it is
 * traced on this host too, to find at its first request (socket_data.bpf.c,
 * pair_ends()). Slots of clients of other hosts are never taken: later
 * connections overwrite them. A same-host client's overwritten or torn
 * leaves its two ends unpaired: each judges its exchanges for the rate limit
 * on its own. */
#define CLIENT_END_SLOT_BITS 14
struct __attribute__((aligned(8))) client_end_entry {
	struct conn_ends ends; /* the key */
	struct probe_conn_id conn;
};
struct client_end {
	u64 seal;
	struct client_end_entry entry;
};
BPF_ARRAY(client_ends, struct client_end, 1 << CLIENT_END_SLOT_BITS);

static __always_inline struct client_end *client_end_slot(const struct conn_ends *ends)
{
	u32 key = address_key(ends->client.addr) ^ address_key(ends->server.addr) ^
		  (ends->client.port | (u32)ends->server.port << 16);
	u32 index = slot_index(key, CLIENT_END_SLOT_BITS);
	return client_ends.lookup(&index);
}

static __always_inline void ends_endpoint(struct probe_endpoint *out,
					  const struct probe_endpoint *in)
{
	out->port = in->port;
	out->family = in->family;
	bool mapped = in->family == PROBE_AF_INET6 && in->addr[10] == 0xff && in->addr[11] == 0xff;
#pragma unroll
	for (int i = 0; i < 10; i++)
		mapped = mapped && in->addr[i] == 0;
	if (mapped) {
		out->family = PROBE_AF_INET;
		__builtin_memcpy(out->addr, &in->addr[12], 4);
	} else {
		__builtin_memcpy(out->addr, in->addr, 16);
	}
}

/* Remembers a traced client connection by its ends, once both are known. */
static __always_inline void remember_client(const struct probe_conn_id *conn,
					    const struct probe_endpoint *local,
					    const struct probe_endpoint *peer)
{
	if (local->family == PROBE_AF_UNSPEC || peer->family == PROBE_AF_UNSPEC)
		return;
	struct client_end_entry entry = {};
	ends_endpoint(&entry.ends.client, local);
	ends_endpoint(&entry.ends.server, peer);
	entry.conn = *conn;
	struct client_end *slot = client_end_slot(&entry.ends);
	if (slot)
		fill_slot(&slot->seal, &slot->entry, &entry, sizeof(entry));
}
#endif

static __always_inline void descriptors_reset(u32 pid, u64 now)
{
	fds_reset_ns.update(&pid, &now);
}

/* A syscall in flight on one thread: its arguments, kept from entry to exit. */
struct syscall_args {
	u64 enter_ns; /* writes only: 0 for reads, connect and accept */
	u64 buf;    /* buffer, iovec array, msghdr or sockaddr, by syscall */
	u64 len;    /* buffer length or iovec count */
	u64 sock;   /* connect: its socket, set at SYN_SENT inside the call; a read:
		     * set if tcp_rcv_space_adjust left its ends (socket_data.bpf.c) */
	s32 fd;
	u8 syscall; /* enum probe_syscall, or one of the SYSCALL_* below */
	u8 thread;  /* THREAD_* bits: the thread's state, kept across its syscalls */
	u16 nr;     /* data syscalls: the syscall's number, matched at its exit */
};
/* Bits of syscall_args.thread: what is known of the thread, so that a syscall
 * need not look it up again. The first two are set by the uprobes, so that
 * the exit of every syscall of every thread need not look in their
 * per-thread maps (a hash lookup each) to find that it is not inside a TLS
 * library or Go's syscall wrapper. A bit set when it need not be costs that
 * lookup; one left unset never happens, since the uprobe sets it before the
 * syscalls it covers. The last two are thread_excluded()'s. */
#define THREAD_IN_TLS_CALL 1  /* between SSL_read/SSL_write's uprobe and uretprobe */
#define THREAD_GO_SYSCALL 2   /* go_syscall holds this thread's announced fd */
#define THREAD_JUDGED 4       /* THREAD_EXCLUDED is up to date */
#define THREAD_EXCLUDED 8     /* the thread's name is one never traced */
/* The thread accepted a connection without an address buffer, or picked one
 * up from its bytes: the ends of its reads are worth reading (socket_data.bpf.c,
 * tcp_rcv_space_adjust). */
#define THREAD_ACCEPTS_BARE 16
#define THREAD_PICKS_UP 32
#define SYSCALL_CONNECT 100
#define SYSCALL_ACCEPT 101
#define SYSCALL_NONE 0 /* the thread's entry is free: its last syscall was taken */
#ifdef PROBE_TASK_STORAGE
/* The thread's own storage (Linux 5.12 and later): found from the task with
 * no hashing, about 20 ns less per access than the LRU hash below, on two
 * programs of every syscall the probe watches; freed with the thread. */
BPF_TASK_STORAGE(inflight, struct syscall_args);

static __always_inline struct syscall_args *thread_syscall(u32 tid, bool create)
{
	return inflight.task_storage_get((struct task_struct *)bpf_get_current_task_btf(), 0,
					 create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}

static __always_inline void forget_thread(u32 tid)
{
	/* the storage goes with the thread */
}
#else
BPF_TABLE("lru_hash", u32, struct syscall_args, inflight, PROBE_MAX_INFLIGHT);

static __always_inline struct syscall_args *thread_syscall(u32 tid, bool create)
{
	struct syscall_args *slot = inflight.lookup(&tid);
	if (!slot && create) {
		struct syscall_args fresh = {};
		inflight.update(&tid, &fresh);
		slot = inflight.lookup(&tid);
	}
	return slot;
}

static __always_inline void forget_thread(u32 tid)
{
	inflight.delete(&tid);
}
#endif

/* A thread's entry stays from one syscall to the next and is rewritten in
 * place: in the hash, an update or delete allocates, frees and relinks an
 * LRU element, which measured as most of a syscall entry program's run time.
 * Only the thread itself touches its entry, so no lock is needed; the entry
 * goes when the thread exits (forget_thread), or by LRU eviction. Its
 * THREAD_* bits outlive the syscall. */
static __always_inline void save_into(struct syscall_args *slot, const struct syscall_args *args)
{
	u8 thread = slot->thread;
	*slot = *args;
	slot->thread = thread;
}

/* The thread's saved syscall, if it is `syscall`; marks it taken. */
static __always_inline bool take_syscall(u32 tid, u8 syscall, struct syscall_args *call)
{
	struct syscall_args *slot = thread_syscall(tid, false);
	if (!slot || slot->syscall != syscall)
		return false;
	*call = *slot;
	slot->syscall = SYSCALL_NONE;
	return true;
}

/* Is this saved call (enum probe_syscall, or a SYSCALL_*) a data syscall? */
static __always_inline bool is_data_syscall(u8 syscall)
{
	return syscall >= PROBE_SYS_READ && syscall <= PROBE_SYS_SENDFILE;
}

/* The thread's saved data syscall, if it is the one returning now, number
 * `nr`; marks it taken. */
static __always_inline bool take_data_syscall(u32 tid, s32 nr, struct syscall_args *call)
{
	struct syscall_args *slot = thread_syscall(tid, false);
	if (!slot || !is_data_syscall(slot->syscall) || slot->nr != nr)
		return false;
	*call = *slot;
	slot->syscall = SYSCALL_NONE;
	return true;
}

/* Sets or clears THREAD_* bits of the current thread. */
static __always_inline void set_thread_bits(u32 tid, u8 bits)
{
	struct syscall_args *slot = thread_syscall(tid, true);
	if (slot)
		slot->thread |= bits;
}

static __always_inline void clear_thread_bits(u32 tid, u8 bits)
{
	struct syscall_args *slot = thread_syscall(tid, false);
	if (slot)
		slot->thread &= ~bits;
}

#ifdef PROBE_FILTER_PIDS
/* pid -> 1: the only processes traced (probe capture -p). */
BPF_HASH(traced_pids, u32, u8, 1024);
#endif
#ifdef PROBE_FILTER_PORTS
/* port (host order) -> 1: trace only connections with one of these ports. */
BPF_HASH(traced_ports, u16, u8, 1024);
#endif
#ifdef PROBE_EXCLUDE_COMMS
/* process name -> 1: never traced (probe run --exclude-comm): load
 * generators, health checkers, the collector's own clients. */
BPF_HASH(excluded_comms, struct probe_comm, u8, 256);
#endif
/* Images user space has examined -> 1: an exec of one does not wake it. */
BPF_TABLE("lru_hash", struct probe_image_key, u8, known_images, PROBE_MAX_KNOWN_IMAGES);

static __always_inline void count(u32 counter)
{
	u64 *value = counters.lookup(&counter);
	if (value)
		*value += 1;
}

/* Should this process be looked at at all? Cheap enough for every syscall. */
static __always_inline bool process_wanted(u32 pid)
{
	if (pid == PROBE_SELF_PID)
		return false;
#ifdef PROBE_FILTER_PIDS
	if (!traced_pids.lookup(&pid))
		return false;
#endif
	return true;
}

/* Judges the current thread by its name, now; remembers the verdict in its
 * entry (thread_excluded()). False without excluded names. */
static __always_inline bool judge_thread(struct syscall_args *slot)
{
#ifdef PROBE_EXCLUDE_COMMS
	struct probe_comm comm = {};
	bpf_get_current_comm(&comm.name, sizeof(comm.name));
	bool excluded = excluded_comms.lookup(&comm) != 0;
	slot->thread = (slot->thread & ~THREAD_EXCLUDED) | THREAD_JUDGED |
		       (excluded ? THREAD_EXCLUDED : 0);
	return excluded;
#else
	return false;
#endif
}

/* Is the thread's name one never traced? Its data syscalls are then not
 * looked at, whoever opened the connection: a load generator's or a
 * collector's reads and writes cost a bit test, not a connection lookup. The
 * name is judged at the thread's first data syscall, and again after an exec,
 * at each connect and accept (socket_conn.bpf.c, save_conn_args()) and
 * where a connection is picked up from its bytes. A thread renamed in
 * between (prctl) keeps its verdict until then; one judged before user space
 * filled `excluded_comms` is looked at, as without the verdict, until then. */
static __always_inline bool thread_excluded(struct syscall_args *slot)
{
#ifdef PROBE_EXCLUDE_COMMS
	if (!(slot->thread & THREAD_JUDGED))
		judge_thread(slot);
	return slot->thread & THREAD_EXCLUDED;
#else
	return false;
#endif
}

/* The current thread's entry, if its syscalls are to be looked at: its
 * process is wanted and its name is not excluded; 0 otherwise. */
static __always_inline struct syscall_args *wanted_thread(u64 id)
{
	if (!process_wanted(id >> 32))
		return 0;
	struct syscall_args *slot = thread_syscall((u32)id, true);
	return slot && !thread_excluded(slot) ? slot : 0;
}

/* Filters decided once per connection, when it is first seen (a thread whose
 * name is excluded is judged before). The name is the current thread's, which
 * for most programs is the process's; user space checks the process's own
 * name again when the connection's OPEN arrives. */
static __always_inline bool connection_wanted(u16 local_port, u16 peer_port)
{
#ifdef PROBE_FILTER_COMM
	struct probe_comm comm = {};
	bpf_get_current_comm(&comm.name, sizeof(comm.name));
	char wanted[16] = PROBE_FILTER_COMM;
#pragma unroll
	for (int i = 0; i < 16; i++) {
		if (comm.name[i] != wanted[i])
			return false;
		if (comm.name[i] == 0)
			break;
	}
#endif
#ifdef PROBE_FILTER_PORTS
	/* A port of 0 is not known yet (accept without an address): let user
	 * space decide once it has resolved the address. */
	if (local_port && peer_port && !traced_ports.lookup(&local_port) &&
	    !traced_ports.lookup(&peer_port))
		return false;
#endif
	return true;
}

/* Ring buffer output that counts what could not be delivered.
 *
 * Waking user space is the most expensive thing a program here does: the
 * ring buffer's irq_work raises an interrupt on this CPU, a VM exit on a
 * virtual machine, and with a wakeup every 32 records per CPU that alone
 * was about a quarter of the programs' run time on this machine. So a CPU
 * wakes the reader only once it has written PROBE_WAKEUP_BYTES since its
 * last wakeup; below that the reader's poll timeout (probe/pipeline.py,
 * POLL_MS) collects the records, which bounds how long one waits.
 *
 * An urgent record wakes the reader at once, at most once per
 * PROBE_URGENT_WAKEUP_NS per CPU, so that a flood of them costs no more
 * wakeups than that: see emit_conn_event() for which are. */
#define PROBE_URGENT_WAKEUP_NS 1000000

/* When this CPU last woke the reader for an urgent record. */
BPF_PERCPU_ARRAY(urgent_woken_ns, u64, 1);

static __always_inline void emit_record(void *record, u64 size, bool urgent)
{
	u32 zero = 0;
	u64 *unwoken = bytes_unwoken.lookup(&zero);
	u64 flags = BPF_RB_NO_WAKEUP;
	if (unwoken && (*unwoken += size) >= PROBE_WAKEUP_BYTES)
		flags = BPF_RB_FORCE_WAKEUP;
	if (urgent) {
		u64 *woken = urgent_woken_ns.lookup(&zero);
		u64 now = bpf_ktime_get_ns();
		if (woken && now - *woken >= PROBE_URGENT_WAKEUP_NS) {
			*woken = now;
			flags = BPF_RB_FORCE_WAKEUP;
		}
	}
	if (flags == BPF_RB_FORCE_WAKEUP && unwoken)
		*unwoken = 0;
	if (events.ringbuf_output(record, size, flags) != 0)
		count(PROBE_COUNTER_LOST);
}

static __always_inline void emit(void *record, u64 size)
{
	emit_record(record, size, false);
}

/* Read a user-space sockaddr into an endpoint. Returns the family, or 0 if
 * it is neither IPv4 nor IPv6 (unix sockets and the like are not traced by
 * address; they are still traced if they carry HTTP). */
static __always_inline u16 read_sockaddr(struct probe_endpoint *ep, const void *uaddr)
{
	/* One read of an IPv6 address's size, family included: a user-memory read
	 * costs 100-150 ns here, whatever its size. Only an IPv4 address that ends
	 * less than 12 bytes before an unmapped page needs a second, shorter read. */
	union {
		u16 family;
		struct abi_sockaddr_in in;
		struct abi_sockaddr_in6 in6;
	} sa = {};
	if (!uaddr)
		return 0;
	bool whole = read_user(&sa, sizeof(sa.in6), uaddr) == 0;
	if (!whole && read_user(&sa, sizeof(sa.in), uaddr) != 0)
		return 0;
	if (sa.family == PROBE_AF_INET) {
		__builtin_memcpy(ep->addr, sa.in.addr, 4);
		ep->port = ntohs(sa.in.port);
	} else if (sa.family == PROBE_AF_INET6 && whole) {
		__builtin_memcpy(ep->addr, sa.in6.addr, 16);
		ep->port = ntohs(sa.in6.port);
	} else {
		return 0;
	}
	ep->family = sa.family;
	return sa.family;
}

static __always_inline void fill_header(struct probe_event_header *header, u32 type, u32 tid,
					const struct probe_conn_id *conn, u64 timestamp_ns)
{
	header->type = type;
	header->tid = tid;
	header->conn = *conn;
	header->timestamp_ns = timestamp_ns;
}

/* Send a connection event; comm is the current task's.
 *
 * One is urgent (see emit_record()): an OPEN whose peer the kernel could not
 * read (accept() without an address buffer, as libuv calls it, or a connection
 * picked up from its bytes), since user space reads its addresses from /proc,
 * which it can only do while the socket is open. So is an EXEC of an image
 * not known yet (bpf/socket_conn.bpf.c). */
static __always_inline void emit_conn_event(struct probe_conn_event *event)
{
	bpf_get_current_comm(event->comm, sizeof(event->comm));
	bool urgent = event->header.type == PROBE_EVENT_OPEN &&
		      event->peer.family == PROBE_AF_UNSPEC;
	emit_record(event, sizeof(*event), urgent);
}

/* Sends a connection's OPEN; `event` holds what is known of its addresses. */
static __always_inline void emit_open(struct probe_conn_event *event, u32 pid, s32 fd, u32 tid,
				      u64 generation, u8 role)
{
	struct probe_conn_id conn = {.pid = pid, .fd = fd, .generation = generation};
	fill_header(&event->header, PROBE_EVENT_OPEN, tid, &conn, generation);
	event->role = role;
	emit_conn_event(event);
}

/* TLS libraries (bpf/tls.bpf.c for OpenSSL, bpf/go.bpf.c for Go).
 *
 * A thread inside SSL_read/SSL_write (or the _ex variants), from the uprobe
 * to the uretprobe. A socket syscall the thread makes meanwhile names the
 * SSL's socket: socket_data.bpf.c writes its fd here. */
struct tls_call {
	u64 ssl;       /* the SSL* */
	u64 buf;       /* plaintext buffer */
	u64 count_ptr; /* _ex: where the library stores the byte count; 0 otherwise */
	u64 enter_ns;
	s32 fd;        /* socket read or written during the call; -1 until seen */
	s32 guess_fd;  /* the TLS socket this thread read just before the call */
	u8 syscall;    /* PROBE_SYS_SSL_READ or PROBE_SYS_SSL_WRITE */
	u8 _pad[7];
};
BPF_TABLE("lru_hash", u32, struct tls_call, tls_calls, PROBE_MAX_INFLIGHT);

/* Thread -> the TLS socket it last read outside a TLS library call. Libraries
 * that leave socket I/O to the program and decrypt from memory (Node.js)
 * are handed the ciphertext right after that read: its fd is the best guess
 * for an SSL* whose socket was never seen inside one of its calls. */
BPF_TABLE("lru_hash", u32, s32, tls_last_read, PROBE_MAX_INFLIGHT);

/* A TLS library was seen using this socket: from now on its bytes are
 * ciphertext, not sent (the library's uprobes send the plaintext). */
static __always_inline void mark_tls_connection(u32 pid, s32 fd)
{
	struct probe_conn_key key = {.pid = pid, .fd = fd};
	struct probe_conn_state *state = conns.lookup(&key);
	if (state)
		state->protocol = PROBE_PROTOCOL_TLS;
}

#endif /* PROBE_COMMON_H */
