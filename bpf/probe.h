/* SPDX-License-Identifier: Apache-2.0 */
/*
 * probe.h: the contract between the BPF programs and user space.
 *
 * Every struct, enum and limit that crosses the ring buffer or a map shared
 * with user space is defined here, once. Plain C with fixed-width types and
 * no kernel includes, so that both sides read the same text: the BPF side
 * through bcc, the Python side through cffi (probe/kernel/contract.py), which
 * accepts only structs, enums and integer #defines, so keep it that way.
 * Padding is explicit: no field's offset depends on a compiler's choice.
 */
#ifndef PROBE_H
#define PROBE_H

/* Largest payload copied per message; the run-time capture size
 * (PROBE_CAPTURE_BYTES, default 4096) may be smaller, never larger. */
#define PROBE_MAX_CAPTURE 16384
/* Bytes copied from the end of a plain-buffer call past a message's first
 * PROBE_CAPTURE_BYTES (PROBE_DATA_TAIL): enough for a chunked body's end,
 * the CRLF of its last chunk, "0" and two more CRLFs. */
#define PROBE_TAIL_BYTES 8
/* iovec entries walked per readv/writev/sendmsg/recvmsg. */
#define PROBE_MAX_IOVECS 8
/* Bytes looked at to recognise HTTP on a connection the probe did not see open. */
#define PROBE_SNIFF_BYTES 8
/* Bytes of an exec's path kept in struct probe_image_key, its NUL included;
 * a longer path is never remembered. */
#define PROBE_IMAGE_PATH 120
/* Images the kernel remembers as examined (the `known_images` map). */
#define PROBE_MAX_KNOWN_IMAGES 1024

enum probe_event_type {
	PROBE_EVENT_DATA = 1,  /* struct probe_data_event */
	PROBE_EVENT_OPEN = 2,  /* struct probe_conn_event: connect() or accept() returned */
	PROBE_EVENT_CLOSE = 3, /* struct probe_event_header alone: close() of a traced connection */
	PROBE_EVENT_ADDR = 4,  /* struct probe_conn_event: local address learnt after OPEN */
	PROBE_EVENT_EXIT = 5,  /* struct probe_event_header alone: a process exited */
	PROBE_EVENT_EXEC = 6,  /* struct probe_exec_event: a process exec'd a new image
				* (user space looks for TLS libraries and Go in it) */
};

enum probe_direction {
	PROBE_INGRESS = 0, /* read or received by the traced process */
	PROBE_EGRESS = 1,  /* written or sent by the traced process */
};

enum probe_role {
	PROBE_ROLE_UNKNOWN = 0, /* open before the probe started: seen first in its data */
	PROBE_ROLE_CLIENT = 1,  /* the process called connect() */
	PROBE_ROLE_SERVER = 2,  /* the process called accept() */
};

/* Which syscall produced a data event; SENDFILE carries a count, no bytes. */
enum probe_syscall {
	PROBE_SYS_READ = 1,
	PROBE_SYS_WRITE = 2,
	PROBE_SYS_READV = 3,
	PROBE_SYS_WRITEV = 4,
	PROBE_SYS_RECVFROM = 5,
	PROBE_SYS_SENDTO = 6,
	PROBE_SYS_RECVMSG = 7,
	PROBE_SYS_SENDMSG = 8,
	PROBE_SYS_SENDFILE = 9,
	/* Plaintext at the TLS library, not at the socket (flags has PROBE_DATA_TLS). */
	PROBE_SYS_SSL_READ = 10,
	PROBE_SYS_SSL_WRITE = 11,
	PROBE_SYS_GO_TLS_READ = 12,
	PROBE_SYS_GO_TLS_WRITE = 13,
};

/* Bits of probe_data_event.flags. */
enum probe_data_flags {
	PROBE_DATA_TLS = 1,  /* decrypted bytes from a TLS library's read or write */
	PROBE_DATA_TAIL = 2, /* the payload is the call's last bytes, not its first */
};

/* Address families as the kernel numbers them (AF_INET, AF_INET6). */
enum probe_family {
	PROBE_AF_UNSPEC = 0,
	PROBE_AF_INET = 2,
	PROBE_AF_INET6 = 10,
};

/* Identifies a traced connection for its whole life. generation is the
 * monotonic time the probe first saw it: pid and fd reuse never join two. */
struct probe_conn_id {
	__u32 pid; /* process (thread group) id */
	__s32 fd;
	__u64 generation;
};

struct probe_endpoint {
	__u8 addr[16]; /* IPv4 in the first 4 bytes, or IPv6; network order */
	__u16 port;    /* host order; 0 when unknown */
	__u16 family;  /* enum probe_family; PROBE_AF_UNSPEC when unknown */
	__u32 _pad;
};

/* First in every ring-buffer record; `type` says which record follows. */
struct probe_event_header {
	__u32 type; /* enum probe_event_type */
	__u32 tid;
	struct probe_conn_id conn;
	__u64 timestamp_ns; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC; for data, a write's
			     * entry, or a read's return (a read may block) */
};

/* One read- or write-like syscall on a traced connection. Only
 * `captured` bytes of payload are sent: the record is variable-length. For a
 * call with one buffer they are its first bytes, as far as the first
 * PROBE_CAPTURE_BYTES of its message reach (the bytes moved one way until
 * they move the other), and past them its last PROBE_TAIL_BYTES (flags has
 * PROBE_DATA_TAIL), where a chunked body's end shows. A call with iovecs
 * sends its first PROBE_CAPTURE_BYTES wherever it falls; sendfile none. */
struct probe_data_event {
	struct probe_event_header header;
	__u64 exit_ns;     /* syscall return */
	__s64 bytes;       /* the syscall's return value: bytes moved, > 0 */
	__u64 goroutine;   /* Go: the goroutine this I/O is done for; 0 elsewhere */
	__u32 captured;    /* payload bytes that follow */
	__u8 direction;    /* enum probe_direction */
	__u8 role;         /* enum probe_role */
	__u8 syscall;      /* enum probe_syscall */
	__u8 flags;        /* enum probe_data_flags */
	/* Which exchange of its connection the call belongs to, counted from 1 by
	 * the kernel as requests start (probe_conn_state.exchanges), shed ones
	 * included: both ends of a connection number its requests alike, whatever
	 * each end shed. 0: not counted (a connection picked up mid-stream). */
	__u32 exchange;
	__u32 _pad;
	char payload[PROBE_MAX_CAPTURE];
};

struct probe_conn_event {
	struct probe_event_header header;
	struct probe_endpoint local;
	struct probe_endpoint peer;
	__u8 role; /* enum probe_role */
	__u8 _pad[7];
	/* The process's name: a short-lived client may be gone from /proc by
	 * the time user space reads it, and its name is better than nothing. */
	char comm[16];
};

/* An exec's image as the kernel names it: the path execve() was given, in
 * the cgroup of the process (which stands for its container's files). Key of
 * the `known_images` map, which user space fills with the images it has
 * examined. An empty path (relative, or longer than PROBE_IMAGE_PATH - 1
 * bytes) names nothing: it is never looked up, nor remembered. */
struct probe_image_key {
	__u64 cgroup_id;
	char path[PROBE_IMAGE_PATH]; /* NUL-padded */
};

struct probe_exec_event {
	struct probe_event_header header;
	struct probe_image_key image;
	char comm[16];
	/* 1: the image was in `known_images`: its file's uprobes are on already,
	 * so the record waits for the reader's next poll instead of waking it. */
	__u8 known;
	__u8 _pad[7];
};

/* Key of the `excluded_comms` map, which user space fills: a process name
 * as the kernel keeps it (bpf_get_current_comm), NUL-padded. */
struct probe_comm {
	char name[16];
};

/* Key and value of the `conns` map, which user space also writes: it marks
 * connections to ignore (not a socket, filtered out) and deletes the
 * connections of exited processes. */
struct probe_conn_key {
	__u32 pid;
	__s32 fd;
};

struct probe_conn_state {
	__u64 generation;
	__u8 role;    /* enum probe_role */
	__u8 ignored;   /* 1: a socket or file the probe decided not to trace */
	__u8 protocol;  /* enum probe_protocol: of the bytes on the socket */
	__u8 plaintext; /* enum probe_protocol: of the bytes a TLS library moved */
	__u8 exchange;  /* enum probe_exchange_bits: kernel-only, 0 from user space */
	/* 1: an accepted connection whose OPEN is not sent yet. It goes with the
	 * connection's first record (or as its bytes turn out to be TLS, for user
	 * space to look for the TLS library), from the addresses kept below: a
	 * connection that never carries HTTP, or whose every exchange is shed,
	 * costs user space nothing. Clients announce at connect(): the server's
	 * end of a same-host request must find its client end already known. */
	__u8 unannounced;
	__u8 _pad[2];
	struct probe_endpoint local; /* while unannounced */
	struct probe_endpoint peer;
	__u32 exchanges; /* requests started so far: see probe_data_event.exchange */
	/* Bytes moved the same way since they last moved the other way, counted
	 * up to PROBE_CAPTURE_BYTES: what is left of the message's capture. */
	__u32 message_bytes;
	/* The latest verdict of the rate limit, (exchange number << 2) | (paid or
	 * counted << 1) | shed, in the client end's entry, which both ends of a
	 * connection on this host share: the end that starts an exchange first
	 * writes it (compare-and-swap), the other takes it. */
	__u64 judged;
	/* The other end of this connection, when it is traced on this host too
	 * (generation 0: not known). */
	struct probe_conn_id partner;
};

/* probe_conn_state.exchange: the direction bytes last moved, and whether the
 * exchange they belong to is shed (over PROBE_EXCHANGE_RATE: none of its
 * records are sent). An exchange starts where a request does: the first
 * bytes a server reads, or a client writes, after bytes moved the other way. */
enum probe_exchange_bits {
	PROBE_EXCHANGE_MOVED_INGRESS = 1,
	PROBE_EXCHANGE_MOVED_EGRESS = 2,
	PROBE_EXCHANGE_MOVED = 3, /* either */
	PROBE_EXCHANGE_SHED = 4,
};

/* probe_conn_state.protocol: what the connection's first bytes say. Only
 * HTTP's bytes on the socket are sent. A TLS connection's are ciphertext; its
 * plaintext comes from the uprobes on the TLS library (bpf/tls.bpf.c,
 * bpf/go.bpf.c) instead, and is sent if it, in turn, is HTTP's
 * (probe_conn_state.plaintext). Any other protocol's (a database's, a
 * cache's, a broker's) would only be parsed to be thrown away, a record each. */
enum probe_protocol {
	PROBE_PROTOCOL_UNSEEN = 0, /* nothing, or 1-2 bytes of a TLS record, moved yet: not sent */
	PROBE_PROTOCOL_HTTP = 1,   /* a request method and a space, or a status line */
	PROBE_PROTOCOL_TLS = 2,    /* a TLS record, or a TLS library used the socket */
	PROBE_PROTOCOL_OTHER = 3,  /* anything else */
};

/* Indexes of the per-CPU `counters` array that user space reports. */
enum probe_counter {
	PROBE_COUNTER_LOST = 0,       /* ring buffer full: a record was not delivered */
	PROBE_COUNTER_TRUNCATED = 1,  /* an iovec walk stopped at PROBE_MAX_IOVECS */
	PROBE_COUNTER_TLS_CIPHERTEXT = 2, /* socket I/O of a TLS connection, not sent */
	PROBE_COUNTER_TLS_NO_SOCKET = 3,  /* TLS plaintext dropped: its socket was not known */
	PROBE_COUNTER_NOT_HTTP = 4,       /* I/O, or TLS plaintext, not (yet) seen to be HTTP */
	PROBE_COUNTER_SHED = 5,           /* an exchange over the rate limit: none of it sent */
	PROBE_COUNTER_BARE_ACCEPTS = 6,   /* accept() without an address buffer (libuv's way) */
	PROBE_COUNTER_MAX = 7,
};

#endif /* PROBE_H */
