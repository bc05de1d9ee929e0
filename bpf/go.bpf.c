/* SPDX-License-Identifier: Apache-2.0 */
/*
 * go.bpf.c: Go programs, through uprobes placed by probe/kernel/golang.py.
 *
 * 1. Which goroutine each socket I/O is done for. Go's register ABI keeps
 *    the running goroutine (g) in r14. syscall.read/syscall.write, called
 *    on the goroutine's thread just before the syscall, tell the socket
 *    data handlers (socket_data.bpf.c) the goroutine and fd of the coming
 *    syscall; they stamp the event with the goroutine it works *for*:
 *    - a server connection's goroutine (net/http.(*conn).serve), which
 *      reads its requests and runs their handlers, works for itself, and
 *      so do the goroutines created by it or by them (runtime.newproc1):
 *      go func() { http.Get(...) }() in a handler;
 *    - a client connection's readLoop and writeLoop goroutines work for
 *      the goroutine whose request the connection carries
 *      (net/http.(*persistConn).roundTrip), because net/http writes the
 *      request and reads the response on goroutines of its own.
 * 2. crypto/tls plaintext: (*Conn).Read and Write, from their entry to their
 *    return instructions (Go moves stacks: no uretprobes), one data event
 *    each with the TLS flag. The *Conn is tied to its socket by the syscalls
 *    its goroutine makes during the call; such a socket is marked TLS and
 *    its ciphertext is not sent.
 *
 * Goroutine and object pointers are ids only within a process: every map
 * shared by processes is keyed by pid too. Entries of a goroutine are
 * replaced when runtime.newproc1 hands out its g again; LRU bounds the rest.
 */

#define GO_MAX_GOROUTINES 65536
#define GO_MAX_CONNS 16384

/* A goroutine, or a Go object, of one process. */
struct go_key {
	u32 pid;
	u32 _pad;
	u64 ptr;
};

/* Goroutine -> the goroutine whose requests it works for: a server
 * connection's goroutine itself, and the goroutines created by it or by them. */
BPF_TABLE("lru_hash", struct go_key, u64, go_request_of, GO_MAX_GOROUTINES);

/* readLoop or writeLoop goroutine -> its *persistConn. */
BPF_TABLE("lru_hash", struct go_key, u64, go_conn_loop, GO_MAX_CONNS);

/* *persistConn -> the goroutine its current request works for. */
BPF_TABLE("lru_hash", struct go_key, u64, go_conn_request, GO_MAX_CONNS);

/* Thread -> the goroutine and fd of the read or write syscall it is about
 * to make; read by the syscall's exit (go_socket_goroutine). */
struct go_syscall {
	u64 goroutine;
	s32 fd;
	u32 _pad;
};
BPF_TABLE("lru_hash", u32, struct go_syscall, go_syscall, PROBE_MAX_INFLIGHT);

/* Thread -> the goroutine calling runtime.newproc1, until it returns the
 * new one (it runs on the system stack: one thread throughout). */
BPF_TABLE("lru_hash", u32, u64, go_creator, PROBE_MAX_INFLIGHT);

/* Goroutine -> the crypto/tls.(*Conn) call it is in. */
enum go_tls_op {
	GO_TLS_HANDSHAKE = 0,
	GO_TLS_READ = PROBE_SYS_GO_TLS_READ,
	GO_TLS_WRITE = PROBE_SYS_GO_TLS_WRITE,
};
struct go_tls_call {
	u64 conn; /* *tls.Conn */
	u64 buf;
	u64 len;
	u64 enter_ns;
	u8 op; /* enum go_tls_op */
	u8 _pad[7];
};
BPF_TABLE("lru_hash", struct go_key, struct go_tls_call, go_tls_call, GO_MAX_GOROUTINES);

/* *tls.Conn -> its socket's fd, learnt from the syscalls made inside it. */
BPF_TABLE("lru_hash", struct go_key, s32, go_tls_fd, GO_MAX_CONNS);

static __always_inline struct go_key go_key_of(u32 pid, u64 ptr)
{
	struct go_key key = {.pid = pid, .ptr = ptr};
	return key;
}

/* The goroutine that goroutine g works for (g itself by default). */
static __always_inline u64 go_works_for(u32 pid, u64 g)
{
	struct go_key key = go_key_of(pid, g);
	u64 *conn = go_conn_loop.lookup(&key);
	if (conn) {
		struct go_key conn_key = go_key_of(pid, *conn);
		u64 *owner = go_conn_request.lookup(&conn_key);
		return owner ? *owner : g;
	}
	u64 *request = go_request_of.lookup(&key);
	return request ? *request : g;
}

/* Declared in socket_data.bpf.c: the goroutine of the syscall ending now on
 * thread tid, if a Go uprobe announced one for this fd; 0 otherwise. */
static __always_inline u64 go_socket_goroutine(u32 pid, u32 tid, s32 fd)
{
	struct go_syscall *call = go_syscall.lookup(&tid);
	if (!call)
		return 0;
	u64 g = call->goroutine;
	s32 announced = call->fd;
	go_syscall.delete(&tid);
	clear_thread_bits(tid, THREAD_GO_SYSCALL);
	return announced == fd ? go_works_for(pid, g) : 0;
}

/* syscall.read and syscall.write entry: RAX = fd. */
int go_syscall_enter(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 pid = id >> 32, tid = (u32)id;
	if (!process_wanted(pid))
		return 0;
	struct go_syscall call = {.goroutine = ctx->r14, .fd = (s32)ctx->ax};
	go_syscall.update(&tid, &call);
	set_thread_bits(tid, THREAD_GO_SYSCALL);

	/* Inside a crypto/tls call: this fd is the *Conn's socket. */
	struct go_key key = go_key_of(pid, ctx->r14);
	struct go_tls_call *tls = go_tls_call.lookup(&key);
	if (tls) {
		struct go_key conn_key = go_key_of(pid, tls->conn);
		go_tls_fd.update(&conn_key, &call.fd);
		mark_tls_connection(pid, call.fd);
	}
	return 0;
}

/* net/http.(*conn).serve entry: this goroutine serves one connection, its
 * requests' handlers included. Those goroutines it creates work for it too,
 * e.g. the one that reads ahead the first byte of the next request. */
int go_serve_enter(struct pt_regs *ctx)
{
	u32 pid = bpf_get_current_pid_tgid() >> 32;
	if (!process_wanted(pid))
		return 0;
	struct go_key key = go_key_of(pid, ctx->r14);
	u64 g = ctx->r14;
	go_request_of.update(&key, &g);
	return 0;
}

/* runtime.newproc1(fn *funcval, callergp *g, callerpc uintptr, ...) *g
 * entry (Go 1.18 and later): RBX = the creating goroutine. */
int go_newproc_enter(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	if (!process_wanted(id >> 32))
		return 0;
	u64 creator = ctx->bx;
	go_creator.update(&tid, &creator);
	return 0;
}

/* ... and its return instructions: RAX = the new goroutine, whose g may be
 * a dead goroutine's, reused: what was known of that one is dropped. */
int go_newproc_return(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 pid = id >> 32, tid = (u32)id;
	u64 *creator = go_creator.lookup(&tid);
	if (!creator)
		return 0;
	struct go_key creator_key = go_key_of(pid, *creator);
	go_creator.delete(&tid);
	struct go_key key = go_key_of(pid, ctx->ax);
	go_conn_loop.delete(&key);
	go_tls_call.delete(&key);
	u64 *request = go_request_of.lookup(&creator_key);
	if (request) {
		u64 inherited = *request;
		go_request_of.update(&key, &inherited);
	} else {
		go_request_of.delete(&key);
	}
	return 0;
}

/* net/http.(*persistConn).roundTrip entry: RAX = the connection, which
 * carries this goroutine's request from now on. */
int go_round_trip(struct pt_regs *ctx)
{
	u32 pid = bpf_get_current_pid_tgid() >> 32;
	if (!process_wanted(pid))
		return 0;
	struct go_key conn_key = go_key_of(pid, ctx->ax);
	u64 request = go_works_for(pid, ctx->r14);
	go_conn_request.update(&conn_key, &request);
	return 0;
}

/* net/http.(*persistConn).readLoop and writeLoop entry: RAX = the connection. */
int go_conn_loop_enter(struct pt_regs *ctx)
{
	u32 pid = bpf_get_current_pid_tgid() >> 32;
	if (!process_wanted(pid))
		return 0;
	struct go_key key = go_key_of(pid, ctx->r14);
	u64 conn = ctx->ax;
	go_conn_loop.update(&key, &conn);
	return 0;
}

/* crypto/tls.(*Conn) method entry: RAX = the *Conn; for Read and Write,
 * RBX and RCX = the slice's pointer and length. A handshake run inside a
 * Read or Write does not replace that call. */
static __always_inline int go_tls_enter(struct pt_regs *ctx, u8 op)
{
	u32 pid = bpf_get_current_pid_tgid() >> 32;
	if (!process_wanted(pid))
		return 0;
	struct go_key key = go_key_of(pid, ctx->r14);
	struct go_tls_call call = {};
	call.conn = ctx->ax;
	call.op = op;
	if (op != GO_TLS_HANDSHAKE) {
		call.buf = ctx->bx;
		call.len = ctx->cx;
		call.enter_ns = bpf_ktime_get_ns();
	}
	if (op == GO_TLS_HANDSHAKE)
		go_tls_call.insert(&key, &call);
	else
		go_tls_call.update(&key, &call);
	return 0;
}

int go_tls_read_enter(struct pt_regs *ctx)
{
	return go_tls_enter(ctx, GO_TLS_READ);
}

int go_tls_write_enter(struct pt_regs *ctx)
{
	return go_tls_enter(ctx, GO_TLS_WRITE);
}

int go_tls_handshake_enter(struct pt_regs *ctx)
{
	return go_tls_enter(ctx, GO_TLS_HANDSHAKE);
}

/* The return instructions of Read and Write: RAX = bytes moved. The
 * plaintext goes out on the *Conn's socket, as a traced connection. One
 * program for both (see ssl_return() in tls.bpf.c): the goroutine's saved
 * call says which returned. */
int go_tls_data_return(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 pid = id >> 32, tid = (u32)id;
	struct go_key key = go_key_of(pid, ctx->r14);
	struct go_tls_call *found = go_tls_call.lookup(&key);
	if (!found || found->op == GO_TLS_HANDSHAKE)
		return 0;
	struct go_tls_call call = *found;
	go_tls_call.delete(&key);
	long ret = (long)ctx->ax;
	if (ret <= 0)
		return 0;

	struct go_key conn_key = go_key_of(pid, call.conn);
	s32 *fd = go_tls_fd.lookup(&conn_key);
	if (!fd) {
		count(PROBE_COUNTER_TLS_NO_SOCKET);
		return 0;
	}
	/* The kind as a constant the verifier sees (see send_plaintext() in tls.bpf.c). */
	struct syscall_args args = {.enter_ns = call.enter_ns, .buf = call.buf, .len = call.len,
				    .fd = *fd,
				    .syscall = call.op == GO_TLS_READ ? GO_TLS_READ : GO_TLS_WRITE};
	struct probe_data_event *event = data_event(pid, tid, &args, ret);
	if (!event)
		return 0;
	event->goroutine = go_works_for(pid, ctx->r14);
	event->flags |= PROBE_DATA_TLS;
	emit_data(event);
	return 0;
}

/* The return instructions of handshakeContext: its call ends, unless it ran
 * inside a Read or Write, whose call it left in place. */
int go_tls_handshake_return(struct pt_regs *ctx)
{
	u32 pid = bpf_get_current_pid_tgid() >> 32;
	struct go_key key = go_key_of(pid, ctx->r14);
	struct go_tls_call *found = go_tls_call.lookup(&key);
	if (found && found->op == GO_TLS_HANDSHAKE)
		go_tls_call.delete(&key);
	return 0;
}
