/* The head phase in C (milestone 2 of the native data plane, see handshake.c):
 * accept, read the request head, talk to the origin, read its response head.
 * Python decides everything in between; this only moves bytes and keeps time.
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
    H_LINGER,     /* refusal written, half-closed, discarding input */
    H_CONNECT,    /* connecting to origin addrs[ai] */
    H_RESPONSE,   /* head sent (or being sent), reading the response head */
    H_DECIDE2,    /* response delivered: waiting for splice / refuse / detach */
};

/* timer lists: one FIFO per kind, so expiry is O(1) (equal durations per kind) */
enum { TL_HEAD = 0, TL_LINGER, TL_CONNECT, TL_N };

/* what Python is told */
enum { HE_HEAD = 1, HE_RESPONSE, HE_FAILED, HE_TIMEOUT };

typedef struct hs_conn {
    int cfd, ofd;
    uint32_t state, gen;
    char *buf;                 /* client bytes: the head and what followed it */
    uint32_t len, head_end;    /* head_end: bytes up to and including the blank line */
    char *obuf;                /* origin bytes: the response head and what followed */
    uint32_t olen, ohead_end;
    char *out;                 /* being written: a refusal, or the head to the origin */
    uint32_t out_off, out_len;
    struct sockaddr_storage *addrs;
    uint32_t naddrs, ai;
    int64_t deadline_ms;
    uint32_t tl, prev, next;   /* timer list membership */
    uint32_t next_free;
    struct sockaddr_storage peer;
    socklen_t peerlen;
    int last_error;
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

typedef struct handshaker {
    int epfd;
    int lfds[8];
    int nlisten;
    hs_conn *c;
    uint32_t cap, free_head, live;
    uint32_t max_head, max_response;
    int64_t timeout_ms[TL_N];
    uint32_t tl_head[TL_N], tl_tail[TL_N];
    hs_event *ev;
    uint32_t nev, ev_cap;
    int64_t now_ms;
    uint64_t accepted, accept_errors;
    int accept_paused;         /* set by the owner: balance (workers/accept.py) or EMFILE */
    int deferred;              /* paused by balancing until the timer fires */
    int stopped;               /* the owner stopped accepting (drain): the timer does not resume it */
    int timerfd;
    hs_balance bal;            /* bal.mine == NULL: no balancing (one worker) */
} handshaker;

#define HS_NONE 0xffffffffu

int hs_init(handshaker *h, uint32_t max_head, double head_timeout, double connect_timeout);
void hs_free(handshaker *h);
int hs_listen(handshaker *h, int lfd);
int hs_poll(handshaker *h, int maxaccept);          /* accept, read, write, expire; events queued */
int hs_pop(handshaker *h, hs_event *out);          /* 1 if an event was popped */
hs_conn *hs_get(handshaker *h, int64_t id);
int64_t hs_id(handshaker *h, uint32_t slot);
int hs_refuse(handshaker *h, int64_t id, const char *data, size_t n);
int hs_connect(handshaker *h, int64_t id, const struct sockaddr_storage *addrs, uint32_t naddrs,
               const char *head, size_t n);
/* Give up the connection: its descriptors go to the caller (-1 where none). */
int hs_detach(handshaker *h, int64_t id, int *cfd, int *ofd);
void hs_close(handshaker *h, uint32_t slot);
int hs_pause(handshaker *h, int paused);
int hs_balance_init(handshaker *h, hs_balance *b);
void hs_expire(handshaker *h);

#endif
