/* The head phase in C: accept, read the request head, connect to an origin,
 * write the forwarded head, read the response head. Python is called once
 * with a complete request head and once with a complete response head, and
 * decides everything (validation, path and Origin rules, admission, the
 * origin order, refusals, the forwarded head, logging, metrics); this file
 * only moves bytes and keeps time. What Python cannot answer from here (plain
 * HTTP, a head that does not parse, an origin's refusal and its body) it
 * takes over with detach(): the sockets and every byte read so far.
 *
 * One epoll set per worker, edge-triggered. A client is read at once after
 * accept (the head usually came with the connection) and joins the set only
 * if its head is not complete by then, or to write a refusal that does not
 * fit the socket; an origin joins it from connect to its answer. A head is
 * read no further than the read that completed it: bytes a client sent
 * behind its head are held, and reach the origin only after its 101 (splice
 * in _engine.c passes them on), never with the head. Whether a head can be
 * answered yet is http_head.c's question (the reference's: complete, too
 * large, bare LF), asked only when a read may have ended it.
 *
 * Origins: each once, from the one Python names (round-robin there), each
 * origin's addresses in order; a connect error, or an origin that closes
 * without a byte of answer, moves on to the next, all within one deadline
 * (RELAY_CONNECT_TIMEOUT), as relay/upgrade.py does. Each failed attempt is
 * recorded for Python's failure log.
 *
 * TLS (README "TLS"): a TLS listener's connection is peeked at first: a
 * first byte that starts no TLS record is plain HTTP on a TLS port, which
 * the owner answers from the socket as it is (relay/client.py's 400). Else
 * the owner gives it an SSL (made by Python's ssl module, with its
 * certificates, SNI choice and ticket keys: one configuration for both
 * head phases), which runs its handshake here on a socket BIO; the head is
 * then read through SSL_read and a refusal written through SSL_write and
 * ended with close_notify. The TLS handshake and the head share one
 * deadline, RELAY_HANDSHAKE_TIMEOUT, as on the Python plane. How each
 * handshake ended is counted here (tls_outcomes: failures from OpenSSL's
 * reason, by the owner's table) for the owner to fold into its metrics;
 * Python is called for none of them. At the 101 the pump takes the SSL
 * (engine.c "TLS tunnels").
 *
 * Time: each timeout kind (head, connect + response, linger) has one
 * duration, so its connections sit in a FIFO list in deadline order and
 * expiry looks at the list heads only: O(1) per expiry, nothing per tick.
 */
#define _GNU_SOURCE
#include "handshake.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "http_head.h"
#include "tls.h"

#define LINGER_MS 2000
#define K_LISTEN 0x7fffff00u /* slots from here on are listening sockets */
#define K_TIMER 0x7ffffff0u  /* the balancing timer */
#define BATCH 64

static void clock_ms(handshaker *h) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    h->now_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The origin connection is up (the head is written): its connect time, for Python to take. */
static void connected(hs_conn *c) {
    int64_t d = mono_ns() - c->connect_ns;
    c->connect_ns = d > 0 ? d : 1;
    c->connect_timed = 1;
}

int64_t hs_connect_time(handshaker *h, int64_t id) {
    hs_conn *c = hs_get(h, id);
    if (!c || !c->connect_timed)
        return -1;
    c->connect_timed = 0;
    return c->connect_ns;
}

int64_t hs_id(handshaker *h, uint32_t slot) { return ((int64_t)h->c[slot].gen << 32) | slot; }

static inline uint64_t key(handshaker *h, uint32_t slot, int origin) {
    return ((uint64_t)h->c[slot].gen << 32) | ((uint64_t)slot << 1) | (uint64_t)origin;
}

int hs_init(handshaker *h, uint32_t max_head, double head_timeout, double connect_timeout) {
    memset(h, 0, sizeof *h);
    h->free_head = HS_NONE;
    for (int k = 0; k < TL_N; k++)
        h->tl_head[k] = h->tl_tail[k] = HS_NONE;
    h->max_head = max_head;
    h->max_response = 64 * 1024; /* relay/origins/answer.py MAX_RESPONSE_HEAD */
    h->timeout_ms[TL_HEAD] = (int64_t)(head_timeout * 1000);
    h->timeout_ms[TL_CONNECT] = (int64_t)(connect_timeout * 1000);
    h->timeout_ms[TL_LINGER] = LINGER_MS;
    h->timerfd = -1;
    h->epfd = epoll_create1(EPOLL_CLOEXEC);
    clock_ms(h);
    if (h->epfd < 0)
        return -errno;
    /* the accept timer: a balancing deferral, or a pause after running out of descriptors */
    h->timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (h->timerfd < 0)
        return -errno;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)K_TIMER << 1};
    if (epoll_ctl(h->epfd, EPOLL_CTL_ADD, h->timerfd, &ev) < 0)
        return -errno;
    return 0;
}

static void free_origins(hs_origin *o, uint32_t n) {
    for (uint32_t k = 0; k < n; k++)
        free(o[k].addrs);
    free(o);
}

void hs_set_origins(handshaker *h, hs_origin *origins, uint32_t n) {
    free_origins(h->origins, h->norigins);
    h->origins = origins;
    h->norigins = n;
}

int hs_balance_init(handshaker *h, hs_balance *b) {
    free(h->bal.siblings);
    h->bal = *b;
    h->bal.overdue_batch = 1;
    return 0;
}

/* Publish this worker's load; is it ahead of the least-loaded accepting sibling? */
static int ahead(handshaker *h) {
    hs_balance *b = &h->bal;
    double mine = (double)h->live + (b->tunnels ? (double)*b->tunnels : 0.0);
    b->mine[b->load_i] = mine;
    double least = -1;
    for (int k = 0; k < b->nsiblings; k++) {
        double *s = b->siblings[k];
        if (s[b->accepting_i] != 0.0 && (least < 0 || s[b->load_i] < least))
            least = s[b->load_i];
    }
    return least >= 0 && mine > least + b->slack + (double)((uint64_t)mine / 16);
}

/* Stop accepting for ms milliseconds: what is queued stays in the backlog
 * (for a sibling, or for later); the timer takes it up again. */
static void defer_for(handshaker *h, int64_t ms) {
    struct itimerspec its = {.it_value = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000}};
    hs_pause(h, 1);
    h->deferred = 1;
    timerfd_settime(h->timerfd, 0, &its, NULL);
}

static void defer(handshaker *h) { defer_for(h, h->bal.defer_ms); }

/* -- timer lists ------------------------------------------------------------------ */

static void tl_remove(handshaker *h, uint32_t slot) {
    hs_conn *c = &h->c[slot];
    if (c->tl == HS_NONE)
        return;
    if (c->prev != HS_NONE)
        h->c[c->prev].next = c->next;
    else
        h->tl_head[c->tl] = c->next;
    if (c->next != HS_NONE)
        h->c[c->next].prev = c->prev;
    else
        h->tl_tail[c->tl] = c->prev;
    c->tl = c->prev = c->next = HS_NONE;
}

/* Into list tl, due in ms milliseconds, in deadline order: at the tail when
 * every entry has the same duration (a FIFO, O(1)); TL_CONNECT's durations
 * are the pools' own RELAY_CONNECT_TIMEOUT, so an entry may walk back past
 * the pending connects of pools with longer ones. */
static void tl_append_in(handshaker *h, uint32_t slot, uint32_t tl, int64_t ms) {
    hs_conn *c = &h->c[slot];
    tl_remove(h, slot);
    c->tl = tl;
    c->deadline_ms = h->now_ms + ms;
    uint32_t after = h->tl_tail[tl];
    while (after != HS_NONE && h->c[after].deadline_ms > c->deadline_ms)
        after = h->c[after].prev;
    c->prev = after;
    c->next = after != HS_NONE ? h->c[after].next : h->tl_head[tl];
    if (after != HS_NONE)
        h->c[after].next = slot;
    else
        h->tl_head[tl] = slot;
    if (c->next != HS_NONE)
        h->c[c->next].prev = slot;
    else
        h->tl_tail[tl] = slot;
}

static void tl_append(handshaker *h, uint32_t slot, uint32_t tl) { tl_append_in(h, slot, tl, h->timeout_ms[tl]); }

/* -- slots and events --------------------------------------------------------------- */

static int grow(handshaker *h) {
    uint32_t cap = h->cap ? 2 * h->cap : 256;
    hs_conn *n = realloc(h->c, (size_t)cap * sizeof *n);
    if (!n)
        return -ENOMEM;
    memset(n + h->cap, 0, (size_t)(cap - h->cap) * sizeof *n);
    for (uint32_t i = cap; i-- > h->cap;) {
        n[i].gen = 1;
        n[i].cfd = n[i].ofd = -1;
        n[i].next_free = h->free_head;
        h->free_head = i;
    }
    h->c = n;
    h->cap = cap;
    return 0;
}

static void emit(handshaker *h, uint32_t slot, uint32_t kind, int error) {
    if (h->nev == h->ev_cap) {
        if (h->ev_head) { /* reuse what was popped */
            memmove(h->ev, h->ev + h->ev_head, (h->nev - h->ev_head) * sizeof *h->ev);
            h->nev -= h->ev_head;
            h->ev_head = 0;
        } else {
            uint32_t cap = h->ev_cap ? 2 * h->ev_cap : 64;
            hs_event *n = realloc(h->ev, cap * sizeof *n);
            if (!n)
                abort(); /* an event lost is a connection hung with its admission slot */
            h->ev = n;
            h->ev_cap = cap;
        }
    }
    h->ev[h->nev++] = (hs_event){slot, h->c[slot].gen, kind, error};
}

int hs_pop(handshaker *h, hs_event *out) {
    if (h->ev_head == h->nev) {
        h->ev_head = h->nev = 0;
        return 0;
    }
    *out = h->ev[h->ev_head++];
    return 1;
}

hs_conn *hs_get(handshaker *h, int64_t id) {
    uint32_t slot = (uint32_t)(id & 0xffffffff);
    if (id < 0 || slot >= h->cap)
        return NULL;
    hs_conn *c = &h->c[slot];
    if (c->gen != (uint32_t)(id >> 32) || c->state == H_FREE)
        return NULL;
    return c;
}

void hs_put_buffer(handshaker *h, char *buf, uint32_t cap) {
    if (buf && cap == HS_FIRST_BUF && h->npool < HS_POOL_MAX)
        h->pool[h->npool++] = buf;
    else
        free(buf);
}

static void conn_free(handshaker *h, uint32_t slot) {
    hs_conn *c = &h->c[slot];
    if (c->fast && h->release_fast)
        h->release_fast(h, c);
    tl_remove(h, slot);
    hs_put_buffer(h, c->buf, c->cap);
    hs_put_buffer(h, c->obuf, c->ocap);
    free(c->out);
    free(c->order);
    void *token = c->token, *tls_token = c->tls_token;
    uint32_t gen = c->gen + 1;
    memset(c, 0, sizeof *c);
    c->gen = gen ? gen : 1;
    c->cfd = c->ofd = -1;
    c->tl = c->prev = c->next = HS_NONE;
    c->next_free = h->free_head;
    h->free_head = slot;
    h->live--;
    if (token && h->release)
        h->release(token);
    if (tls_token && h->release_tls)
        h->release_tls(tls_token); /* frees the SSL (after its descriptor was closed or handed on) */
}

/* Close what is left of the connection and forget it (closing a descriptor
 * takes it out of the epoll set: each is ours alone). */
static void conn_close(handshaker *h, uint32_t slot) {
    hs_conn *c = &h->c[slot];
    if (c->ssl && c->tls_done && !c->tls_shut && c->cfd >= 0) {
        /* a TLS connection ends with close_notify (a head timeout, a drain), as
         * on the Python plane: best effort, it is not waited for */
        c->tls_shut = 1;
        tls.ERR_clear_error();
        tls.SSL_shutdown(c->ssl);
        tls.ERR_clear_error();
    }
    if (c->cfd >= 0)
        close(c->cfd);
    if (c->ofd >= 0)
        close(c->ofd);
    conn_free(h, slot);
}

void hs_close(handshaker *h, uint32_t slot) {
    if (slot < h->cap && h->c[slot].state != H_FREE)
        conn_close(h, slot);
}

int hs_close_all(handshaker *h) {
    int n = 0;
    for (uint32_t slot = 0; slot < h->cap; slot++)
        if (h->c[slot].state != H_FREE) {
            conn_close(h, slot);
            n++;
        }
    return n;
}

/* Room for n more bytes, up to limit + 1 (one byte past a cap tells "too large"). */
static int room(handshaker *h, char **buf, uint32_t *cap, uint32_t len, uint32_t limit) {
    if (len < *cap)
        return 1;
    if (*cap > limit)
        return 0;
    uint32_t ncap = *cap ? 2 * *cap : HS_FIRST_BUF;
    if (ncap > limit + 1)
        ncap = limit + 1;
    if (!*cap && ncap == HS_FIRST_BUF && h->npool) {
        *buf = h->pool[--h->npool];
        *cap = ncap;
        return 1;
    }
    char *n = realloc(*buf, ncap);
    if (!n)
        return -1;
    *buf = n;
    *cap = ncap;
    return 1;
}

/* Could the bytes just read (from `before` on) have ended a head? The
 * reference answers only then: a CRLF CRLF or a bare LF LF in the tail, or
 * the cap passed (relay/client.py reads the same way). */
static int may_end(const char *buf, uint32_t before, uint32_t len, uint32_t max) {
    if (len > max)
        return 1;
    uint32_t from = before > 3 ? before - 3 : 0;
    /* Either ending lies wholly in [from, len) and ends with a LF: look back
     * from each LF (memchr), rather than two memmem scans (glibc's two-way
     * set-up per call cost more than the search, twice per head). */
    const char *p = buf + from, *end = buf + len;
    while ((p = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        size_t j = (size_t)(p - buf);
        if ((j >= from + 1 && buf[j - 1] == '\n') || (j >= from + 3 && memcmp(buf + j - 3, "\r\n\r", 3) == 0))
            return 1;
        p++;
    }
    return 0;
}

/* -- the client side ------------------------------------------------------------------- */

static int watch_client(handshaker *h, uint32_t slot, uint32_t events) {
    hs_conn *c = &h->c[slot];
    struct epoll_event ev = {.events = events | EPOLLRDHUP | EPOLLET, .data.u64 = key(h, slot, 0)};
    if (epoll_ctl(h->epfd, c->watched ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->cfd, &ev) < 0)
        return -1;
    c->watched = 1;
    return 0;
}

/* Watch the client for reading, and for writing while SSL waits to write. */
static int watch_for(handshaker *h, uint32_t slot) {
    hs_conn *c = &h->c[slot];
    if (c->watched && c->watched_out == c->want_out)
        return 0;
    c->watched_out = c->want_out;
    return watch_client(h, slot, EPOLLIN | (c->want_out ? EPOLLOUT : 0));
}

/* An SSL call returned r <= 0: -1 with errno EAGAIN when it waits for the
 * socket (want_out: to write), 0 at a close_notify, -1 ECONNRESET otherwise. */
static ssize_t tls_wait(hs_conn *c, int r) {
    int e = tls.SSL_get_error(c->ssl, r);
    if (e == TLS_ERROR_WANT_READ || e == TLS_ERROR_WANT_WRITE) {
        c->want_out = e == TLS_ERROR_WANT_WRITE;
        errno = EAGAIN;
        return -1;
    }
    tls.ERR_clear_error();
    if (e == TLS_ERROR_ZERO_RETURN)
        return 0;
    errno = ECONNRESET;
    return -1;
}

/* recv() from the client: plaintext through its SSL on a TLS connection. */
static ssize_t client_recv(hs_conn *c, char *buf, size_t n) {
    if (!c->ssl)
        return recv(c->cfd, buf, n, 0);
    tls.ERR_clear_error();
    int r = tls.SSL_read(c->ssl, buf, n > 0x40000000 ? 0x40000000 : (int)n);
    return r > 0 ? r : tls_wait(c, r);
}

static void read_head(handshaker *h, uint32_t slot) {
    hs_conn *c = &h->c[slot];
    for (;;) {
        int r = room(h, &c->buf, &c->cap, c->len, h->max_head);
        if (r < 0) {
            conn_close(h, slot);
            return;
        }
        ssize_t n = r ? client_recv(c, c->buf + c->len, c->cap - c->len) : 0;
        if (n > 0) {
            uint32_t before = c->len;
            c->len += (uint32_t)n;
            if (may_end(c->buf, before, c->len, h->max_head) && hh_request_ready(c->buf, c->len, h->max_head)) {
                c->state = H_DECIDE;
                tl_remove(h, slot);
                emit(h, slot, HE_HEAD, 0);
                return;
            }
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (watch_for(h, slot) < 0)
                conn_close(h, slot);
            return;
        }
        conn_close(h, slot); /* EOF or reset before a complete head: nothing to answer */
        return;
    }
}

static void linger_read(handshaker *h, uint32_t slot) {
    hs_conn *c = &h->c[slot];
    char sink[4096];
    for (;;) {
        ssize_t n = recv(c->cfd, sink, sizeof sink, 0);
        if (n > 0)
            continue;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        conn_close(h, slot);
        return;
    }
}

/* Write c->out to fd; 1 when all of it is out, 0 if waiting, -1 on error. */
static int write_out(hs_conn *c, int fd) {
    while (c->out_off < c->out_len) {
        ssize_t w = send(fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
        }
        c->out_off += (uint32_t)w;
    }
    return 1;
}

/* As write_out, through the client's SSL (records of what is left, each write whole). */
static int write_tls(hs_conn *c) {
    while (c->out_off < c->out_len) {
        tls.ERR_clear_error();
        int w = tls.SSL_write(c->ssl, c->out + c->out_off, (int)(c->out_len - c->out_off));
        if (w > 0) {
            c->out_off += (uint32_t)w;
            continue;
        }
        return tls_wait(c, w) < 0 && errno == EAGAIN ? 0 : -1;
    }
    return 1;
}

static void refusal_progress(handshaker *h, uint32_t slot) {
    hs_conn *c = &h->c[slot];
    int r = c->out ? (c->ssl ? write_tls(c) : write_out(c, c->cfd)) : 1;
    if (r < 0) {
        conn_close(h, slot);
        return;
    }
    if (r == 0) {
        if (watch_client(h, slot, EPOLLIN | EPOLLOUT) < 0)
            conn_close(h, slot);
        return;
    }
    free(c->out);
    c->out = NULL;
    if (c->ssl && !c->tls_shut) { /* TLS: close_notify first (best effort: a full socket drops it) */
        c->tls_shut = 1;
        tls.ERR_clear_error();
        tls.SSL_shutdown(c->ssl);
        tls.ERR_clear_error();
    }
    /* all written: half-close and discard what still comes, for a while (nginx's lingering_close) */
    shutdown(c->cfd, SHUT_WR);
    if (c->tl != TL_LINGER)
        tl_append(h, slot, TL_LINGER);
    if (!c->watched && watch_client(h, slot, EPOLLIN) < 0) {
        conn_close(h, slot);
        return;
    }
    linger_read(h, slot);
}

int hs_refuse(handshaker *h, int64_t id, const char *data, size_t n) {
    hs_conn *c = hs_get(h, id);
    if (!c || c->state == H_LINGER || c->state == H_HEAD || c->state == H_TLS)
        return 0;
    uint32_t slot = (uint32_t)(id & 0xffffffff);
    if (c->ofd >= 0) {
        close(c->ofd);
        c->ofd = -1;
    }
    free(c->out);
    c->out = malloc(n ? n : 1);
    if (!c->out) {
        conn_close(h, slot);
        return 1;
    }
    memcpy(c->out, data, n);
    c->out_off = 0;
    c->out_len = (uint32_t)n;
    c->acted = 1;
    c->state = H_LINGER;
    tl_remove(h, slot);
    refusal_progress(h, slot);
    return 1;
}

/* -- the origin side --------------------------------------------------------------------- */

static void attempt(hs_conn *c, uint16_t kind, int err) {
    if (c->nattempts < HS_ATTEMPTS)
        c->attempts[c->nattempts++] = (hs_attempt){(uint16_t)c->origin, kind, err};
}

static void origin_failed(handshaker *h, uint32_t slot, int err) {
    hs_conn *c = &h->c[slot];
    if (c->ofd >= 0) {
        close(c->ofd);
        c->ofd = -1;
    }
    c->state = H_DECIDE2;
    tl_remove(h, slot);
    emit(h, slot, HE_FAILED, err);
}

static void origin_read(handshaker *h, uint32_t slot);

/* Connect to the current origin's current address, and write the head at
 * once if the connection is up already (loopback usually is); on an
 * immediate failure, the next address, then the next origin. */
static void try_connect(handshaker *h, uint32_t slot) {
    hs_conn *c = &h->c[slot];
    for (;;) {
        if (c->tried >= c->norder) {
            origin_failed(h, slot, 0);
            return;
        }
        c->origin = c->order[c->tried];
        hs_origin *o = c->origin < h->norigins ? &h->origins[c->origin] : NULL;
        if (!o || c->ai >= o->naddrs) { /* none (left) for this origin: the next */
            if (!o || !o->naddrs)
                attempt(c, HF_CONNECT, EHOSTUNREACH);
            c->tried++;
            c->ai = 0;
            continue;
        }
        struct sockaddr_storage *a = &o->addrs[c->ai];
        socklen_t alen = a->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
        int fd = socket(a->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            attempt(c, HF_CONNECT, errno);
            origin_failed(h, slot, errno); /* EMFILE and the like: no other address will do better */
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->ofd = fd;
        c->out_off = 0;
        c->olen = 0;
        c->origin_bytes = 0;
        c->connect_timed = 0;
        c->connect_ns = mono_ns();
        int r = connect(fd, (struct sockaddr *)a, alen);
        if (r < 0 && errno != EINPROGRESS) {
            attempt(c, HF_CONNECT, errno);
            close(fd);
            c->ofd = -1;
            c->ai++;
            continue;
        }
        r = write_out(c, fd);
        if (r < 0) { /* refused, found at the first write */
            attempt(c, HF_CONNECT, errno);
            close(fd);
            c->ofd = -1;
            c->ai++;
            continue;
        }
        c->state = r ? H_RESPONSE : H_CONNECT;
        if (r) {
            c->asked = (int)c->origin;
            connected(c);
        }
        uint32_t events = r ? EPOLLIN | EPOLLRDHUP | EPOLLET : EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
        struct epoll_event ev = {.events = events, .data.u64 = key(h, slot, 1)};
        if (epoll_ctl(h->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            attempt(c, HF_CONNECT, errno);
            origin_failed(h, slot, errno);
        }
        return;
    }
}

/* This origin refused, reset or closed without a byte of answer: the next one may serve. */
static void next_origin(handshaker *h, uint32_t slot, uint16_t kind, int err) {
    hs_conn *c = &h->c[slot];
    attempt(c, kind, err);
    close(c->ofd);
    c->ofd = -1;
    if (kind == HF_CONNECT) {
        c->ai++;
    } else {
        c->tried++;
        c->ai = 0;
    }
    try_connect(h, slot);
}

static void origin_read(handshaker *h, uint32_t slot) {
    hs_conn *c = &h->c[slot];
    for (;;) {
        int r = room(h, &c->obuf, &c->ocap, c->olen, h->max_response);
        if (r < 0) {
            origin_failed(h, slot, ENOMEM);
            return;
        }
        ssize_t n = r ? recv(c->ofd, c->obuf + c->olen, c->ocap - c->olen, 0) : 0;
        if (n > 0) {
            uint32_t before = c->olen;
            c->olen += (uint32_t)n;
            c->origin_bytes = 1;
            /* ready: a head can end here, or its first line already cannot be a status line */
            if ((may_end(c->obuf, before, c->olen, h->max_response) || before < 16 ||
                 memchr(c->obuf + before, '\n', (size_t)n)) &&
                hh_response_ready(c->obuf, c->olen, h->max_response)) {
                c->state = H_DECIDE2; /* the deadline runs on: an interim answer may be skipped */
                emit(h, slot, HE_RESPONSE, 0);
                return;
            }
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        int err = n == 0 ? 0 : errno;
        if (!c->origin_bytes) {
            next_origin(h, slot, HF_CLOSED, err); /* closed without a byte of answer: as proxy_next_upstream */
        } else {
            attempt(c, HF_TRUNCATED, err); /* a truncated answer: it acted on the request, no retry */
            origin_failed(h, slot, err);
        }
        return;
    }
}

static void origin_io(handshaker *h, uint32_t slot, uint32_t events) {
    hs_conn *c = &h->c[slot];
    if (c->state == H_CONNECT) {
        /* connected (or failed): write the head; a failed connect shows in the write */
        int r = write_out(c, c->ofd);
        if (r < 0) {
            next_origin(h, slot, HF_CONNECT, errno);
            return;
        }
        if (r == 0)
            return;
        c->state = H_RESPONSE;
        c->asked = (int)c->origin;
        connected(c);
    }
    if (c->state == H_RESPONSE && (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
        origin_read(h, slot);
}

int hs_connect(handshaker *h, int64_t id, const uint32_t *order, uint32_t norder, const char *head, size_t n,
               void *token, int64_t timeout_ms) {
    hs_conn *c = hs_get(h, id);
    if (!c || c->state != H_DECIDE)
        return 0;
    uint32_t slot = (uint32_t)(id & 0xffffffff);
    c->acted = 1;
    c->token = token;
    c->out = malloc(n ? n : 1);
    free(c->order);
    c->order = malloc((norder ? norder : 1) * sizeof *order);
    if (!c->out || !c->order) {
        c->norder = 0;
        origin_failed(h, slot, ENOMEM);
        return 1;
    }
    memcpy(c->out, head, n);
    c->out_len = (uint32_t)n;
    memcpy(c->order, order, norder * sizeof *order);
    c->norder = norder;
    c->tried = c->ai = 0;
    c->asked = -1;
    tl_append_in(h, slot, TL_CONNECT, timeout_ms >= 0 ? timeout_ms : h->timeout_ms[TL_CONNECT]);
    try_connect(h, slot);
    return 1;
}

int hs_skip(handshaker *h, int64_t id, uint32_t n) {
    hs_conn *c = hs_get(h, id);
    if (!c || c->state != H_DECIDE2 || c->ofd < 0 || n > c->olen)
        return 0;
    uint32_t slot = (uint32_t)(id & 0xffffffff);
    c->acted = 1;
    memmove(c->obuf, c->obuf + n, c->olen - n);
    c->olen -= n;
    c->state = H_RESPONSE;
    if (c->olen && hh_response_ready(c->obuf, c->olen, h->max_response)) {
        c->state = H_DECIDE2;
        emit(h, slot, HE_RESPONSE, 0);
        return 1;
    }
    origin_read(h, slot); /* what followed may still be in the socket: no new edge would tell */
    return 1;
}

/* -- TLS ---------------------------------------------------------------------------------- */

/* A failed handshake's outcome: OpenSSL's first error by the owner's table
 * (relay/tls/handshake.py's outcome()); none, or a system error, is the
 * client going away. */
static uint32_t tls_outcome(handshaker *h) {
    unsigned long err = tls.ERR_peek_error();
    if (err == 0 || (err & 0x80000000UL)) /* ERR_SYSTEM_FLAG */
        return HT_CLIENT_ABORT;
    for (uint32_t k = 0; k < h->ntls_reasons; k++) {
        hs_tls_reason *t = &h->tls_reasons[k];
        if (((err >> h->tls_lib_shift) & 0xFF) == t->lib && (err & h->tls_reason_mask) == t->reason)
            return t->outcome;
    }
    return HT_FAILED_OTHER;
}

static void tls_count(handshaker *h, uint32_t outcome) {
    h->tls_outcomes[outcome]++;
    if (h->tls_metrics) /* wsrelay_tls_handshakes_total: the worker's slot, written by this worker alone */
        h->tls_metrics[outcome] += 1;
}

static void tls_progress(handshaker *h, uint32_t slot) {
    hs_conn *c = &h->c[slot];
    if (!c->ssl) {
        unsigned char first;
        ssize_t n;
        do
            n = recv(c->cfd, &first, 1, MSG_PEEK);
        while (n < 0 && errno == EINTR);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (watch_for(h, slot) < 0)
                conn_close(h, slot);
            return;
        }
        if (n <= 0) { /* gone before its first byte: no handshake began, none is counted */
            conn_close(h, slot);
            return;
        }
        if (first != 0x16 && !(first & 0x80)) {
            /* no TLS record (nor an SSLv2-framed hello): plain HTTP on a TLS port,
             * answered by the owner from the socket as it is (nothing was read) */
            c->state = H_DECIDE;
            tl_remove(h, slot);
            emit(h, slot, HE_HEAD, 0);
            return;
        }
        if (h->new_tls(h, c) < 0 || !c->ssl) {
            conn_close(h, slot);
            return;
        }
    }
    tls.ERR_clear_error();
    int r = tls.SSL_do_handshake(c->ssl);
    if (r == 1) {
        c->tls_done = 1;
        c->want_out = 0;
        tls_count(h, tls.SSL_session_reused(c->ssl) ? HT_RESUMED : HT_FULL);
        c->state = H_HEAD;
        read_head(h, slot); /* the head often comes with the client's Finished */
        return;
    }
    int e = tls.SSL_get_error(c->ssl, r);
    if (e == TLS_ERROR_WANT_READ || e == TLS_ERROR_WANT_WRITE) {
        c->want_out = e == TLS_ERROR_WANT_WRITE;
        if (watch_for(h, slot) < 0)
            conn_close(h, slot);
        return;
    }
    tls_count(h, tls_outcome(h));
    tls.ERR_clear_error();
    conn_close(h, slot); /* its alert, if any, was written by SSL already */
}

/* -- accept ------------------------------------------------------------------------------- */

int hs_listen(handshaker *h, int lfd, int tls) {
    if (h->nlisten == HS_LISTEN_MAX)
        return -ENOSPC;
    if (tls && !h->new_tls)
        return -ENOPROTOOPT;
    h->tls_listener[h->nlisten] = tls ? 1 : 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)(K_LISTEN + (uint32_t)h->nlisten) << 1};
    if (!h->accept_paused && epoll_ctl(h->epfd, EPOLL_CTL_ADD, lfd, &ev) < 0)
        return -errno;
    /* Linux copies TCP_NODELAY from a listening socket to the ones it
     * accepts: set once here, it saves a setsockopt per connection (checked
     * on the first accepted socket: where it is not inherited, or cannot be
     * set, every accepted socket gets its own as before) */
    int one = 1;
    h->nodelay[h->nlisten] = setsockopt(lfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) == 0 ? 0 : -1;
    h->lfds[h->nlisten++] = lfd;
    return 0;
}

/* Stop or resume accepting: the listening sockets leave the epoll set while
 * paused, so a backlog left to the siblings does not keep waking this one. */
int hs_pause(handshaker *h, int paused) {
    if (paused == h->accept_paused)
        return 0;
    for (int k = 0; k < h->nlisten; k++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)(K_LISTEN + (uint32_t)k) << 1};
        if (epoll_ctl(h->epfd, paused ? EPOLL_CTL_DEL : EPOLL_CTL_ADD, h->lfds[k], &ev) < 0 && !paused)
            return -errno;
    }
    h->accept_paused = paused;
    return 0;
}

static int accept_some(handshaker *h, int l, int max, int balanced) {
    int lfd = h->lfds[l];
    int taken = 0;
    for (int k = 0; k < max; k++) {
        if (balanced && taken && ahead(h))
            break;
        if (h->free_head == HS_NONE && grow(h) < 0)
            return taken;
        uint32_t slot = h->free_head;
        hs_conn *c = &h->c[slot];
        c->peerlen = sizeof c->peer;
        int fd = accept4(lfd, (struct sockaddr *)&c->peer, &c->peerlen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO || errno == EPERM)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* out of resources: pause 250 ms (workers/accept.py's PAUSE) rather than spin
                 * on a backlog we cannot take, and let the owner count and log it */
                h->accept_errors++;
                defer_for(h, 250);
            }
            return taken;
        }
        if (h->nodelay[l] <= 0) {
            int one = 1;
            socklen_t len = sizeof one;
            if (h->nodelay[l] == 0) /* the first one: did it inherit the listener's? */
                h->nodelay[l] = getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, &len) == 0 && one ? 1 : -1;
            if (h->nodelay[l] < 0) {
                one = 1;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            }
        }
        h->free_head = c->next_free;
        h->live++;
        h->accepted++;
        c->cfd = fd;
        c->ofd = -1;
        c->tl = c->prev = c->next = HS_NONE;
        tl_append(h, slot, TL_HEAD);
        taken++;
        if (h->tls_listener[l]) {
            c->tls = 1;
            c->state = H_TLS;
            tls_progress(h, slot); /* the ClientHello often came with the connection */
            continue;
        }
        c->state = H_HEAD;
        read_head(h, slot); /* the head often came with the connection */
    }
    return taken;
}

/* -- the loop ---------------------------------------------------------------------------- */

void hs_expire(handshaker *h) {
    clock_ms(h);
    for (int k = 0; k < TL_N; k++) {
        uint32_t slot;
        while ((slot = h->tl_head[k]) != HS_NONE && h->c[slot].deadline_ms <= h->now_ms) {
            hs_conn *c = &h->c[slot];
            if (c->state == H_DECIDE2 && k == TL_CONNECT)
                break; /* an answer waits for Python's word (it comes before the next expiry) */
            tl_remove(h, slot);
            if (k == TL_LINGER) {
                conn_close(h, slot);
            } else if (k == TL_HEAD && c->state == H_TLS) {
                tls_count(h, HT_TIMEOUT); /* the TLS handshake took too long: closed, nothing written */
                conn_close(h, slot);
            } else if (k == TL_HEAD) {
                /* Python counts a started head that never finished (408); nothing is written */
                c->state = H_DECIDE;
                emit(h, slot, HE_TIMEOUT, (int)c->len);
            } else {
                if (c->ofd >= 0) {
                    close(c->ofd);
                    c->ofd = -1;
                }
                c->state = H_DECIDE2;
                emit(h, slot, HE_TIMEOUT, 0);
            }
        }
    }
}

int hs_poll(handshaker *h, int maxaccept) {
    struct epoll_event evs[256];
    int n = epoll_wait(h->epfd, evs, 256, 0);
    if (n < 0)
        return errno == EINTR ? 0 : -errno;
    clock_ms(h);
    for (int k = 0; k < n; k++) {
        uint64_t d = evs[k].data.u64;
        uint32_t slot = (uint32_t)(d & 0xffffffff) >> 1;
        int origin = (int)(d & 1);
        if (slot == K_TIMER) {
            uint64_t ticks;
            if (read(h->timerfd, &ticks, sizeof ticks) < 0) { /* spurious: nothing to read */
            }
            if (!h->deferred)
                continue;
            /* back from deferring: what still waits, the siblings did not take */
            h->deferred = 0;
            if (h->stopped)
                continue;
            hs_pause(h, 0);
            int got = 0;
            for (int l = 0; l < h->nlisten; l++)
                got += accept_some(h, l, (int)h->bal.overdue_batch, 0);
            h->bal.overdue_batch = got ? (h->bal.overdue_batch * 2 > BATCH ? BATCH : h->bal.overdue_batch * 2) : 1;
            continue;
        }
        if (slot >= K_LISTEN) {
            if (h->accept_paused || slot - K_LISTEN >= (uint32_t)h->nlisten)
                continue;
            if (h->bal.mine && h->bal.nsiblings && ahead(h)) {
                defer(h);
                continue;
            }
            h->bal.overdue_batch = 1;
            accept_some(h, (int)(slot - K_LISTEN), maxaccept, h->bal.mine && h->bal.nsiblings);
            continue;
        }
        if (slot >= h->cap)
            continue;
        hs_conn *c = &h->c[slot];
        if (c->gen != (uint32_t)(d >> 32) || c->state == H_FREE)
            continue;
        uint32_t ev = evs[k].events;
        if (origin) {
            if (c->ofd >= 0)
                origin_io(h, slot, ev);
            continue;
        }
        /* A client is not watched while its origin is asked: what it sends, a FIN, a
         * reset, all wait for the tunnel, as on the Python plane (reading paused). */
        switch (c->state) {
        case H_HEAD:
            if ((ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) || (c->want_out && (ev & EPOLLOUT)))
                read_head(h, slot);
            break;
        case H_TLS:
            tls_progress(h, slot);
            break;
        case H_LINGER:
            if (c->out)
                refusal_progress(h, slot);
            else
                linger_read(h, slot);
            break;
        default:
            break;
        }
    }
    hs_expire(h);
    return n;
}

int hs_detach(handshaker *h, int64_t id, int *cfd, int *ofd) {
    hs_conn *c = hs_get(h, id);
    if (!c)
        return 0;
    uint32_t slot = (uint32_t)(id & 0xffffffff);
    struct epoll_event ev = {0};
    if (c->cfd >= 0 && c->watched)
        epoll_ctl(h->epfd, EPOLL_CTL_DEL, c->cfd, &ev);
    if (c->ofd >= 0)
        epoll_ctl(h->epfd, EPOLL_CTL_DEL, c->ofd, &ev);
    *cfd = c->cfd;
    *ofd = c->ofd;
    c->cfd = c->ofd = -1;
    conn_free(h, slot);
    return 1;
}

void hs_free(handshaker *h) {
    hs_close_all(h);
    free(h->c);
    free(h->ev);
    free(h->bal.siblings);
    free_origins(h->origins, h->norigins);
    while (h->npool)
        free(h->pool[--h->npool]);
    if (h->timerfd >= 0)
        close(h->timerfd);
    if (h->epfd >= 0)
        close(h->epfd);
    memset(h, 0, sizeof *h);
    h->epfd = -1;
}
