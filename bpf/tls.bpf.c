/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tls.bpf.c: plaintext at OpenSSL (1.1, 3, and BoringSSL where the names
 * match), through uprobes placed by probe/kernel/tls.py on SSL_read,
 * SSL_write, SSL_read_ex and SSL_write_ex in every libssl and every program
 * that links OpenSSL statically (Node.js).
 *
 * The uprobe records the call per thread (tls_calls, common.h); the
 * uretprobe reads the byte count and sends the plaintext as a data event of
 * the SSL's socket (as much of it as socket_data.bpf.c's data_event() copies
 * of any call), flagged PROBE_DATA_TLS.
 *
 * Which socket: OpenSSL has no stable layout to read the fd from, so it is
 * learnt from what the thread does. A socket syscall made inside the call
 * names it exactly (socket_data.bpf.c writes it into tls_calls); that is how
 * a socket BIO (nginx, curl, Python) works. A program that does its own
 * socket I/O and feeds OpenSSL from memory (Node.js) reads the ciphertext
 * just before calling SSL_read: the TLS socket the thread read last is taken
 * for an SSL* not known otherwise. Either way the answer is kept per SSL*,
 * with the connection's generation, so a reused fd is never joined to it.
 *
 * A second uprobe on the same function (one file seen by two paths) is
 * harmless: the first return consumes the thread's record.
 */

/* An SSL* of one process. */
struct ssl_key {
	u64 ssl;
	u32 pid;
	u32 _pad;
};

/* Its socket, and that connection's generation when it was learnt. */
struct ssl_socket {
	u64 generation;
	s32 fd;
	u32 _pad;
};
BPF_TABLE("lru_hash", struct ssl_key, struct ssl_socket, ssl_sockets, PROBE_MAX_CONNS);

static __always_inline int ssl_enter(struct pt_regs *ctx, u8 syscall, u64 count_ptr)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	/* An excluded thread's socket syscalls are not looked at, nor is its plaintext. */
	struct syscall_args *thread = wanted_thread(id);
	if (!thread)
		return 0;
	struct tls_call call = {};
	call.ssl = PT_REGS_PARM1(ctx);
	call.buf = PT_REGS_PARM2(ctx);
	call.count_ptr = count_ptr;
	call.enter_ns = bpf_ktime_get_ns();
	call.fd = -1;
	call.guess_fd = -1;
	call.syscall = syscall;
	s32 *last = tls_last_read.lookup(&tid);
	if (last) {
		call.guess_fd = *last;
		tls_last_read.delete(&tid);
	}
	tls_calls.update(&tid, &call);
	thread->thread |= THREAD_IN_TLS_CALL;
	return 0;
}

/* The socket remembered for this SSL*, if its connection is still the one
 * it was learnt on; -1 otherwise. */
static __always_inline s32 known_socket(u32 pid, u64 ssl)
{
	struct ssl_key key = {.ssl = ssl, .pid = pid};
	struct ssl_socket *known = ssl_sockets.lookup(&key);
	if (!known)
		return -1;
	struct probe_conn_key conn = {.pid = pid, .fd = known->fd};
	struct probe_conn_state *state = conns.lookup(&conn);
	return state && state->generation == known->generation ? known->fd : -1;
}

static __always_inline void remember_socket(u32 pid, u64 ssl, s32 fd)
{
	struct probe_conn_key conn = {.pid = pid, .fd = fd};
	struct probe_conn_state *state = conns.lookup(&conn);
	if (!state)
		return; /* not a traced connection (yet): nothing to join it to */
	struct ssl_key key = {.ssl = ssl, .pid = pid};
	struct ssl_socket socket = {.generation = state->generation, .fd = fd};
	ssl_sockets.update(&key, &socket);
}

/* Plaintext bytes the call moved: SSL_read and SSL_write return the count,
 * the _ex variants 1 and the count through their last argument. */
static __always_inline long bytes_moved(struct pt_regs *ctx, const struct tls_call *call)
{
	long ret = (int)PT_REGS_RC(ctx);
	if (ret <= 0 || !call->count_ptr)
		return ret;
	u64 moved = 0;
	read_user(&moved, sizeof(moved), (const void *)call->count_ptr);
	return (long)moved;
}

static __always_inline void send_plaintext(u32 pid, u32 tid, const struct tls_call *call, s32 fd,
					   long moved)
{
	struct syscall_args args = {};
	args.enter_ns = call->enter_ns;
	args.buf = call->buf;
	args.fd = fd;
	/* The kind as a constant the verifier sees: it then skips what
	 * data_event() does for syscalls only (iovecs, msghdr, sendfile), where
	 * a kind read from the map made it walk all of that (88,892 instructions
	 * verified, not 19,261). */
	args.syscall = call->syscall == PROBE_SYS_SSL_READ ? PROBE_SYS_SSL_READ : PROBE_SYS_SSL_WRITE;
	/* A connection open before the probe is picked up here if its
	 * plaintext looks like HTTP (data_event sniffs it). */
	struct probe_data_event *event = data_event(pid, tid, &args, moved);
	if (!event)
		return;
	event->flags |= PROBE_DATA_TLS;
	mark_tls_connection(pid, fd);
	emit_data(event);
}

/* The return of SSL_read, SSL_write and their _ex variants; the call's
 * saved entry says which. One program, not one per direction: each copy of
 * data_event() is LLVM's work at every start. */
int ssl_return(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 pid = id >> 32, tid = (u32)id;
	struct tls_call *saved = tls_calls.lookup(&tid);
	if (!saved)
		return 0;
	struct tls_call call = *saved;
	tls_calls.delete(&tid);
	clear_thread_bits(tid, THREAD_IN_TLS_CALL);

	/* The socket seen in this call, else the one known, else the guess. */
	s32 fd = call.fd;
	bool learnt = fd >= 0;
	if (!learnt) {
		fd = known_socket(pid, call.ssl);
		if (fd < 0) {
			fd = call.guess_fd;
			learnt = fd >= 0;
		}
	}
	long moved = bytes_moved(ctx, &call);
	if (moved > 0 && fd >= 0)
		send_plaintext(pid, tid, &call, fd, moved);
	else if (moved > 0)
		count(PROBE_COUNTER_TLS_NO_SOCKET);
	/* After sending: a connection picked up by its plaintext exists now. */
	if (learnt)
		remember_socket(pid, call.ssl, fd);
	return 0;
}

/* int SSL_read(SSL *ssl, void *buf, int num) */
int ssl_read_enter(struct pt_regs *ctx)
{
	return ssl_enter(ctx, PROBE_SYS_SSL_READ, 0);
}

/* int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes) */
int ssl_read_ex_enter(struct pt_regs *ctx)
{
	return ssl_enter(ctx, PROBE_SYS_SSL_READ, PT_REGS_PARM4(ctx));
}

/* int SSL_write(SSL *ssl, const void *buf, int num) */
int ssl_write_enter(struct pt_regs *ctx)
{
	return ssl_enter(ctx, PROBE_SYS_SSL_WRITE, 0);
}

/* int SSL_write_ex(SSL *ssl, const void *buf, size_t num, size_t *written) */
int ssl_write_ex_enter(struct pt_regs *ctx)
{
	return ssl_enter(ctx, PROBE_SYS_SSL_WRITE, PT_REGS_PARM4(ctx));
}

/* A thread that ends inside a TLS call (killed) never returns from it:
 * its records must not outlive it for a later thread with the same id.
 * Attached to the raw tracepoint sched_process_exit by probe/kernel/tls.py. */
int tls_thread_exit(void *ctx)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	tls_calls.delete(&tid);
	tls_last_read.delete(&tid);
	return 0;
}
