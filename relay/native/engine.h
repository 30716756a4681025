/* The native tunnel pump: one per worker, plain C, no Python (see engine.c).
 *
 * Ownership: eng_open() takes both descriptors (non-blocking TCP sockets);
 * from then on only the engine reads, writes and closes them. A tunnel ends
 * once both are closed; its slot is queued on `ended`, and eng_release()
 * returns it after the owner has read its byte counts and token.
 */
#ifndef WSRELAY_ENGINE_H
#define WSRELAY_ENGINE_H

#include <stddef.h>
#include <stdint.h>

typedef struct eng_side {
    int fd;
    uint32_t flags;          /* S_* in engine.c */
    char *pend;              /* bytes for this fd that it could not take yet */
    uint32_t pend_off, pend_len;
    uint64_t nbytes;         /* bytes read from this fd */
    /* io_uring backend */
    uint32_t inflight;       /* requests the kernel still holds for this side */
    uint32_t send_len;       /* length of the ring-buffer send in flight */
    uint64_t send_ud;        /* its user_data, to cancel it */
    /* io_uring backend, bulk: a pipe holding bytes spliced for this fd (see
     * engine.c "Bulk by splice"); pr/pw -1 until the first bulk read */
    int pr, pw;
    uint32_t inpipe;         /* bytes in the pipe, not yet spliced to fd */
} eng_side;

typedef struct eng_tunnel {
    eng_side s[2];           /* 0: client, 1: origin */
    uint32_t gen;            /* bumped when the slot is freed: stale ids miss */
    uint32_t flags;          /* T_* in engine.c */
    int64_t last_active_ms;  /* CLOCK_MONOTONIC ms of the last byte read either way */
    void *token;             /* the owner's, untouched */
    struct eng_tls *tls;     /* a TLS tunnel's client side (tls.h); NULL: cleartext */
    uint32_t next_free;
    uint32_t tag;            /* the owner's, untouched (0 on open): a fast-path tunnel's pool member + 1 */
    double born;             /* the owner's, untouched: when a fast-path tunnel opened (fast_path.h fp_now) */
    void *log;               /* the owner's, untouched: a fast-path tunnel's access-log record (access_log.h) */
} eng_tunnel;

enum { ENG_EPOLL = 1, ENG_URING = 2 };

struct eng_uring;

typedef struct engine {
    int backend;             /* ENG_EPOLL or ENG_URING */
    int epfd;                /* the descriptor to watch: the epoll set, or the ring */
    char *buf;               /* epoll: the one read buffer, reused by every tunnel */
    size_t bufsize;
    struct eng_uring *ur;
    eng_tunnel *t;
    uint32_t cap, free_head, open;
    uint64_t total[2];       /* bytes ever read from clients (up) and origins (down) */
    uint64_t ended_bytes[2]; /* of which by tunnels that have ended */
    uint64_t spliced;        /* of all bytes read, those moved by splice (io_uring backend, bulk) */
    int64_t now_ms;
    uint32_t *ended;         /* slots whose tunnel ended, not yet reported */
    uint32_t nended, ended_cap;
    /* TLS tunnels (epoll only; engine.c "TLS tunnels"): */
    struct eng_tls *tls_cur; /* the tunnel whose ciphertext tls_in holds */
    const char *tls_in;      /* what the last recv from its client left to decrypt */
    size_t tls_in_len;
    char *tls_plain;         /* bufsize: plaintext out of SSL_read */
    char *tls_out;           /* records out of SSL_write/SSL_shutdown, sent after each call */
    size_t tls_out_len, tls_out_cap;
    uint32_t ntls;           /* TLS tunnels open */
} engine;

#define ENG_NONE 0xffffffffu

/* backend: ENG_URING (falls back to epoll where io_uring is unavailable),
 * ENG_EPOLL; *why receives a reason for a fallback (static string) or NULL. */
int eng_init(engine *e, size_t bufsize, int backend, const char **why);
void eng_free(engine *e);
/* Returns the tunnel id (>= 0) or -errno; on error the caller keeps the fds. */
int64_t eng_open(engine *e, int cfd, int ofd, const char *to_client, size_t nc,
                 const char *to_origin, size_t no, void *token);
/* Handle what is ready, without waiting; returns events handled or -errno. */
int eng_poll(engine *e, int maxevents);
eng_tunnel *eng_get(engine *e, int64_t id);  /* NULL for unknown or ended ids */
int eng_close(engine *e, int64_t id);  /* clean: flush what is pending, then close */
/* The tunnel carries a connection its owner serves (a TLS offload, relay/native/front.py):
 * its bytes count in no total, and eng_close_idle() leaves it alone. */
void eng_carrier(engine *e, int64_t id);
int eng_is_carrier(const engine *e, uint32_t slot); /* its end is not reported to the owner's on_end */
int eng_abort(engine *e, int64_t id);  /* now, discarding what is pending */
int eng_close_idle(engine *e, int64_t limit_ms);
/* Pop one ended tunnel: its slot index, or ENG_NONE; then eng_release(slot). */
uint32_t eng_pop_ended(engine *e);
void eng_release(engine *e, uint32_t slot);
void eng_clock(engine *e);
int64_t eng_id(engine *e, uint32_t slot);
int eng_flush(engine *e);  /* io_uring: submit what API calls queued */

/* A TLS tunnel (epoll backend only, else -EOPNOTSUPP): as eng_open, the
 * client side speaking TLS through `ssl`, whose handshake is complete.
 * `to_client` is plaintext (sealed here, behind any records the SSL's
 * current write BIO holds); ciphertext its read BIO holds is decrypted
 * first. The caller keeps the SSL alive until the tunnel is released, and
 * calls eng_tls_detach_all() before freeing any SSL of an engine it frees. */
struct ssl_st;
int64_t eng_open_tls(engine *e, int cfd, int ofd, struct ssl_st *ssl, const char *to_client, size_t nc,
                     const char *to_origin, size_t no, void *token);
void eng_tls_detach_all(engine *e);

#endif
