/* SPDX-License-Identifier: Apache-2.0 */
/*
 * socket_data.bpf.c: bytes moved on traced connections.
 *
 * Entry of every read/write-like syscall saves its arguments per thread;
 * its exit, if the fd is a traced connection that speaks HTTP, sends one
 * PROBE_EVENT_DATA record with timing, the byte count and payload: for a
 * call with one buffer, the first PROBE_CAPTURE_BYTES of each message, then
 * a call's last PROBE_TAIL_BYTES; for one with iovecs, its first
 * PROBE_CAPTURE_BYTES (walked in order, at most PROBE_MAX_IOVECS); see
 * probe_data_event. A connection's first bytes decide whether it speaks
 * HTTP (protocol_verdict): a database's or a cache's connections cost no
 * records. A connection that was open before the probe started is picked up
 * when its bytes look like HTTP (sniff_connection); user space then resolves
 * its addresses.
 */
#include "common.h"

/* Where a data event is built: too large for the BPF stack (and, at 32 KiB,
 * for a per-CPU array's value), so a few slots per CPU in a plain array. A
 * program holds its slot from data_event() to emit_data(); it can be
 * preempted meanwhile (uprobes, and syscall tracepoints that may fault), and
 * the program that then runs on this CPU must not write into the same slot,
 * so each slot is taken with a compare-and-swap. `spill` lets the verifier
 * see that a copy at any bounded offset of `payload` stays inside the map
 * value. */
#define SCRATCH_SLOTS 4
struct data_scratch {
	u64 busy; /* 64-bit: BPF's compare-and-swap */
	struct probe_data_event event;
	char spill[PROBE_MAX_CAPTURE];
};
BPF_ARRAY(data_scratch, struct data_scratch, PROBE_NR_CPUS * SCRATCH_SLOTS);

static __always_inline struct data_scratch *take_scratch(void)
{
	u32 base = bpf_get_smp_processor_id() * SCRATCH_SLOTS;
#pragma unroll
	for (int i = 0; i < SCRATCH_SLOTS; i++) {
		u32 index = base + i;
		struct data_scratch *slot = data_scratch.lookup(&index);
		if (slot && __sync_val_compare_and_swap(&slot->busy, 0, 1) == 0)
			return slot;
	}
	count(PROBE_COUNTER_LOST); /* every slot of this CPU held: very deep preemption */
	return 0;
}

/* Which way a call of this kind (enum probe_syscall) moves bytes. */
static __always_inline u8 direction_of(u8 syscall)
{
	bool reads = syscall == PROBE_SYS_READ || syscall == PROBE_SYS_READV ||
		     syscall == PROBE_SYS_RECVFROM || syscall == PROBE_SYS_RECVMSG ||
		     syscall == PROBE_SYS_SSL_READ || syscall == PROBE_SYS_GO_TLS_READ;
	return reads ? PROBE_INGRESS : PROBE_EGRESS;
}

/* Saves a data syscall's arguments at its entry, unless its thread's name is
 * excluded (thread_excluded). Only a write's entry time is taken: a read's
 * entry says nothing of when its bytes arrived (it may have blocked), so an
 * ingress event is timed by its return alone, and the clock, 30-65 ns a
 * call here, is not read for the reads of every process. */
static __always_inline int save_data_args(s32 nr, s32 fd, const void *buf, u64 len, u8 syscall)
{
	struct syscall_args *slot = wanted_thread(bpf_get_current_pid_tgid());
	if (!slot)
		return 0;
	struct syscall_args args = {};
	if (direction_of(syscall) == PROBE_EGRESS)
		args.enter_ns = bpf_ktime_get_ns();
	args.fd = fd;
	args.buf = (u64)buf;
	args.len = len;
	args.syscall = syscall;
	args.nr = nr;
	save_into(slot, &args);
	return 0;
}

static __always_inline bool is_vectored(u8 syscall)
{
	return syscall == PROBE_SYS_READV || syscall == PROBE_SYS_WRITEV ||
	       syscall == PROBE_SYS_RECVMSG || syscall == PROBE_SYS_SENDMSG;
}

/* For sendmsg/recvmsg, turn the msghdr into its iovec array and count. */
static __always_inline void resolve_msghdr(struct syscall_args *call)
{
	if (call->syscall != PROBE_SYS_RECVMSG && call->syscall != PROBE_SYS_SENDMSG)
		return;
	struct abi_msghdr msg = {};
	read_user(&msg, sizeof(msg), (const void *)call->buf);
	call->buf = (u64)msg.iov;
	call->len = msg.iovlen;
}

/* Where the bytes moved start, and how many of them lie there: the buffer,
 * or the first iovec. */
static __always_inline const void *first_segment(const struct syscall_args *call, long ret,
						  u64 *len)
{
	*len = ret;
	if (!is_vectored(call->syscall))
		return (const void *)call->buf;
	struct iovec first = {};
	read_user(&first, sizeof(first), (const void *)call->buf);
	if (first.iov_len < *len)
		*len = first.iov_len;
	return first.iov_base;
}

/* Request methods and the response prefix, as little-endian 32-bit words. */
#define WORD(a, b, c, d) ((u32)(a) | (u32)(b) << 8 | (u32)(c) << 16 | (u32)(d) << 24)

static __always_inline bool looks_like_http(const char *start)
{
	char head[PROBE_SNIFF_BYTES] = {};
	if (read_user(head, sizeof(head), start) != 0)
		return false;
	u32 word = WORD(head[0], head[1], head[2], head[3]);
	switch (word) {
	case WORD('G', 'E', 'T', ' '):
	case WORD('P', 'U', 'T', ' '):
	case WORD('P', 'O', 'S', 'T'):
	case WORD('H', 'E', 'A', 'D'):
	case WORD('D', 'E', 'L', 'E'):
	case WORD('P', 'A', 'T', 'C'):
	case WORD('O', 'P', 'T', 'I'):
		return true;
	case WORD('H', 'T', 'T', 'P'):
		return head[4] == '/' && head[5] == '1' && head[6] == '.';
	}
	return false;
}

/* Both ends of a connection that the probe learns at a read of its bytes.
 *
 * Some connections come without their addresses: one accepted without an
 * address buffer (libuv's way: Node.js), and one picked up from its bytes
 * (open before the probe started, or handed over by another process: Node's
 * cluster primary accepts each connection and passes it to a worker). Their
 * OPEN would wake user space at once to read them from /proc, a read of the
 * whole TCP table per connection, and a short-lived one is gone by then. A
 * read that copies a TCP connection's bytes passes through this tracepoint,
 * whose arguments hold both ends, before it returns. The program runs for
 * every TCP read on the host, so user space attaches it only once a process
 * accepts without an address buffer (PROBE_COUNTER_BARE_ACCEPTS; Node's
 * cluster primary, too, before it hands the connection over), see
 * probe/kernel/loader.py, read_addresses_at_reads. It looks further only on
 * the threads that made such a connection: one that accepted it
 * (THREAD_ACCEPTS_BARE), or picked one up while the program was attached
 * (THREAD_PICKS_UP; the connections open before the probe, each picked up
 * once, mark no thread before then). It fills in an accepted
 * connection's entry; for a read of a descriptor not traced yet, it leaves
 * the ends in `read_ends` for the read's exit, which may pick the connection
 * up (sniff_connection), and marks the read as one on a TCP socket
 * (syscall_args.sock, 0 at every data syscall's entry), so no earlier read's
 * ends are ever taken. */
BPF_TABLE("lru_hash", u32, struct tuple, read_ends, PROBE_MAX_INFLIGHT);
/* 1 once user space has attached it. */
BPF_ARRAY(reading_ends, u8, 1);

TRACEPOINT_PROBE(tcp, tcp_rcv_space_adjust)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	struct syscall_args *slot = thread_syscall(tid, false);
	if (!slot || !(slot->thread & (THREAD_ACCEPTS_BARE | THREAD_PICKS_UP)) ||
	    !is_data_syscall(slot->syscall) || direction_of(slot->syscall) != PROBE_INGRESS)
		return 0;
	struct probe_conn_key key = {.pid = id >> 32, .fd = slot->fd};
	struct probe_conn_state *state = conns.lookup(&key);
	if (state ? !state->unannounced || state->peer.family != PROBE_AF_UNSPEC
		  : !(slot->thread & THREAD_PICKS_UP))
		return 0; /* the common case: a traced connection's later reads */
	struct tuple tuple = {};
	tracepoint_endpoints(&tuple, args->family, args->sport, args->dport, args->saddr,
			     args->daddr, args->saddr_v6, args->daddr_v6);
	if (state) {
		state->local = tuple.local;
		state->peer = tuple.peer;
	} else {
		read_ends.update(&tid, &tuple);
		slot->sock = (u64)args->skaddr;
	}
	return 0;
}

/* A connection the probe did not see open: trace it if it speaks HTTP. */
static __always_inline struct probe_conn_state *sniff_connection(struct probe_conn_key *key,
								  u32 tid,
								  const struct syscall_args *call,
								  long ret)
{
	u64 len;
	if (ret < PROBE_SNIFF_BYTES || !looks_like_http(first_segment(call, ret, &len)))
		return 0;
	struct probe_conn_state state = {};
	u64 now = bpf_ktime_get_ns();
	state.generation = now;
	state.role = PROBE_ROLE_UNKNOWN;
	if (call->syscall >= PROBE_SYS_SSL_READ) { /* plaintext, at a TLS library */
		state.protocol = PROBE_PROTOCOL_TLS;
		state.plaintext = PROBE_PROTOCOL_HTTP;
	} else {
		state.protocol = PROBE_PROTOCOL_HTTP;
	}
	struct tuple *ends = call->sock ? read_ends.lookup(&tid) : 0; /* this read's */
	if (ends) {
		state.local = ends->local;
		state.peer = ends->peer;
	}
	struct syscall_args *thread = thread_syscall(tid, true);
	state.ignored = (thread && judge_thread(thread)) ||
			!connection_wanted(state.local.port, state.peer.port);
	u32 zero = 0;
	u8 *reading = reading_ends.lookup(&zero);
	if (thread && reading && *reading) /* its next pick-ups' ends are read */
		thread->thread |= THREAD_PICKS_UP;
	conns.update(key, &state);
	if (!state.ignored) {
		struct probe_conn_event event = {};
		event.local = state.local;
		event.peer = state.peer;
		emit_open(&event, key->pid, key->fd, tid, now, PROBE_ROLE_UNKNOWN);
	}
	return conns.lookup(key);
}

/* Hide a value from the compiler, so the masks below survive into the
 * code the verifier reads (clang drops a mask it can prove redundant). */
#define OPAQUE(x) asm volatile("" : "+r"(x))

/* Copy len (<= PROBE_MAX_CAPTURE) user bytes to payload + offset
 * (offset < PROBE_MAX_CAPTURE), in a form the verifier can bound. */
static __always_inline void copy_user(char *payload, u32 offset, u64 len, const void *src)
{
	if (len >= PROBE_MAX_CAPTURE) {
		read_user(payload, PROBE_MAX_CAPTURE, src); /* offset is 0 */
		return;
	}
	OPAQUE(len);
	OPAQUE(offset);
	read_user(payload + (offset & (PROBE_MAX_CAPTURE - 1)), len & (PROBE_MAX_CAPTURE - 1),
		  src);
}

static __always_inline u32 copy_buffer(char *payload, const void *buf, long ret)
{
	u32 len = ret < PROBE_CAPTURE_BYTES ? ret : PROBE_CAPTURE_BYTES;
	copy_user(payload, 0, len, buf);
	return len;
}

/* The last PROBE_TAIL_BYTES of a call's buffer (all of a shorter call's). */
static __always_inline u32 copy_tail(char *payload, const void *buf, long ret)
{
	if (ret <= PROBE_TAIL_BYTES)
		return copy_buffer(payload, buf, ret);
	read_user(payload, PROBE_TAIL_BYTES, buf + ret - PROBE_TAIL_BYTES);
	return PROBE_TAIL_BYTES;
}

static __always_inline u32 copy_iovecs(char *payload, const struct iovec *iov, u64 iovcnt,
				       long ret)
{
	/* The iovec array in one read, not one read per entry. */
	struct iovec vecs[PROBE_MAX_IOVECS];
	u64 walked = iovcnt < PROBE_MAX_IOVECS ? iovcnt : PROBE_MAX_IOVECS;
	u64 array_size = walked * sizeof(struct iovec);
	OPAQUE(array_size);
	if (array_size > sizeof(vecs))
		array_size = sizeof(vecs);
	if (read_user(vecs, array_size, iov) != 0)
		return 0;
	u32 copied = 0;
#pragma unroll
	for (int i = 0; i < PROBE_MAX_IOVECS; i++) {
		if (i >= walked || copied >= ret || copied >= PROBE_CAPTURE_BYTES)
			break;
		struct iovec vec = vecs[i];
		u64 len = vec.iov_len;
		if (len > ret - copied)
			len = ret - copied;
		if (len > PROBE_CAPTURE_BYTES - copied)
			len = PROBE_CAPTURE_BYTES - copied;
		copy_user(payload, copied, len, vec.iov_base);
		copied += len;
	}
	if (iovcnt > PROBE_MAX_IOVECS && copied < ret && copied < PROBE_CAPTURE_BYTES)
		count(PROBE_COUNTER_TRUNCATED);
	return copied;
}

/* Bytes of a connection's first message that protocol_verdict looks at.
 * The verdict is inlined in every data program, so each byte it looks at
 * costs compile time at every start: 8 bytes cost about 0.2 s, 33 cost 0.7. */
#define VERDICT_BYTES 8

static __always_inline bool is_method_char(u8 c)
{
	return (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

/* What a connection's first bytes say (enum probe_protocol). A TLS record's
 * header: content type 20..23 (change_cipher_spec, alert, handshake,
 * application_data), then version 3.x, SSL 3 to TLS 1.3; UNSEEN while fewer
 * than 3 bytes of one were moved (nginx peeks at one byte of a new TLS
 * connection first). HTTP: a status line, or a method (an uppercase letter,
 * then [A-Z0-9_-]) and a space. Method characters with no space among the
 * bytes looked at are taken too, for user space's parser to judge: a longer
 * method, or a request read a few bytes at a time (the next call's bytes do
 * not start the message, and would be judged wrongly). Not HTTP/2's
 * connection preface (PRI * HTTP/2.0), whose frames user space does not parse. */
static __always_inline u8 protocol_verdict(const struct syscall_args *call, long ret)
{
	u8 head[VERDICT_BYTES] = {};
	u64 len;
	const void *start = first_segment(call, ret, &len);
	OPAQUE(len);
	if (len > sizeof(head))
		len = sizeof(head);
	if (len == 0 || read_user(head, len, start) != 0)
		return PROBE_PROTOCOL_UNSEEN;
	u8 c = head[0];
	if (c >= 20 && c <= 23) {
		if (len < 3)
			return PROBE_PROTOCOL_UNSEEN;
		return head[1] == 3 && head[2] <= 4 ? PROBE_PROTOCOL_TLS : PROBE_PROTOCOL_OTHER;
	}
	if (c < 'A' || c > 'Z')
		return PROBE_PROTOCOL_OTHER;
	u32 first = WORD(head[0], head[1], head[2], head[3]);
	if (len >= 5 && first == WORD('H', 'T', 'T', 'P') && head[4] == '/')
		return PROBE_PROTOCOL_HTTP; /* a response: the request went unseen */
	if (len == sizeof(head) && first == WORD('P', 'R', 'I', ' ') &&
	    WORD(head[4], head[5], head[6], head[7]) == WORD('*', ' ', 'H', 'T'))
		return PROBE_PROTOCOL_OTHER; /* HTTP/2 */
	/* A method: its characters up to a space, or to the last byte looked at. */
#pragma unroll
	for (int i = 1; i < sizeof(head); i++) {
		if (i >= len || head[i] == ' ')
			break;
		if (!is_method_char(head[i]))
			return PROBE_PROTOCOL_OTHER;
	}
	return PROBE_PROTOCOL_HTTP;
}

/* Is the fd of a syscall made inside SSL_read/SSL_write the SSL's socket?
 * Libraries also read files there (Node.js does): a traced connection is
 * taken, or one open before the probe whose bytes are a TLS record. */
static __always_inline bool is_tls_socket(u32 pid, const struct syscall_args *call, long ret)
{
	struct probe_conn_key key = {.pid = pid, .fd = call->fd};
	struct probe_conn_state *state = conns.lookup(&key);
	if (state)
		return !state->ignored;
	return call->syscall != PROBE_SYS_SENDFILE &&
	       protocol_verdict(call, ret) == PROBE_PROTOCOL_TLS;
}

/* Is this call's data withheld from user space? Only HTTP's is sent, as the
 * connection's first bytes decide (protocol_verdict), or a TLS library
 * having used the socket (mark_tls_connection); at a TLS library, as the
 * first plaintext decides. */
static __always_inline bool withheld(struct probe_conn_state *state, u32 tid,
				     const struct syscall_args *call, long ret, u8 direction)
{
	bool at_library = call->syscall >= PROBE_SYS_SSL_READ;
	u8 *protocol = at_library ? &state->plaintext : &state->protocol;
	if (*protocol == PROBE_PROTOCOL_UNSEEN)
		*protocol = protocol_verdict(call, ret);
	if (*protocol == PROBE_PROTOCOL_HTTP)
		return false;
	if (at_library || *protocol != PROBE_PROTOCOL_TLS) {
		count(PROBE_COUNTER_NOT_HTTP);
		return true;
	}
	if (direction == PROBE_INGRESS && !tls_calls.lookup(&tid)) {
		s32 fd = call->fd;
		tls_last_read.update(&tid, &fd);
	}
	count(PROBE_COUNTER_TLS_CIPHERTEXT);
	return true;
}

#if PROBE_EXCHANGE_RATE
/* The rate limit is a token bucket, host-wide, counted in nanoseconds: time
 * adds credit, an exchange costs a second's share of the rate, and a second's
 * worth may gather, so a burst after a quiet spell is traced whole and a
 * sustained excess is shed evenly. */
#define NS_PER_SEC 1000000000LL
#define EXCHANGE_BURST_NS NS_PER_SEC
struct exchange_budget {
	s64 refilled_ns; /* when credit was last added */
	s64 credit_ns;
};
BPF_ARRAY(exchange_budget, struct exchange_budget, 1);

/* What an exchange costs now, in ns of credit: user space lowers the rate
 * while the CPU is short and raises it back to PROBE_EXCHANGE_RATE after
 * (probe/kernel/governor.py). Until it first writes, the rate compiled in. */
BPF_ARRAY(exchange_cost, s64, 1);

static __always_inline s64 exchange_cost_ns(void)
{
	u32 zero = 0;
	s64 *cost = exchange_cost.lookup(&zero);
	return cost && *cost > 0 ? *cost : NS_PER_SEC / PROBE_EXCHANGE_RATE;
}

/* The bucket, its credit added for the time since it was last: 0 if missing.
 * Two CPUs may both add the same moment's credit, or one overwrite the
 * other's spending: a few exchanges more than the rate, never a lock on
 * this path. */
static __always_inline struct exchange_budget *refilled_budget(u64 now)
{
	u32 zero = 0;
	struct exchange_budget *budget = exchange_budget.lookup(&zero);
	if (!budget)
		return 0;
	s64 elapsed = (s64)now - budget->refilled_ns;
	if (elapsed > 0) {
		s64 credit = budget->credit_ns + elapsed;
		budget->credit_ns = credit < EXCHANGE_BURST_NS ? credit : EXCHANGE_BURST_NS;
		budget->refilled_ns = now;
	}
	return budget;
}

/* The server end of a connection, at its first request: if its client end is
 * traced on this host too (client_ends), each end is told of the other. The
 * client's first bytes were written before the server could read them, so
 * its connect() has returned and remembered it by now. */
static __always_inline void pair_ends(const struct probe_conn_key *key,
				      struct probe_conn_state *state)
{
	if (state->local.family == PROBE_AF_UNSPEC || state->peer.family == PROBE_AF_UNSPEC)
		return;
	struct conn_ends ends = {};
	ends_endpoint(&ends.client, &state->peer);
	ends_endpoint(&ends.server, &state->local);
	struct client_end *slot = client_end_slot(&ends);
	struct client_end_entry taken;
	if (!slot || !take_entry(&slot->seal, &slot->entry, &taken, sizeof(taken), &ends,
				 sizeof(ends)))
		return;
	struct probe_conn_id client = taken.conn;
	struct probe_conn_key client_key = {.pid = client.pid, .fd = client.fd};
	struct probe_conn_state *other = conns.lookup(&client_key);
	if (!other || other->generation != client.generation || other->ignored)
		return;
	other->partner.pid = key->pid;
	other->partner.fd = key->fd;
	other->partner.generation = state->generation;
	state->partner = client;
}

/* Where the two ends of a connection keep their latest verdict: the client
 * end's entry, or this end's own while its other end is not known here. */
static __always_inline u64 *verdict_slot(struct probe_conn_state *state)
{
	if (state->role == PROBE_ROLE_CLIENT || !state->partner.generation)
		return &state->judged;
	struct probe_conn_key key = {.pid = state->partner.pid, .fd = state->partner.fd};
	struct probe_conn_state *client = conns.lookup(&key);
	if (!client || client->generation != state->partner.generation)
		return &state->judged;
	return &client->judged;
}

/* The verdict on this exchange (probe_conn_state.judged): the other end's, if
 * it judged it first, else `proposed`, this end's, which the other end will
 * take. Two ends judging the same exchange at once: one writes, one takes. */
static __always_inline u64 shared_verdict(struct probe_conn_state *state, u64 proposed)
{
	u64 *slot = verdict_slot(state);
	u64 seen = *(volatile u64 *)slot;
	if (seen >> 2 == state->exchanges)
		return seen;
	u64 found = __sync_val_compare_and_swap(slot, seen, proposed);
	return found == seen || found >> 2 != state->exchanges ? proposed : found;
}
#endif

/* Is this call part of an exchange shed for the rate limit (PROBE_EXCHANGE_RATE)?
 * Only whole exchanges are shed, so that user space's parser never sees half
 * of one: the verdict is taken as a request starts (probe_exchange_bits) and
 * holds for every call until the next one starts. Over the limit, a request
 * costs its syscalls' programs but no record, no copy, no user-space work:
 * the probe's CPU stays bounded however busy the node. A connection whose
 * role is unknown (open before the probe) is never shed: which side asks is
 * not known.
 *
 * Both ends of a connection on this host share their verdicts: the one that
 * starts an exchange first judges it, the other takes its verdict (and pays
 * for it, or counts it, alike), so a request is traced at both ends or at
 * neither.
 *
 * Also numbers the exchanges as they start (probe_conn_state.exchanges),
 * shed or not, with or without a limit: both ends of a same-host connection
 * count alike, so user space pairs their requests by that number.
 *
 * Reads the clock into `now` only where an exchange starts under a limit:
 * the other calls of a shed exchange (its response) never read it, 20-30 ns
 * a read here. */
static __always_inline bool shed(const struct probe_conn_key *key,
				 struct probe_conn_state *state,
				 const struct syscall_args *call, long ret, u8 direction, u64 *now)
{
	u8 moved = direction == PROBE_INGRESS ? PROBE_EXCHANGE_MOVED_INGRESS
					      : PROBE_EXCHANGE_MOVED_EGRESS;
	u8 bits = state->exchange;
	if (!(bits & moved)) { /* the first bytes this way since the other way's */
		u8 asking = state->role == PROBE_ROLE_SERVER ? PROBE_INGRESS : PROBE_EGRESS;
		bool starts = state->role != PROBE_ROLE_UNKNOWN && direction == asking;
		if (starts)
			state->exchanges++;
#if PROBE_EXCHANGE_RATE
		if (starts && state->role == PROBE_ROLE_SERVER && state->exchanges == 1)
			pair_ends(key, state);
		struct exchange_budget *budget = 0;
		if (starts) {
			*now = bpf_ktime_get_ns();
			budget = refilled_budget(*now);
		}
		if (budget) {
			s64 cost = exchange_cost_ns();
			bool was_shed = bits & PROBE_EXCHANGE_SHED;
			u64 over = budget->credit_ns < cost;
			u64 pays = 2; /* a new exchange: counted if shed, paid for if not */
			/* Where the verdict would change, bytes that do not start a
			 * request go on with the exchange before them, as a body sent
			 * after "100 Continue" does. Looked at there only: the verdict
			 * rarely changes, and a read of user memory costs 100-150 ns;
			 * elsewhere such a body takes or sheds as an exchange would. */
			u64 len;
			if (over != was_shed && !looks_like_http(first_segment(call, ret, &len))) {
				over = was_shed;
				pays = 0;
			}
			u64 verdict = shared_verdict(state, (u64)state->exchanges << 2 | pays | over);
			over = verdict & 1;
			if (verdict & 2) {
				if (over)
					count(PROBE_COUNTER_SHED);
				else
					__sync_fetch_and_add(&budget->credit_ns, -cost);
			}
			bits &= ~PROBE_EXCHANGE_SHED;
			if (over)
				bits |= PROBE_EXCHANGE_SHED;
		}
#endif
		bits = (bits & ~PROBE_EXCHANGE_MOVED) | moved;
		state->exchange = bits;
		state->message_bytes = 0;
	}
	return bits & PROBE_EXCHANGE_SHED;
}

/* Sends an accepted connection's OPEN, if it waits (probe_conn_state.unannounced).
 * False if the entry is a leftover, deleted here: its process exec'd or exited
 * since the accept (fds_reset_ns), so the descriptor is no longer that socket
 * and user space, never told of it, could not delete it. A socket that did
 * outlive an exec is picked up again from its next bytes (sniff_connection). */
static __always_inline bool announce(struct probe_conn_key *key, u32 tid,
				     struct probe_conn_state *state)
{
	if (!state->unannounced)
		return true;
	u32 pid = key->pid;
	u64 *reset_ns = fds_reset_ns.lookup(&pid);
	if (reset_ns && *reset_ns > state->generation) {
		conns.delete(key);
		return false;
	}
	state->unannounced = 0;
	struct probe_conn_event event = {};
	event.local = state->local;
	event.peer = state->peer;
	emit_open(&event, key->pid, key->fd, tid, state->generation, state->role);
	return true;
}

/* Defined in go.bpf.c: the goroutine that the read or write ending now on
 * this thread works for, if the thread is a Go program's; 0 otherwise. */
static __always_inline u64 go_socket_goroutine(u32 pid, u32 tid, s32 fd);

/* The data event of a call that moved ret > 0 bytes on a traced connection,
 * built in a scratch slot with no goroutine and no flags, numbered with its
 * exchange; 0 when the fd is not traced. Also used for plaintext at TLS
 * libraries, where `call` describes the library call; its kind says which
 * way the bytes went. Always send it with emit_data(), which gives the slot
 * back. */
static __always_inline struct probe_data_event *data_event(u32 pid, u32 tid,
							   const struct syscall_args *call,
							   long ret)
{
	u8 direction = direction_of(call->syscall);
	struct probe_conn_key key = {.pid = pid, .fd = call->fd};
	struct probe_conn_state *state = conns.lookup(&key);
	if (!state && call->syscall != PROBE_SYS_SENDFILE)
		state = sniff_connection(&key, tid, call, ret);
	if (!state || state->ignored)
		return 0;
	if (withheld(state, tid, call, ret, direction)) {
		if (state->protocol == PROBE_PROTOCOL_TLS)
			announce(&key, tid, state); /* user space looks for the TLS library */
		return 0;
	}
	u64 exit_ns = 0; /* read where an exchange starts, or once it is known to be sent */
	if (shed(&key, state, call, ret, direction, &exit_ns) || !announce(&key, tid, state))
		return 0;
	if (!exit_ns)
		exit_ns = bpf_ktime_get_ns();

	struct data_scratch *scratch = take_scratch();
	if (!scratch)
		return 0;
	struct probe_data_event *event = &scratch->event;
	struct probe_conn_id conn = {.pid = pid, .fd = call->fd, .generation = state->generation};
	fill_header(&event->header, PROBE_EVENT_DATA, tid, &conn,
		    direction == PROBE_INGRESS ? exit_ns : call->enter_ns);
	event->exit_ns = exit_ns;
	event->bytes = ret;
	event->direction = direction;
	event->role = state->role;
	event->syscall = call->syscall;
	event->flags = 0;
	event->exchange = state->exchanges;
	event->goroutine = 0;
	/* The copy's size comes from ret read back from the event, which the
	 * verifier knows nothing of. Bounding a copy by ret itself would make
	 * the verifier keep apart every range the checks above narrowed ret to,
	 * and walk the rest of the program once for each: three to four times
	 * the work at every start (probe run's `ready`). */
	long moved = *(volatile typeof(event->bytes) *)&event->bytes;
	/* What user space parses is a message's head and a chunked body's chunk
	 * sizes; past a message's first PROBE_CAPTURE_BYTES it mostly counts, and
	 * a call with one buffer then sends only its last bytes: copies of a large
	 * body cost the kernel, the ring buffer and the reader for nothing, and
	 * raised the server's latency too (bench/README.md). Calls with iovecs
	 * (writev, sendmsg), whose last bytes are harder to find, still send their
	 * first bytes. */
	u32 seen = state->message_bytes;
	long left = seen < PROBE_CAPTURE_BYTES ? PROBE_CAPTURE_BYTES - seen : 0;
	state->message_bytes = moved < left ? seen + moved : PROBE_CAPTURE_BYTES;
	const void *buf = (const void *)call->buf;
	if (call->syscall == PROBE_SYS_SENDFILE) {
		event->captured = 0;
	} else if (is_vectored(call->syscall)) {
		event->captured = copy_iovecs(event->payload, (const struct iovec *)buf, call->len,
					      moved);
	} else if (left) {
		event->captured = copy_buffer(event->payload, buf, moved < left ? moved : left);
	} else {
		event->captured = copy_tail(event->payload, buf, moved);
		event->flags = PROBE_DATA_TAIL;
	}
	return event;
}

static __always_inline void emit_data(struct probe_data_event *event)
{
	u64 captured = event->captured;
	OPAQUE(captured);
	if (captured > PROBE_MAX_CAPTURE)
		captured = PROBE_MAX_CAPTURE;
	emit(event, offsetof(struct probe_data_event, payload) + captured);
	struct data_scratch *scratch =
		(void *)event - offsetof(struct data_scratch, event);
	*(volatile u64 *)&scratch->busy = 0;
}

/* The exit of every data syscall, read to sendfile64: one program, which
 * probe/kernel/loader.py attaches to each of their exit tracepoints. A copy
 * per syscall, each compiled for its own way of passing its buffer (plain,
 * iovecs, msghdr), made LLVM's work at every start nine times as long. */
int data_syscall_exit(struct syscall_exit_ctx *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 pid = id >> 32, tid = (u32)id;
	long ret = ctx->ret;
	struct syscall_args call;
	if (!take_data_syscall(tid, ctx->nr, &call) || ret <= 0)
		return 0;

	resolve_msghdr(&call);
	struct tls_call *tls = call.thread & THREAD_IN_TLS_CALL ? tls_calls.lookup(&tid) : 0;
	if (tls && is_tls_socket(pid, &call, ret)) { /* inside SSL_read/SSL_write */
		tls->fd = call.fd;
		mark_tls_connection(pid, call.fd);
	}
	struct probe_data_event *event = data_event(pid, tid, &call, ret);
	if (!event)
		return 0;
	if (call.thread & THREAD_GO_SYSCALL)
		event->goroutine = go_socket_goroutine(pid, tid, call.fd);
	emit_data(event);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_read)
{
	return save_data_args(args->__syscall_nr, args->fd, args->buf, args->count, PROBE_SYS_READ);
}

TRACEPOINT_PROBE(syscalls, sys_enter_write)
{
	return save_data_args(args->__syscall_nr, args->fd, args->buf, args->count,
			      PROBE_SYS_WRITE);
}

TRACEPOINT_PROBE(syscalls, sys_enter_readv)
{
	return save_data_args(args->__syscall_nr, args->fd, args->vec, args->vlen, PROBE_SYS_READV);
}

TRACEPOINT_PROBE(syscalls, sys_enter_writev)
{
	return save_data_args(args->__syscall_nr, args->fd, args->vec, args->vlen,
			      PROBE_SYS_WRITEV);
}

TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom)
{
	return save_data_args(args->__syscall_nr, args->fd, args->ubuf, args->size,
			      PROBE_SYS_RECVFROM);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendto)
{
	return save_data_args(args->__syscall_nr, args->fd, args->buff, args->len,
			      PROBE_SYS_SENDTO);
}

TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg)
{
	return save_data_args(args->__syscall_nr, args->fd, args->msg, 0, PROBE_SYS_RECVMSG);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg)
{
	return save_data_args(args->__syscall_nr, args->fd, args->msg, 0, PROBE_SYS_SENDMSG);
}

/* sendfile moves body bytes the probe never sees: counted, not copied. */
TRACEPOINT_PROBE(syscalls, sys_enter_sendfile64)
{
	return save_data_args(args->__syscall_nr, args->out_fd, 0, args->count, PROBE_SYS_SENDFILE);
}
