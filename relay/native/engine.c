/* The native tunnel pump (README "Architecture", bench/RESULTS.md "Native data plane").
 *
 * One engine per worker: one epoll set owning the sockets of every tunnel
 * after the 101. Its descriptor is registered with the worker's uvloop loop
 * (loop.add_reader(fd, engine.poll)), so there is no thread, no lock, and
 * "one worker = one core" holds. Per readiness event: recv() into the one
 * read buffer of the engine, send() to the peer at once; what the peer cannot
 * take is copied aside (the only allocation on the data path) and reading
 * from the source stops until it is sent, so a stalled direction holds at
 * most one read buffer: the bound relay/tunnel.py keeps. An idle tunnel owns
 * no buffer at all, only its 96-byte slot.
 *
 * Semantics are relay/tunnel.py's, event for event:
 *   - EOF from one side: shutdown(SHUT_WR) on the other once what is pending
 *     for it is sent; the other direction goes on. EOF from both: close both
 *     after flushing.
 *   - An error on one side (a reset, a failed send): that side is closed and
 *     the other is reset (SO_LINGER 0), so a reset reads as a reset.
 *   - close(): stop reading, flush, close. abort(): close now.
 *   - Events on a side the pump is not reading or writing (a reset arriving
 *     on a side paused for backpressure, or after its EOF) are acted on when
 *     the pump next reads or writes it, as libuv does.
 *
 * Why epoll and not io_uring, and why edge-triggered: see the measurements
 * in bench/RESULTS.md ("epoll or io_uring"). With EPOLLET and both
 * directions registered once, the pump makes no epoll_ctl call per chunk
 * (nginx's choice too): a 64-byte round trip costs one recv and one send per
 * direction plus a share of epoll_wait. A short read means the socket was
 * drained (the next byte raises a new edge); after EPOLLRDHUP we read on to
 * the EOF, since a FIN behind the data raises no edge of its own.
 *
 * Slots are an array indexed by tunnel; an id is (generation << 32 | slot),
 * and epoll events carry the generation too, so events or calls for a
 * tunnel that has ended (and whose slot may be reused) are ignored.
 * Closing a descriptor removes it from the epoll set, so there is no
 * EPOLL_CTL_DEL per tunnel.
 */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* side flags */
#define S_RD 0x01        /* readable as far as we know (edge seen, not drained) */
#define S_HUP 0x02       /* the peer hung up or failed: read on to the end */
#define S_EOF 0x04       /* recv() returned 0 */
#define S_WANT_SHUT 0x08 /* shutdown(SHUT_WR) once pend is sent */
#define S_SHUT 0x10
#define S_CLOSED 0x20
/* tunnel flags */
#define T_USED 0x01
#define T_CLOSING 0x02   /* close each side once what is pending for it is sent */
#define T_ENDED 0x04

static inline uint64_t ev_key(const eng_tunnel *t, uint32_t slot, int side) {
    return ((uint64_t)t->gen << 32) | ((uint64_t)slot << 1) | (uint64_t)side;
}

int64_t eng_id(engine *e, uint32_t slot) {
    return ((int64_t)e->t[slot].gen << 32) | slot;
}

void eng_clock(engine *e) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    e->now_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int eng_init(engine *e, size_t bufsize) {
    memset(e, 0, sizeof *e);
    e->free_head = ENG_NONE;
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (e->epfd < 0)
        return -errno;
    e->bufsize = bufsize ? bufsize : 256 * 1024;
    e->buf = malloc(e->bufsize);
    if (!e->buf) {
        close(e->epfd);
        e->epfd = -1;
        return -ENOMEM;
    }
    eng_clock(e);
    return 0;
}

static void side_close(eng_side *s, int reset) {
    if (s->flags & S_CLOSED)
        return;
    if (reset) {
        struct linger l = {1, 0};
        setsockopt(s->fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    }
    close(s->fd);
    s->fd = -1;
    s->flags = (s->flags | S_CLOSED) & ~(S_RD | S_WANT_SHUT);
    free(s->pend);
    s->pend = NULL;
    s->pend_off = s->pend_len = 0;
}

static void push_ended(engine *e, uint32_t slot) {
    if (e->nended == e->ended_cap) {
        uint32_t cap = e->ended_cap ? 2 * e->ended_cap : 64;
        uint32_t *n = realloc(e->ended, cap * sizeof *n);
        if (!n)
            abort(); /* cannot lose an ending: the owner's counts would leak */
        e->ended = n;
        e->ended_cap = cap;
    }
    e->ended[e->nended++] = slot;
}

static void maybe_end(engine *e, eng_tunnel *t, uint32_t slot) {
    if ((t->s[0].flags & t->s[1].flags & S_CLOSED) && !(t->flags & T_ENDED)) {
        t->flags |= T_ENDED;
        e->open--;
        e->ended_bytes[0] += t->s[0].nbytes;
        e->ended_bytes[1] += t->s[1].nbytes;
        push_ended(e, slot);
    }
}

/* Side i failed (reset, broken pipe): close it, reset the other. */
static void lost(engine *e, eng_tunnel *t, uint32_t slot, int i) {
    side_close(&t->s[i], 0);
    side_close(&t->s[i ^ 1], 1);
    maybe_end(e, t, slot);
}

static void close_tunnel(engine *e, eng_tunnel *t, uint32_t slot) {
    t->flags |= T_CLOSING;
    for (int i = 0; i < 2; i++)
        if (!t->s[i].pend)
            side_close(&t->s[i], 0);
    maybe_end(e, t, slot);
}

/* shutdown(SHUT_WR) on side j; 0 if that failed and the tunnel is gone. */
static int shut(engine *e, eng_tunnel *t, uint32_t slot, int j) {
    eng_side *d = &t->s[j];
    d->flags &= ~S_WANT_SHUT;
    if (d->flags & (S_SHUT | S_CLOSED))
        return 1;
    d->flags |= S_SHUT;
    if (shutdown(d->fd, SHUT_WR) < 0) {
        lost(e, t, slot, j);
        return 0;
    }
    return 1;
}

/* Send n bytes to side j; keep what it cannot take. 0 if the tunnel failed. */
static int send_or_keep(engine *e, eng_tunnel *t, uint32_t slot, int j, const char *data, size_t n) {
    eng_side *d = &t->s[j];
    ssize_t w;
    do
        w = send(d->fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (w < 0 && errno == EINTR);
    if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            lost(e, t, slot, j);
            return 0;
        }
        w = 0;
    }
    if ((size_t)w < n) {
        size_t rest = n - (size_t)w;
        d->pend = malloc(rest);
        if (!d->pend) {
            lost(e, t, slot, j);
            return 0;
        }
        memcpy(d->pend, data + w, rest);
        d->pend_off = 0;
        d->pend_len = (uint32_t)rest;
    }
    return 1;
}

static void on_eof(engine *e, eng_tunnel *t, uint32_t slot, int i) {
    eng_side *src = &t->s[i], *dst = &t->s[i ^ 1];
    src->flags = (src->flags | S_EOF) & ~S_RD;
    if (dst->flags & S_CLOSED) {
        side_close(src, 0);
        maybe_end(e, t, slot);
    } else if (dst->flags & S_EOF) {
        close_tunnel(e, t, slot);
    } else if (dst->pend) {
        dst->flags |= S_WANT_SHUT;
    } else {
        shut(e, t, slot, i ^ 1);
    }
}

/* Move bytes from side i to its peer until i is drained or the peer is full. */
static void pump(engine *e, eng_tunnel *t, uint32_t slot, int i) {
    eng_side *src = &t->s[i], *dst = &t->s[i ^ 1];
    for (;;) {
        if ((src->flags & (S_RD | S_EOF | S_CLOSED)) != S_RD || dst->pend ||
            (dst->flags & S_CLOSED) || (t->flags & (T_CLOSING | T_ENDED)))
            return;
        ssize_t n = recv(src->fd, e->buf, e->bufsize, 0);
        if (n > 0) {
            src->nbytes += (uint64_t)n;
            e->total[i] += (uint64_t)n;
            t->last_active_ms = e->now_ms;
            if (!send_or_keep(e, t, slot, i ^ 1, e->buf, (size_t)n))
                return;
            if ((size_t)n < e->bufsize && !(src->flags & S_HUP)) {
                src->flags &= ~S_RD; /* drained: the next byte raises an edge */
                return;
            }
            continue;
        }
        if (n == 0) {
            on_eof(e, t, slot, i);
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            src->flags &= ~S_RD;
            return;
        }
        lost(e, t, slot, i);
        return;
    }
}

/* Send what is pending for side j; then let its source read again. */
static void flush(engine *e, eng_tunnel *t, uint32_t slot, int j) {
    eng_side *d = &t->s[j];
    while (d->pend) {
        ssize_t w = send(d->fd, d->pend + d->pend_off, d->pend_len - d->pend_off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                lost(e, t, slot, j);
            return;
        }
        d->pend_off += (uint32_t)w;
        if (d->pend_off < d->pend_len)
            return; /* the socket is full again: wait for the next EPOLLOUT edge */
        free(d->pend);
        d->pend = NULL;
        d->pend_off = d->pend_len = 0;
    }
    if ((d->flags & S_WANT_SHUT) && !shut(e, t, slot, j))
        return;
    if (t->flags & T_CLOSING) {
        side_close(d, 0);
        maybe_end(e, t, slot);
        return;
    }
    pump(e, t, slot, j ^ 1);
}

static int grow(engine *e) {
    uint32_t cap = e->cap ? 2 * e->cap : 256;
    eng_tunnel *n = realloc(e->t, (size_t)cap * sizeof *n);
    if (!n)
        return -ENOMEM;
    memset(n + e->cap, 0, (size_t)(cap - e->cap) * sizeof *n);
    for (uint32_t i = cap; i-- > e->cap;) {
        n[i].gen = 1;
        n[i].next_free = e->free_head;
        e->free_head = i;
    }
    e->t = n;
    e->cap = cap;
    return 0;
}

int64_t eng_open(engine *e, int cfd, int ofd, const char *to_client, size_t nc,
                   const char *to_origin, size_t no, void *token) {
    if (e->free_head == ENG_NONE) {
        int r = grow(e);
        if (r < 0)
            return r;
    }
    uint32_t slot = e->free_head;
    eng_tunnel *t = &e->t[slot];
    uint32_t gen = t->gen, next_free = t->next_free;
    memset(t, 0, sizeof *t);
    t->gen = gen;
    t->next_free = next_free;
    t->s[0].fd = cfd;
    t->s[1].fd = ofd;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET};
    ev.data.u64 = ev_key(t, slot, 0);
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, cfd, &ev) < 0)
        return -errno;
    ev.data.u64 = ev_key(t, slot, 1);
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, ofd, &ev) < 0) {
        int err = errno;
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, cfd, &ev);
        return -err;
    }
    e->free_head = next_free;
    t->flags = T_USED;
    t->token = token;
    t->last_active_ms = e->now_ms;
    e->open++;
    /* What arrived behind either head goes first; the events for whatever
     * else is already readable come with the next poll. */
    if (nc && !send_or_keep(e, t, slot, 0, to_client, nc))
        return eng_id(e, slot);
    if (no)
        send_or_keep(e, t, slot, 1, to_origin, no);
    return eng_id(e, slot);
}

eng_tunnel *eng_get(engine *e, int64_t id) {
    uint32_t slot = (uint32_t)(id & 0xffffffff);
    if (id < 0 || slot >= e->cap)
        return NULL;
    eng_tunnel *t = &e->t[slot];
    if (t->gen != (uint32_t)(id >> 32) || (t->flags & (T_USED | T_ENDED)) != T_USED)
        return NULL;
    return t;
}

int eng_close(engine *e, int64_t id) {
    eng_tunnel *t = eng_get(e, id);
    if (!t)
        return 0;
    close_tunnel(e, t, (uint32_t)(id & 0xffffffff));
    return 1;
}

int eng_abort(engine *e, int64_t id) {
    eng_tunnel *t = eng_get(e, id);
    if (!t)
        return 0;
    side_close(&t->s[0], 0);
    side_close(&t->s[1], 0);
    maybe_end(e, t, (uint32_t)(id & 0xffffffff));
    return 1;
}

int eng_close_idle(engine *e, int64_t limit_ms) {
    int n = 0;
    eng_clock(e);
    for (uint32_t slot = 0; slot < e->cap; slot++) {
        eng_tunnel *t = &e->t[slot];
        if ((t->flags & (T_USED | T_CLOSING | T_ENDED)) == T_USED && e->now_ms - t->last_active_ms >= limit_ms) {
            close_tunnel(e, t, slot);
            n++;
        }
    }
    return n;
}

int eng_poll(engine *e, int maxevents, int timeout_ms) {
    struct epoll_event evs[256];
    if (maxevents > 256 || maxevents <= 0)
        maxevents = 256;
    int n = epoll_wait(e->epfd, evs, maxevents, timeout_ms);
    if (n < 0)
        return errno == EINTR ? 0 : -errno;
    eng_clock(e);
    for (int k = 0; k < n; k++) {
        uint64_t key = evs[k].data.u64;
        uint32_t slot = (uint32_t)(key & 0xffffffff) >> 1;
        int i = (int)(key & 1);
        if (slot >= e->cap)
            continue;
        eng_tunnel *t = &e->t[slot];
        if (t->gen != (uint32_t)(key >> 32) || (t->flags & (T_USED | T_ENDED)) != T_USED)
            continue; /* an ended tunnel's descriptor still held elsewhere */
        eng_side *s = &t->s[i];
        if (s->flags & S_CLOSED)
            continue;
        uint32_t ev = evs[k].events;
        if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
            s->flags |= S_RD;
        if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
            s->flags |= S_HUP;
        if ((ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) && s->pend) {
            flush(e, t, slot, i);
            if (t->flags & T_ENDED)
                continue;
        }
        pump(e, t, slot, i);
    }
    return n;
}

uint32_t eng_pop_ended(engine *e) {
    return e->nended ? e->ended[--e->nended] : ENG_NONE;
}

void eng_release(engine *e, uint32_t slot) {
    eng_tunnel *t = &e->t[slot];
    t->flags = 0;
    t->token = NULL;
    t->gen = (t->gen + 1) & 0x7fffffff;
    if (!t->gen)
        t->gen = 1;
    t->next_free = e->free_head;
    e->free_head = slot;
}

void eng_free(engine *e) {
    for (uint32_t slot = 0; slot < e->cap; slot++) {
        eng_tunnel *t = &e->t[slot];
        if (t->flags & T_USED) {
            side_close(&t->s[0], 0);
            side_close(&t->s[1], 0);
        }
    }
    free(e->t);
    free(e->ended);
    free(e->buf);
    if (e->epfd >= 0)
        close(e->epfd);
    memset(e, 0, sizeof *e);
    e->epfd = -1;
}
