/* The head phase in C (see handshake.c): accept, read the request head,
 * connect to an origin (failover), write the forwarded head, read the
 * response head. Python decides everything in between; this moves bytes and
 * keeps time.
 */
#ifndef WSRELAY_HANDSHAKE_H
#define WSRELAY_HANDSHAKE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* connection states */
enum {
    H_FREE = 0,
    H_HEAD,       /* reading the request head */
    H_DECIDE,     /* head delivered: waiting for refuse / connect / detach */
    H_LINGER,     /* refusal written (or being written), half-closed, discarding input */
    H_CONNECT,    /* connecting to an origin address, the head not all written */
    H_RESPONSE,   /* head written, reading the response head */
    H_DECIDE2,    /* response (or failure) delivered: waiting for splice / refuse / detach / skip */
    H_TLS,        /* a TLS listener's connection: its first byte, then the TLS handshake (handshake.c "TLS") */
};

/* how TLS handshakes in the head phase ended (metrics/layout.py TLS_OUTCOMES, same order) */
enum { HT_FULL = 0, HT_RESUMED, HT_FAILED_PROTOCOL, HT_FAILED_CIPHER, HT_FAILED_SNI, HT_FAILED_CLIENT_CERT,
       HT_FAILED_OTHER, HT_PLAIN_HTTP, HT_CLIENT_ABORT, HT_TIMEOUT, HT_N };

/* an OpenSSL error (library, reason) and the outcome it stands for (relay/tls/handshake.py's outcome()) */
typedef struct { uint32_t lib, reason, outcome; } hs_tls_reason;
#define HS_TLS_REASONS 64

/* timer lists: one FIFO per kind, so expiry is O(1) (equal durations per kind) */
enum { TL_HEAD = 0, TL_LINGER, TL_CONNECT, TL_N };

/* what Python is told */
enum {
    HE_HEAD = 1,  /* a request head can be parsed (complete, or an answer is due: too large, bare LF) */
    HE_RESPONSE,  /* a response head can be parsed (complete, or malformed already) */
    HE_FAILED,    /* no origin could be asked (see the attempts), or the answer broke off */
    HE_TIMEOUT,   /* the head (error = bytes read) or the origin (RELAY_CONNECT_TIMEOUT) took too long */
};

/* why an origin attempt failed: Python logs each (relay/origins/report.py) */
enum { HF_CONNECT = 1, HF_CLOSED, HF_TRUNCATED };

typedef struct {
    uint16_t origin, kind;
    int error; /* errno (HF_CONNECT); 0 for a FIN, ECONNRESET for a reset (HF_CLOSED) */
} hs_attempt;

#define HS_ATTEMPTS 16

/* one configured origin: the addresses it resolved to, tried in order */
typedef struct {
    struct sockaddr_storage *addrs;
    uint32_t naddrs;
} hs_origin;

typedef struct hs_conn {
    int cfd, ofd;
    uint32_t state, gen;
    char *buf;                 /* client bytes: the head and what followed it in the same read */
    uint32_t len, cap;
    uint32_t head_end;         /* the request head's length, once parsed (set by the owner) */
    char *obuf;                /* origin bytes: interim answers dropped, then the response head and after */
    uint32_t olen, ocap;
    char *out;                 /* being written: a refusal, or the head to the origin */
    uint32_t out_off, out_len;
    uint32_t *order;           /* the origins to ask (indices into the origins set), each once, in order */
    uint32_t norder, tried;    /* how many; origins asked so far */
    uint32_t origin, ai;       /* the origin being asked, and its address */
    int asked;                 /* the origin asked last accepted the connection (-1: none yet) */
    uint8_t nattempts, watched; /* watched: the client is in the epoll set */
    uint8_t origin_bytes;      /* the current origin sent something */
    uint8_t acted;             /* the owner answered the last event (refuse, connect, skip) */
    hs_attempt attempts[HS_ATTEMPTS];
    int64_t deadline_ms;
    int64_t connect_ns;        /* the current origin connect: its start (CLOCK_MONOTONIC), then, once
                                * up, minus its duration (negative: taken by hs_connect_time) */
    uint8_t connect_timed;     /* connect_ns holds a duration not yet taken */
    uint32_t tl, prev, next;   /* timer list membership */
    uint32_t next_free;
    struct sockaddr_storage peer;
    socklen_t peerlen;
    void *token;               /* the owner's, from connect(); released with the connection */
    /* the Sec-WebSocket-Accept a 101 must carry (RFC 6455 §4.1), from connect();
     * accept_len 0: none given, every answer goes to the owner as a view */
    char accept[32];
    uint8_t accept_len;
    /* TLS (a TLS listener's connection): the SSL, owned by the owner's token
     * (tls_token, released with the connection); tls_done once its
     * handshake completed; want_out: SSL waits to write (EPOLLOUT watched) */
    struct ssl_st *ssl;
    void *tls_token;
    uint8_t tls, tls_done, want_out, watched_out, tls_shut;
    /* the fast path (fast_path.h) decided it: no token; it holds an admission
     * slot and a connection count on pool member fast_member, given back by
     * release_fast if it closes undecided */
    uint8_t fast;
    uint32_t fast_member;
    double fast_started;       /* when it was decided (fp_now) */
    /* the X-Request-ID it forwarded: rid_len bytes of buf at rid_off (a trusted
     * proxy's), or of fast_rid (a new one), for the access log */
    uint32_t rid_off, rid_len;
    char fast_rid[32];
} hs_conn;

typedef struct hs_event {
    uint32_t slot, gen, kind;
    int error;
} hs_event;

/* Accept balancing across workers (workers/accept.py's rule, in C): a worker
 * holding more than its least-loaded accepting sibling (by slack + 1/16)
 * leaves the wake-up to the siblings and looks again defer_ms later; what is
 * still queued then is taken anyway, in batches doubling per overdue round. */
typedef struct hs_balance {
    double *mine;              /* this worker's slot of shared memory (float64) */
    double **siblings;
    int nsiblings;
    uint32_t load_i, accepting_i, slack;
    int64_t defer_ms;
    uint32_t overdue_batch;
    const uint32_t *tunnels;   /* the engine's open tunnels: part of this worker's load */
} hs_balance;

#define HS_LISTEN_MAX 64
#define HS_FIRST_BUF 2048 /* a head buffer's first size: most heads fit; it grows to the cap when not */
#define HS_POOL_MAX 64

typedef struct handshaker {
    int epfd;
    int lfds[HS_LISTEN_MAX];
    /* per listener: 1 once an accepted socket was seen to inherit TCP_NODELAY
     * from it (set on it in hs_listen), -1 if one did not, 0 not known yet */
    signed char nodelay[HS_LISTEN_MAX];
    int nlisten;
    hs_conn *c;
    uint32_t cap, free_head, live;
    uint32_t max_head, max_response;
    int64_t timeout_ms[TL_N];
    uint32_t tl_head[TL_N], tl_tail[TL_N];
    hs_event *ev;
    uint32_t ev_head, nev, ev_cap;
    int64_t now_ms;
    uint64_t accepted, accept_errors;
    int accept_paused;         /* balance (workers/accept.py) or EMFILE */
    int deferred;              /* paused by balancing until the timer fires */
    int stopped;               /* the owner stopped accepting (drain): the timer does not resume it */
    int timerfd;
    hs_balance bal;            /* bal.mine == NULL: no balancing (one worker) */
    hs_origin *origins;
    uint32_t norigins;
    void (*release)(void *token);
    void (*release_fast)(struct handshaker *h, hs_conn *c); /* a fast-path connection's hold, given back */
    void *fast_owner;          /* for release_fast */
    /* head buffers of HS_FIRST_BUF bytes kept for the next connections (two
     * per handshake otherwise go through malloc's slow bins and back), at
     * most HS_POOL_MAX of them whatever the number of slots */
    char *pool[HS_POOL_MAX];
    int npool;
    /* TLS listeners (handshake.c "TLS"): which listeners speak TLS; the
     * owner's SSL for a new connection (0, or -1: none, the connection is
     * closed), released with the connection; how handshakes ended */
    signed char tls_listener[HS_LISTEN_MAX];
    int (*new_tls)(struct handshaker *h, hs_conn *c);
    void (*release_tls)(void *token);
    uint64_t tls_outcomes[HT_N];
    double *tls_metrics;       /* the same counts in the worker's metrics (float64 in shared memory), or NULL */
    hs_tls_reason tls_reasons[HS_TLS_REASONS];
    uint32_t ntls_reasons;
    uint32_t tls_lib_shift;    /* ERR_GET_LIB and ERR_GET_REASON of this OpenSSL (23 and 0x7fffff from 3.0) */
    unsigned long tls_reason_mask;
} handshaker;

#define HS_NONE 0xffffffffu

int hs_init(handshaker *h, uint32_t max_head, double head_timeout, double connect_timeout);
void hs_free(handshaker *h);
int hs_listen(handshaker *h, int lfd, int tls); /* tls: its connections begin with a TLS handshake */
/* Replace the origin table (takes ownership of origins and their addresses). */
void hs_set_origins(handshaker *h, hs_origin *origins, uint32_t n);
int hs_poll(handshaker *h, int maxaccept);          /* accept, read, write, expire; events queued */
int hs_pop(handshaker *h, hs_event *out);          /* 1 if an event was popped */
hs_conn *hs_get(handshaker *h, int64_t id);
int64_t hs_id(handshaker *h, uint32_t slot);
int hs_refuse(handshaker *h, int64_t id, const char *data, size_t n);
/* Ask the origins of order (each once, its addresses in order) with this head, all within
 * timeout_ms (the pool's RELAY_CONNECT_TIMEOUT; < 0: hs_init's connect_timeout). */
int hs_connect(handshaker *h, int64_t id, const uint32_t *order, uint32_t norder, const char *head, size_t n,
               void *token, int64_t timeout_ms);
/* The response head delivered was an interim one (1xx): drop its n bytes, read on. */
int hs_skip(handshaker *h, int64_t id, uint32_t n);
/* The last origin connect's duration in ns, once (wsrelay_origin_connect_seconds); -1: none new. */
int64_t hs_connect_time(handshaker *h, int64_t id);
/* A head buffer (taken from a connection, cap bytes) back to the pool, or freed. */
void hs_put_buffer(handshaker *h, char *buf, uint32_t cap);
/* Give up the connection: its descriptors go to the caller (-1 where none). */
int hs_detach(handshaker *h, int64_t id, int *cfd, int *ofd);
void hs_close(handshaker *h, uint32_t slot);
int hs_close_all(handshaker *h);
int hs_pause(handshaker *h, int paused);
int hs_balance_init(handshaker *h, hs_balance *b);
void hs_expire(handshaker *h);

#endif
