/* The native tunnel pump (README "Settings" RELAY_DATA_PLANE, bench/RESULTS.md
 * "Native data plane").
 *
 * One engine per worker owns the sockets of every tunnel after the 101. Its
 * one descriptor (an io_uring, or an epoll set) is registered with the
 * worker's uvloop loop (loop.add_reader(fd, engine.poll)): no thread, no
 * lock, "one worker = one core" holds. Per chunk: read into a buffer of the
 * engine, send to the peer at once; what the peer cannot take is copied
 * aside (the only allocation on the data path) and the source is not read
 * again until it is sent, so a stalled direction holds at most one read
 * buffer: the bound relay/tunnel.py keeps. An idle tunnel owns no buffer,
 * only its slot (~100 bytes).
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
 * io_uring, with epoll as the fallback. Measured with the same load through
 * this engine on each backend (python -m bench.pump_compare, 2-CPU VM,
 * interleaved rounds; bench/RESULTS.md), CPU per round trip:
 *     64 B  epoll 13.2 us  io_uring 8.9 us   (syscalls 4.5 -> 0.4)
 *     4 KiB epoll 14.1 us  io_uring 10.0 us  (4.5 -> 0.4)
 *     1 MiB epoll 782 us   io_uring 810 us   (level: 799 vs 707 in another run)
 * Per small round trip the kernel's TCP work is the same either way; what
 * io_uring saves is the syscall entries (~0.3 us each on this VM) and the
 * readiness round trip: completions are read from shared memory and every
 * request of a loop turn goes in with one io_uring_enter. On bulk both are
 * copies and come out level. So io_uring is used wherever io_uring_setup
 * works; where it does not (Linux < 6.0,
 * kernel.io_uring_disabled, a seccomp filter such as systemd's
 * SystemCallFilter without @io_uring) the engine runs on epoll and the
 * relay logs why. The epoll backend is edge-triggered with both directions
 * registered once (nginx's choice): no epoll_ctl per chunk, one recv and one
 * send per chunk; a short read means the socket was drained (the next byte
 * raises a new edge), and after EPOLLRDHUP it reads on to the EOF, since a
 * FIN behind the data raises no edge of its own. Bulk directions on the
 * io_uring backend go by splice(), without a copy through user space
 * ("Bulk by splice" below); the epoll backend, the fallback, copies.
 *
 * Slots are an array indexed by tunnel; an id is (generation << 32 | slot),
 * and epoll events carry the generation too, so events or calls for a
 * tunnel that has ended (and whose slot may be reused) are ignored.
 * Closing a descriptor removes it from the epoll set, so there is no
 * EPOLL_CTL_DEL per tunnel.
 */
#define _GNU_SOURCE
#include "engine.h"
#include "tls.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <linux/io_uring.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
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
#define T_REPORTED 0x08  /* the owner has read the ending: the slot is free once nothing is in flight */
#define T_CARRIER 0x10   /* carries a connection the owner serves itself (eng_carrier): its bytes are
                          * not the tunnels' (total, ended_bytes) and it is never idle-closed */
/* io_uring side flags */
#define S_RECV 0x40      /* a recv is armed (or linked behind a send) */
#define S_SENDING 0x80   /* a send is in flight to this side */
#define S_SPLICED 0x100  /* read by splice() into the peer's pipe (bulk), not by recv */
/* epoll side flag */
#define S_OUTW 0x200     /* EPOLLOUT is in its epoll registration (added at its first short send) */
#define S_POLLIN 0x200   /* a poll for readable is armed (splice mode) */
#define S_POLLOUT 0x400  /* a poll for writable is armed (the pipe's bytes wait for it) */

static void ur_close_side(engine *e, eng_tunnel *t, uint32_t slot, int i);
static void ur_free(engine *e);
static int ur_init(engine *e, const char **why);
static void ur_open(engine *e, eng_tunnel *t, uint32_t slot, const char *to_client, size_t nc,
                    const char *to_origin, size_t no);
static int ur_poll(engine *e);
static void free_slot(engine *e, uint32_t slot);
static void tls_pump(engine *e, eng_tunnel *t, uint32_t slot, int i);
static int tls_close_notify(engine *e, eng_tunnel *t, uint32_t slot);
static void tls_side_closed(engine *e, eng_tunnel *t);
static void tls_detach(engine *e, eng_tunnel *t);

/* A side that cannot take more yet: what is pending for it waits. */
static inline int busy(const engine *e, const eng_side *s) {
    return s->pend != NULL || (s->flags & S_SENDING) || s->inpipe;
}

/* n bytes read from side i: its count, the engine's, and the tunnel's last activity. */
static inline void counted(engine *e, eng_tunnel *t, int i, uint64_t n) {
    t->s[i].nbytes += n;
    if (!(t->flags & T_CARRIER))
        e->total[i] += n;
    t->last_active_ms = e->now_ms;
}

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

int eng_init(engine *e, size_t bufsize, int backend, const char **why) {
    memset(e, 0, sizeof *e);
    e->free_head = ENG_NONE;
    e->epfd = -1;
    e->bufsize = bufsize ? bufsize : 256 * 1024;
    if (why)
        *why = NULL;
    eng_clock(e);
    if (backend == ENG_URING) {
        if (ur_init(e, why) == 0) {
            e->backend = ENG_URING;
            return 0;
        }
    }
    e->backend = ENG_EPOLL;
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (e->epfd < 0)
        return -errno;
    e->buf = malloc(e->bufsize);
    if (!e->buf) {
        close(e->epfd);
        e->epfd = -1;
        return -ENOMEM;
    }
    return 0;
}

static void side_close_in(engine *e, eng_tunnel *t, uint32_t slot, int i, int reset) {
    eng_side *s = &t->s[i];
    if (s->flags & S_CLOSED)
        return;
    if (reset) {
        struct linger l = {1, 0};
        setsockopt(s->fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    }
    if (e->backend == ENG_URING)
        ur_close_side(e, t, slot, i); /* cancels what the kernel holds for it */
    close(s->fd);
    s->fd = -1;
    s->flags = (s->flags | S_CLOSED) & ~(S_RD | S_WANT_SHUT);
    if (s->pr >= 0) { /* what the pipe held for it goes with it, as pend does */
        close(s->pr);
        close(s->pw);
        s->pr = s->pw = -1;
        s->inpipe = 0;
    }
    if (i == 0 && t->tls)
        tls_side_closed(e, t);
    if (!(s->flags & S_SENDING)) { /* else the kernel may still read it: freed with the send's completion */
        free(s->pend);
        s->pend = NULL;
        s->pend_off = s->pend_len = 0;
    }
}
#define side_close(sp, reset) side_close_in(e, t, slot, (int)((sp) - t->s), (reset))

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
        if (!(t->flags & T_CARRIER)) {
            e->ended_bytes[0] += t->s[0].nbytes;
            e->ended_bytes[1] += t->s[1].nbytes;
        }
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
    /* TLS: close_notify goes out behind what is pending, before the close */
    if (t->tls && !(t->s[0].flags & S_CLOSED) && (tls_close_notify(e, t, slot) < 0 || (t->flags & T_ENDED)))
        return;
    for (int i = 0; i < 2; i++)
        if (!busy(e, &t->s[i]))
            side_close(&t->s[i], 0);
    maybe_end(e, t, slot);
}

/* shutdown(SHUT_WR) on side j; 0 if that failed and the tunnel is gone. */
static int shut(engine *e, eng_tunnel *t, uint32_t slot, int j) {
    eng_side *d = &t->s[j];
    d->flags &= ~S_WANT_SHUT;
    if (d->flags & (S_SHUT | S_CLOSED))
        return 1;
    if (j == 0 && t->tls) { /* a TLS client: close_notify, then the FIN once it is sent */
        int r = tls_close_notify(e, t, slot);
        if (r < 0)
            return 0;
        if (r == 0) {
            d->flags |= S_WANT_SHUT;
            return 1;
        }
    }
    d->flags |= S_SHUT;
    if (shutdown(d->fd, SHUT_WR) < 0) {
        lost(e, t, slot, j);
        return 0;
    }
    return 1;
}

/* Side j could not take all it was sent: on epoll, watch it for writing from
 * now on. A side is registered for reading only at first, since an
 * edge-triggered EPOLLOUT in the first registration fires at once for every
 * new socket (writable): one wasted wake-up per tunnel, two syscalls and a
 * pass through the event loop, where most tunnels never fill a socket. */
static int want_out(engine *e, eng_tunnel *t, uint32_t slot, int j) {
    eng_side *d = &t->s[j];
    if (e->backend != ENG_EPOLL || (d->flags & S_OUTW))
        return 1;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.u64 = ev_key(t, slot, j)};
    if (epoll_ctl(e->epfd, EPOLL_CTL_MOD, d->fd, &ev) < 0) {
        lost(e, t, slot, j);
        return 0;
    }
    d->flags |= S_OUTW; /* kept: later edges are the socket draining, as wanted */
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
        return want_out(e, t, slot, j);
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
    } else if (busy(e, dst)) {
        dst->flags |= S_WANT_SHUT;
    } else {
        shut(e, t, slot, i ^ 1);
    }
}

/* Move bytes from side i to its peer until i is drained or the peer is full. */
static void pump(engine *e, eng_tunnel *t, uint32_t slot, int i) {
    if (t->tls) {
        tls_pump(e, t, slot, i);
        return;
    }
    eng_side *src = &t->s[i], *dst = &t->s[i ^ 1];
    for (;;) {
        if ((src->flags & (S_RD | S_EOF | S_CLOSED)) != S_RD || dst->pend ||
            (dst->flags & S_CLOSED) || (t->flags & (T_CLOSING | T_ENDED)))
            return;
        ssize_t n = recv(src->fd, e->buf, e->bufsize, 0);
        if (n > 0) {
            counted(e, t, i, (uint64_t)n);
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
    t->s[0].pr = t->s[0].pw = t->s[1].pr = t->s[1].pw = -1;
    if (e->backend == ENG_EPOLL) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET}; /* EPOLLOUT: want_out() */
        ev.data.u64 = ev_key(t, slot, 0);
        if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, cfd, &ev) < 0)
            return -errno;
        ev.data.u64 = ev_key(t, slot, 1);
        if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, ofd, &ev) < 0) {
            int err = errno;
            epoll_ctl(e->epfd, EPOLL_CTL_DEL, cfd, &ev);
            return -err;
        }
    }    e->free_head = next_free;
    t->flags = T_USED;
    t->token = token;
    t->last_active_ms = e->now_ms;
    e->open++;
    if (e->backend == ENG_URING) {
        ur_open(e, t, slot, to_client, nc, to_origin, no);
        return eng_id(e, slot);
    }
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

void eng_carrier(engine *e, int64_t id) {
    uint32_t slot = (uint32_t)(id & 0xffffffff);
    if (id < 0 || slot >= e->cap)
        return;
    eng_tunnel *t = &e->t[slot];
    if (t->gen != (uint32_t)(id >> 32) || !(t->flags & T_USED) || (t->flags & T_CARRIER))
        return;
    for (int i = 0; i < 2; i++) { /* what it read since it opened (or until it ended) leaves the totals */
        e->total[i] -= t->s[i].nbytes;
        if (t->flags & T_ENDED)
            e->ended_bytes[i] -= t->s[i].nbytes;
    }
    t->flags |= T_CARRIER;
}

int eng_is_carrier(const engine *e, uint32_t slot) { return slot < e->cap && (e->t[slot].flags & T_CARRIER); }

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
    uint32_t slot = (uint32_t)(id & 0xffffffff);
    side_close(&t->s[0], 0);
    side_close(&t->s[1], 0);
    maybe_end(e, t, slot);
    return 1;
}

int eng_close_idle(engine *e, int64_t limit_ms) {
    int n = 0;
    eng_clock(e);
    for (uint32_t slot = 0; slot < e->cap; slot++) {
        eng_tunnel *t = &e->t[slot];
        if ((t->flags & (T_USED | T_CLOSING | T_ENDED | T_CARRIER)) == T_USED &&
            e->now_ms - t->last_active_ms >= limit_ms) {
            close_tunnel(e, t, slot);
            n++;
        }
    }
    return n;
}

static int ep_poll(engine *e, int maxevents) {
    struct epoll_event evs[256];
    if (maxevents > 256 || maxevents <= 0)
        maxevents = 256;
    int n = epoll_wait(e->epfd, evs, maxevents, 0);
    if (n < 0)
        return errno == EINTR ? 0 : -errno;
    eng_clock(e);
    if (e->ntls)
        tls.ERR_clear_error(); /* SSL_get_error reads the thread's queue: Python's ssl may have left errors there */
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

int eng_poll(engine *e, int maxevents) {
    return e->backend == ENG_URING ? ur_poll(e) : ep_poll(e, maxevents);
}

uint32_t eng_pop_ended(engine *e) {
    return e->nended ? e->ended[--e->nended] : ENG_NONE;
}

static void free_slot(engine *e, uint32_t slot) {
    eng_tunnel *t = &e->t[slot];
    t->flags = 0;
    t->token = NULL;
    t->gen = (t->gen + 1) & 0x7fffffff;
    if (!t->gen)
        t->gen = 1;
    t->next_free = e->free_head;
    e->free_head = slot;
}

void eng_release(engine *e, uint32_t slot) {
    eng_tunnel *t = &e->t[slot];
    if (t->tls)
        tls_detach(e, t); /* before the owner drops the SSL */
    t->flags |= T_REPORTED;
    t->token = NULL;
    /* io_uring: the kernel may still hold requests (being cancelled) for it */
    if (!t->s[0].inflight && !t->s[1].inflight)
        free_slot(e, slot);
}

void eng_free(engine *e) {
    for (uint32_t slot = 0; slot < e->cap; slot++) {
        eng_tunnel *t = &e->t[slot];
        if ((t->flags & T_USED) && !(t->flags & T_ENDED)) {
            side_close(&t->s[0], 0);
            side_close(&t->s[1], 0);
        }
    }
    if (e->backend == ENG_URING)
        ur_free(e); /* after the ring is gone nothing reads the buffers */
    for (uint32_t slot = 0; slot < e->cap; slot++)
        for (int i = 0; i < 2; i++) {
            free(e->t[slot].s[i].pend);
            if ((e->t[slot].flags & T_USED) && e->t[slot].s[i].pr >= 0) {
                close(e->t[slot].s[i].pr);
                close(e->t[slot].s[i].pw);
            }
        }
    eng_tls_detach_all(e);
    free(e->t);
    free(e->ended);
    free(e->buf);
    free(e->tls_plain);
    free(e->tls_out);
    if (e->epfd >= 0 && e->backend == ENG_EPOLL)
        close(e->epfd);
    memset(e, 0, sizeof *e);
    e->epfd = -1;
}

/* ---------------------------------------------------------------------------
 * TLS tunnels (README "TLS"; tls.c is OpenSSL's side).
 *
 * The TLS handshake and the head phase ran in Python; at the 101 the client
 * side is handed over with its SSL, and from then on the pump is the
 * cleartext one with a record layer on the client side:
 *   client: recv ciphertext -> SSL_read (our BIO reads it in place) ->
 *           plaintext to the origin, one send per read as for cleartext
 *   origin: recv plaintext -> SSL_write (records into e->tls_out) -> one
 *           send to the client
 * with the same rules: what a peer cannot take is kept aside (at most one
 * read's worth, plus the carry: the ciphertext of that read not yet
 * decrypted) and its source is not read until it is sent; half-close as
 * half-close (the client's close_notify, or its FIN, is a FIN to the
 * origin; the origin's FIN is close_notify and then a FIN to the client;
 * the other direction goes on, as TLS 1.3 and OpenSSL allow); a failed
 * record or a reset closes the client and resets the origin; close()
 * sends close_notify before closing. Byte counts are plaintext, as the
 * Python plane counts them.
 *
 * Only on the epoll backend: an io_uring worker gives its TLS tunnels to a
 * second engine on epoll (relay/native/plane.py). Measured, not assumed:
 * `python -m bench.profile --workload tls-echo-64 --system wsrelay-tls
 * --perf` (the worker, 64 B wss echo, 50 connections) puts 83% of its
 * cycles in the kernel — sendto 58% (31 of it the loopback delivery to the
 * receiver, in our context), recvfrom 9%, sleeping 10% — OpenSSL 10%, this
 * engine 1.6%, and epoll_wait with every syscall entry ~7%: the share
 * io_uring could take back (it took a third of a cleartext 64 B round trip,
 * where nothing else is left). On epoll the TLS rows already beat both
 * anchors per core (bench/RESULTS.md, "TLS tunnels in the C pump": 64 B
 * 1.07x, 4 KiB 1.20x, 1 MiB 1.25x). TLS on the ring would need what this
 * design avoids: a stable buffer per send in flight (records are sealed
 * into one shared output buffer and sent at once) and every close_notify
 * and alert ordered behind the ring's sends; left for a later step.
 * ------------------------------------------------------------------------- */

/* Send n bytes to side j behind what is pending for it; 0 if the tunnel failed. */
static int send_after(engine *e, eng_tunnel *t, uint32_t slot, int j, const char *data, size_t n) {
    eng_side *d = &t->s[j];
    if (!d->pend)
        return send_or_keep(e, t, slot, j, data, n);
    size_t left = d->pend_len - d->pend_off;
    char *p = malloc(left + n);
    if (!p) {
        lost(e, t, slot, j);
        return 0;
    }
    memcpy(p, d->pend + d->pend_off, left);
    memcpy(p + left, data, n);
    free(d->pend);
    d->pend = p;
    d->pend_off = 0;
    d->pend_len = (uint32_t)(left + n);
    return 1;
}

/* The records SSL just wrote go to the client; 0 if the tunnel failed. */
static int tls_send_out(engine *e, eng_tunnel *t, uint32_t slot) {
    size_t n = e->tls_out_len;
    e->tls_out_len = 0;
    if (!n || (t->s[0].flags & S_CLOSED))
        return 1;
    return send_after(e, t, slot, 0, e->tls_out, n);
}

/* A record failed (bad MAC, unexpected message) or SSL could not write:
 * OpenSSL's alert, if it wrote one, goes out; the client is closed and the
 * origin reset, as after a reset. */
static void tls_failed(engine *e, eng_tunnel *t, uint32_t slot) {
    tls.ERR_clear_error();
    if (tls_send_out(e, t, slot))
        lost(e, t, slot, 0);
}

/* Seal n bytes of plaintext for the client; 0 if the tunnel failed. */
static int tls_seal(engine *e, eng_tunnel *t, uint32_t slot, const char *data, size_t n) {
    SSL *ssl = t->tls->ssl;
    size_t done = 0;
    while (done < n) { /* SSL_write writes all or fails: partial writes are not enabled */
        int r = tls.SSL_write(ssl, data + done, (int)(n - done));
        if (r <= 0) {
            tls_failed(e, t, slot);
            return 0;
        }
        done += (size_t)r;
    }
    return tls_send_out(e, t, slot);
}

/* close_notify to the client, once: 1 sent (or before), 0 waiting behind
 * what is pending for the client, -1 the tunnel failed. */
static int tls_close_notify(engine *e, eng_tunnel *t, uint32_t slot) {
    eng_tls *x = t->tls;
    if (!(x->flags & TLS_SENT_CLOSE_NOTIFY)) {
        x->flags |= TLS_SENT_CLOSE_NOTIFY;
        if (tls.SSL_shutdown(x->ssl) < 0)
            tls.ERR_clear_error(); /* nothing to send: the FIN says the rest */
        if (!tls_send_out(e, t, slot))
            return -1;
    }
    return t->s[0].pend ? 0 : 1;
}

/* What the last recv left undecrypted is this tunnel's to keep (backpressure
 * stopped SSL_read mid-read): copied aside, read first next time. */
static void tls_keep_rest(engine *e, eng_tunnel *t, uint32_t slot) {
    eng_tls *x = t->tls;
    if (e->tls_cur != x)
        return;
    e->tls_cur = NULL;
    size_t n = e->tls_in_len;
    e->tls_in_len = 0;
    if (!n || (t->flags & T_ENDED) || (t->s[0].flags & S_CLOSED))
        return;
    x->carry = malloc(n);
    if (!x->carry) {
        lost(e, t, slot, 0);
        return;
    }
    memcpy(x->carry, e->tls_in, n);
    x->carry_off = 0;
    x->carry_len = (uint32_t)n;
}

/* Client -> origin: decrypt what SSL and the carry hold, then read the
 * socket, until it is drained or the origin is full. */
static void tls_up(engine *e, eng_tunnel *t, uint32_t slot) {
    eng_side *src = &t->s[0], *dst = &t->s[1];
    eng_tls *x = t->tls;
    SSL *ssl = x->ssl;
    int need = !x->carry && !tls.SSL_has_pending(ssl); /* nothing buffered: read the socket first */
    for (;;) {
        if ((src->flags & (S_EOF | S_CLOSED)) || dst->pend || (dst->flags & S_CLOSED) ||
            (t->flags & (T_CLOSING | T_ENDED)))
            break;
        if (need) {
            if (!(src->flags & S_RD))
                break;
            ssize_t n = recv(src->fd, e->buf, e->bufsize, 0);
            if (n > 0) {
                e->tls_cur = x;
                e->tls_in = e->buf;
                e->tls_in_len = (size_t)n;
                if ((size_t)n < e->bufsize && !(src->flags & S_HUP))
                    src->flags &= ~S_RD; /* drained: the next byte raises an edge */
                need = 0;
            } else if (n == 0) {
                on_eof(e, t, slot, 0); /* a FIN without close_notify ends the stream all the same */
                break;
            } else if (errno == EINTR) {
                continue;
            } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
                src->flags &= ~S_RD;
                break;
            } else {
                lost(e, t, slot, 0);
                break;
            }
        }
        size_t plen = 0;
        int err = TLS_ERROR_NONE;
        while (plen < e->bufsize) {
            int r = tls.SSL_read(ssl, e->tls_plain + plen, (int)(e->bufsize - plen));
            if (r <= 0) {
                err = tls.SSL_get_error(ssl, r);
                break;
            }
            plen += (size_t)r;
            /* SSL_read returns one record at most, and reads no further than
             * the record it needs: with no ciphertext left to give it and
             * nothing buffered in it (plaintext, or records the head phase
             * read ahead), the next call could only ask for more (a call and
             * an error-queue lookup per chunk saved) */
            if (!e->tls_in_len && !x->carry && !tls.SSL_has_pending(ssl)) {
                err = TLS_ERROR_WANT_READ;
                break;
            }
        }
        /* records SSL answered with while reading (a KeyUpdate's), before the data */
        if (e->tls_out_len && !tls_send_out(e, t, slot))
            break;
        if (plen) {
            counted(e, t, 0, plen);
            if (!send_or_keep(e, t, slot, 1, e->tls_plain, plen))
                break;
        }
        if (err == TLS_ERROR_WANT_READ) {
            need = 1;
        } else if (err == TLS_ERROR_ZERO_RETURN) {
            on_eof(e, t, slot, 0); /* close_notify: the client's half-close */
            break;
        } else if (err != TLS_ERROR_NONE) {
            tls_failed(e, t, slot);
            break;
        }
    }
    tls_keep_rest(e, t, slot);
}

/* Origin -> client: read plaintext, seal it, send the records. */
static void tls_down(engine *e, eng_tunnel *t, uint32_t slot) {
    eng_side *src = &t->s[1], *dst = &t->s[0];
    for (;;) {
        if ((src->flags & (S_RD | S_EOF | S_CLOSED)) != S_RD || dst->pend || (dst->flags & (S_CLOSED | S_SHUT)) ||
            (t->flags & (T_CLOSING | T_ENDED)))
            return;
        ssize_t n = recv(src->fd, e->buf, e->bufsize, 0);
        if (n > 0) {
            counted(e, t, 1, (uint64_t)n);
            if (!tls_seal(e, t, slot, e->buf, (size_t)n))
                return;
            if ((size_t)n < e->bufsize && !(src->flags & S_HUP)) {
                src->flags &= ~S_RD;
                return;
            }
            continue;
        }
        if (n == 0) {
            on_eof(e, t, slot, 1);
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            src->flags &= ~S_RD;
            return;
        }
        lost(e, t, slot, 1);
        return;
    }
}

static void tls_pump(engine *e, eng_tunnel *t, uint32_t slot, int i) {
    if (i == 0)
        tls_up(e, t, slot);
    else
        tls_down(e, t, slot);
}

static void tls_side_closed(engine *e, eng_tunnel *t) {
    eng_tls *x = t->tls;
    free(x->carry);
    x->carry = NULL;
    x->carry_off = x->carry_len = 0;
    if (e->tls_cur == x) {
        e->tls_cur = NULL;
        e->tls_in_len = 0;
    }
}

/* The tunnel is over: our BIO forgets it (the SSL, still Python's, may
 * outlive it and reads EOF from then on) and its state is freed. */
static void tls_detach(engine *e, eng_tunnel *t) {
    eng_tls *x = t->tls;
    tls_side_closed(e, t);
    tls.BIO_set_data(x->bio, NULL);
    free(x);
    t->tls = NULL;
    e->ntls--;
}

void eng_tls_detach_all(engine *e) {
    for (uint32_t slot = 0; slot < e->cap; slot++)
        if (e->t[slot].tls)
            tls_detach(e, &e->t[slot]);
}

#define BIO_CTRL_PENDING 10

/* What an old (memory) BIO of the SSL holds: n bytes into *out (malloc'd), 0 if none, -1 on ENOMEM. */
static long take_bio(BIO *b, char **out) {
    *out = NULL;
    long n = b ? tls.BIO_ctrl(b, BIO_CTRL_PENDING, 0, NULL) : 0;
    if (n <= 0)
        return 0;
    *out = malloc((size_t)n);
    if (!*out)
        return -1;
    long got = 0;
    while (got < n) {
        int r = tls.BIO_read(b, *out + got, (int)(n - got));
        if (r <= 0)
            break;
        got += r;
    }
    return got;
}

int64_t eng_open_tls(engine *e, int cfd, int ofd, SSL *ssl, const char *to_client, size_t nc,
                     const char *to_origin, size_t no, void *token) {
    if (e->backend != ENG_EPOLL)
        return -EOPNOTSUPP;
    if (!tls_bio_method)
        return -ENOPROTOOPT;
    if (!e->tls_plain) {
        e->tls_plain = malloc(e->bufsize);
        e->tls_out_cap = tls_sealed_max(e->bufsize);
        e->tls_out = malloc(e->tls_out_cap);
        if (!e->tls_plain || !e->tls_out) {
            free(e->tls_plain);
            free(e->tls_out);
            e->tls_plain = e->tls_out = NULL;
            return -ENOMEM;
        }
    }
    eng_tls *x = calloc(1, sizeof *x);
    BIO *bio = tls.BIO_new(tls_bio_method);
    if (!x || !bio) {
        free(x);
        if (bio)
            tls.BIO_free(bio);
        return -ENOMEM;
    }
    int64_t id = eng_open(e, cfd, ofd, NULL, 0, to_origin, no, token);
    if (id < 0) {
        free(x);
        tls.BIO_free(bio);
        return id; /* nothing taken: the caller keeps the descriptors and the SSL */
    }
    uint32_t slot = (uint32_t)(id & 0xffffffff);
    eng_tunnel *t = &e->t[slot];
    tls.ERR_clear_error();
    /* What uvloop's SSL protocol holds: ciphertext it read that SSL has not
     * (its read BIO), and records SSL wrote that it has not sent (its write
     * BIO). Then our BIO takes their place. */
    char *early_out = NULL;
    long nin = take_bio(tls.SSL_get_rbio(ssl), &x->carry);
    long nout = take_bio(tls.SSL_get_wbio(ssl), &early_out);
    x->carry_len = nin > 0 ? (uint32_t)nin : 0;
    x->e = e;
    x->ssl = ssl;
    x->bio = bio;
    tls.BIO_set_data(bio, x);
    tls.BIO_set_init(bio, 1);
    tls.SSL_set_bio(ssl, bio, bio); /* takes our one reference; lets go of uvloop's BIOs */
    tls.SSL_set_options(ssl, TLS_OP_NO_RENEGOTIATION);
    /* from here SSL takes from our BIO only the record it needs (the rest stays
     * in the engine's buffer or carry, the backpressure bound); what the head
     * phase read ahead is decrypted first (tls_up below) */
    tls.SSL_set_read_ahead(ssl, 0);
    t->tls = x;
    e->ntls++;
    if (nin < 0 || nout < 0) { /* out of memory: what was read is lost, so the tunnel is too */
        free(early_out);
        eng_abort(e, id);
        return id;
    }
    if (t->flags & T_ENDED) { /* sending to_origin failed */
        free(early_out);
        return id;
    }
    int ok = nout <= 0 || send_after(e, t, slot, 0, early_out, (size_t)nout);
    free(early_out);
    if (!ok || (nc && !tls_seal(e, t, slot, to_client, nc)))
        return id;
    /* plaintext SSL decrypted before the 101, and the carry, go now: no edge will say so */
    tls_up(e, t, slot);
    return id;
}

/* ---------------------------------------------------------------------------
 * The io_uring backend.
 *
 * Per chunk: a recv (single-shot; the kernel picks a buffer from the
 * engine's provided-buffer ring when data is there, so an idle tunnel holds
 * none) completes; its buffer goes out to the peer in a send with
 * MSG_DONTWAIT, which completes during the submit; if the peer took every
 * byte the buffer goes back to the ring and the source gets its next recv.
 * If the peer took less, the rest is copied aside (the ring buffer goes back
 * at once, so stalled tunnels never drain the ring) and sent by a waiting
 * send, and the source is read again only once that is done. So, as with
 * epoll, a stalled direction holds at most one read's worth. (The next recv
 * cannot be linked behind the send: io_uring counts a short send without
 * MSG_WAITALL as a success and would read on.) Every request of a loop turn
 * goes to the kernel in one io_uring_enter; completions are read from shared
 * memory without a syscall.
 *
 * A request keeps its socket alive until it completes, so closing a side
 * cancels what is armed on it, and its slot is reused only once every
 * request for it has completed (user_data carries slot, side, op, buffer).
 * ------------------------------------------------------------------------- */

enum { OP_RECV = 1, OP_SEND = 2, OP_SENDP = 3, OP_CANCEL = 4, OP_POLLIN = 5, OP_POLLOUT = 6 };
#define UR_ENTRIES 4096
#define UR_NBUF 256 /* provided buffers of bufsize each, shared by every tunnel */

typedef struct eng_uring {
    int fd;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    unsigned sq_entries;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *ring_map, *sqes_map;
    size_t ring_sz, sqes_sz;
    unsigned sq_tail_local, to_submit;
    struct io_uring_buf_ring *br;
    size_t br_sz;
    char *bufs;
    unsigned buf_tail, nbuf;
    uint64_t *starved; /* sides whose recv found the ring empty: (gen << 32 | slot << 1 | side) */
    unsigned nstarved, starved_cap;
} eng_uring;

static inline uint64_t ud_make(uint32_t slot, int side, int op, unsigned bid) {
    return ((uint64_t)slot << 24) | ((uint64_t)bid << 4) | ((uint64_t)side << 3) | (uint64_t)op;
}

static int ur_enter(eng_uring *u, unsigned submit) {
    int r;
    do
        r = (int)syscall(__NR_io_uring_enter, u->fd, submit, 0, 0, NULL, 0);
    while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
}

int eng_flush(engine *e) {
    if (e->backend != ENG_URING)
        return 0;
    eng_uring *u = e->ur;
    if (!u->to_submit)
        return 0;
    __atomic_store_n(u->sq_tail, u->sq_tail_local, __ATOMIC_RELEASE);
    int r = ur_enter(u, u->to_submit);
    if (r > 0)
        u->to_submit -= (unsigned)r;
    return r;
}

static struct io_uring_sqe *ur_sqe(engine *e) {
    eng_uring *u = e->ur;
    for (int tries = 0; u->sq_tail_local - __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE) >= u->sq_entries; tries++) {
        /* full: hand what is queued to the kernel first. If it takes nothing
         * (it never has here: the completion ring is 8x the submission ring),
         * writing on would overwrite requests it has not read: stop the worker
         * rather than corrupt a tunnel (the supervisor starts another). */
        if (tries == 3)
            abort();
        eng_flush(e);
    }
    struct io_uring_sqe *q = &u->sqes[u->sq_tail_local & *u->sq_mask];
    u->sq_tail_local++;
    u->to_submit++;
    memset(q, 0, sizeof *q);
    return q;
}

static void ur_recycle(eng_uring *u, size_t bufsize, unsigned bid) {
    struct io_uring_buf *b = &u->br->bufs[u->buf_tail & (u->nbuf - 1)];
    b->addr = (uint64_t)(uintptr_t)(u->bufs + (size_t)bid * bufsize);
    b->len = (uint32_t)bufsize;
    b->bid = (uint16_t)bid;
    u->buf_tail++;
    __atomic_store_n(&u->br->tail, (uint16_t)u->buf_tail, __ATOMIC_RELEASE);
}

static void ur_arm_recv(engine *e, eng_tunnel *t, uint32_t slot, int i, int linked_behind_send) {
    (void)linked_behind_send;
    eng_side *s = &t->s[i];
    struct io_uring_sqe *q = ur_sqe(e);
    q->opcode = IORING_OP_RECV;
    q->fd = s->fd;
    q->flags = IOSQE_BUFFER_SELECT;
    q->buf_group = 0;
    q->len = 0; /* the buffer's size */
    q->user_data = ud_make(slot, i, OP_RECV, 0);
    s->flags |= S_RECV;
    s->inflight++;
}

/* Can side i be read: open, no EOF, not closing, its peer free to take more. */
static inline int ur_readable(engine *e, eng_tunnel *t, int i) {
    eng_side *s = &t->s[i], *p = &t->s[i ^ 1];
    return !(s->flags & (S_RECV | S_POLLIN | S_EOF | S_CLOSED)) && !(p->flags & S_CLOSED) && !busy(e, p) &&
           !(t->flags & (T_CLOSING | T_ENDED));
}

/* ---------------------------------------------------------------------------
 * Bulk by splice (io_uring backend).
 *
 * A read of SPLICE_MIN bytes or more marks its direction bulk: from then on
 * the source is read with splice() into a pipe of the peer's, and the pipe
 * spliced to the peer, so the bytes never cross user space (on Linux >= 6.5
 * a splice to a TCP socket passes the pages on: python -m bench.pump_compare
 * --pumps uring splice measured 563 us of CPU per 1 MiB round trip against
 * 891 for recv + send, bench/RESULTS.md). io_uring's own splice op is always
 * punted to its worker threads, so the engine calls splice() itself, non-
 * blocking, and asks io_uring only for readiness (a single-shot poll). The
 * pipe holds at most one read (F_SETPIPE_SZ to the read size): the bound a
 * stalled direction keeps, as for recv. A splice read under SPLICE_MIN ends
 * bulk mode (its pipe stays for the next burst); a pipe that cannot be made
 * (out of descriptors) keeps the direction on recv. Each bulk tunnel holds
 * two descriptors per direction more; an idle one, none.
 * ------------------------------------------------------------------------- */
#define SPLICE_MIN (64 * 1024)
#define SPLICE_ROUNDS 4 /* reads per turn before other tunnels' completions come first */

static void ur_arm_poll(engine *e, eng_tunnel *t, uint32_t slot, int i, int out) {
    eng_side *s = &t->s[i];
    struct io_uring_sqe *q = ur_sqe(e);
    q->opcode = IORING_OP_POLL_ADD;
    q->fd = s->fd;
    q->poll32_events = out ? POLLOUT : POLLIN;
    q->user_data = ud_make(slot, i, out ? OP_POLLOUT : OP_POLLIN, 0);
    s->flags |= out ? S_POLLOUT : S_POLLIN;
    s->inflight++;
}

/* Splice the pipe's bytes to side j: 1 when it is empty, 0 when j is full
 * (a poll is armed for it), -1 when the tunnel failed. The worker ignores
 * SIGPIPE (Python does at startup): a peer gone reads as EPIPE, as for send. */
static int ur_flush_pipe(engine *e, eng_tunnel *t, uint32_t slot, int j) {
    eng_side *d = &t->s[j];
    while (d->inpipe) {
        ssize_t w = splice(d->pr, NULL, d->fd, NULL, d->inpipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (w > 0) {
            d->inpipe -= (uint32_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            ur_arm_poll(e, t, slot, j, 1);
            return 0;
        } else {
            lost(e, t, slot, j);
            return -1;
        }
    }
    return 1;
}

static int ur_pipe(engine *e, eng_side *d) {
    int fds[2];
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0)
        return -1;
    fcntl(fds[1], F_SETPIPE_SZ, (int)e->bufsize); /* the bound; 64 KiB (the default) if refused */
    d->pr = fds[0];
    d->pw = fds[1];
    return 0;
}

/* Side i is bulk: splice what it has to its peer, until it is drained, the
 * peer is full, it ends, or it turns out not to be bulk any more. */
static void ur_splice(engine *e, eng_tunnel *t, uint32_t slot, int i) {
    eng_side *s = &t->s[i], *d = &t->s[i ^ 1];
    if (d->pr < 0 && ur_pipe(e, d) < 0) {
        s->flags &= ~S_SPLICED;
        ur_arm_recv(e, t, slot, i, 0);
        return;
    }
    for (int round = 0; round < SPLICE_ROUNDS; round++) {
        ssize_t n = splice(s->fd, NULL, d->pw, NULL, e->bufsize, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n > 0) {
            counted(e, t, i, (uint64_t)n);
            e->spliced += (uint64_t)n;
            d->inpipe = (uint32_t)n;
            if (ur_flush_pipe(e, t, slot, i ^ 1) <= 0)
                return; /* the peer's poll, or the tunnel's end, takes it from here */
            if ((size_t)n < SPLICE_MIN) {
                s->flags &= ~S_SPLICED; /* not bulk now: back to recv, batched by the ring */
                ur_arm_recv(e, t, slot, i, 0);
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
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            break;
        lost(e, t, slot, i);
        return;
    }
    ur_arm_poll(e, t, slot, i, 0); /* drained, or its turn is up: a ready socket's poll completes at once */
}

/* Read side i on, the way its direction reads now. */
static void ur_read_on(engine *e, eng_tunnel *t, uint32_t slot, int i) {
    if (!ur_readable(e, t, i))
        return;
    if (t->s[i].flags & S_SPLICED)
        ur_splice(e, t, slot, i);
    else
        ur_arm_recv(e, t, slot, i, 0);
}

static void ur_send_pend(engine *e, eng_tunnel *t, uint32_t slot, int j) {
    eng_side *d = &t->s[j];
    struct io_uring_sqe *q = ur_sqe(e);
    q->opcode = IORING_OP_SEND;
    q->fd = d->fd;
    q->addr = (uint64_t)(uintptr_t)(d->pend + d->pend_off);
    q->len = d->pend_len - d->pend_off;
    q->msg_flags = MSG_NOSIGNAL;
    q->user_data = ud_make(slot, j, OP_SENDP, 0);
    d->flags |= S_SENDING;
    d->inflight++;
}

static int ur_keep(engine *e, eng_tunnel *t, uint32_t slot, int j, const char *data, size_t n) {
    eng_side *d = &t->s[j];
    d->pend = malloc(n);
    if (!d->pend) {
        lost(e, t, slot, j);
        return 0;
    }
    memcpy(d->pend, data, n);
    d->pend_off = 0;
    d->pend_len = (uint32_t)n;
    ur_send_pend(e, t, slot, j);
    return 1;
}

static void ur_open(engine *e, eng_tunnel *t, uint32_t slot, const char *to_client, size_t nc,
                    const char *to_origin, size_t no) {
    if (nc && !ur_keep(e, t, slot, 0, to_client, nc))
        return;
    if (no && !ur_keep(e, t, slot, 1, to_origin, no))
        return;
    for (int i = 0; i < 2; i++)
        if (ur_readable(e, t, i))
            ur_arm_recv(e, t, slot, i, 0);
}

static void ur_cancel(engine *e, uint64_t target) {
    struct io_uring_sqe *q = ur_sqe(e);
    q->opcode = IORING_OP_ASYNC_CANCEL;
    q->fd = -1;
    q->addr = target;
    q->user_data = ud_make(0, 0, OP_CANCEL, 0);
}

/* Before its descriptor is closed: cancel what is armed on side i. A send
 * in flight keeps its memory until its completion comes back. */
static void ur_close_side(engine *e, eng_tunnel *t, uint32_t slot, int i) {
    eng_side *s = &t->s[i];
    if (s->flags & S_RECV)
        ur_cancel(e, ud_make(slot, i, OP_RECV, 0));
    if (s->flags & S_SENDING)
        ur_cancel(e, s->pend ? ud_make(slot, i, OP_SENDP, 0) : s->send_ud);
    if (s->flags & S_POLLIN)
        ur_cancel(e, ud_make(slot, i, OP_POLLIN, 0));
    if (s->flags & S_POLLOUT)
        ur_cancel(e, ud_make(slot, i, OP_POLLOUT, 0));
}

/* After a side's pending bytes are all sent. */
static void ur_sent(engine *e, eng_tunnel *t, uint32_t slot, int j) {
    eng_side *d = &t->s[j];
    if ((d->flags & S_WANT_SHUT) && !shut(e, t, slot, j))
        return;
    if (t->flags & T_CLOSING) {
        side_close(d, 0);
        maybe_end(e, t, slot);
        return;
    }
    ur_read_on(e, t, slot, j ^ 1);
}

static void ur_complete(engine *e, uint64_t ud, int res, uint32_t cflags) {
    eng_uring *u = e->ur;
    int op = (int)(ud & 7), i = (int)((ud >> 3) & 1);
    unsigned bid = (unsigned)((ud >> 4) & 0xfffff);
    uint32_t slot = (uint32_t)(ud >> 24);
    if (op == OP_CANCEL)
        return;
    if (op == OP_RECV && (cflags & IORING_CQE_F_BUFFER))
        bid = cflags >> IORING_CQE_BUFFER_SHIFT;
    int has_buf = (op == OP_RECV && (cflags & IORING_CQE_F_BUFFER)) || op == OP_SEND;
    eng_tunnel *t = &e->t[slot];
    eng_side *s = &t->s[i];
    s->inflight--;
    if (op == OP_RECV)
        s->flags &= ~S_RECV;
    else if (op == OP_POLLIN)
        s->flags &= ~S_POLLIN;
    else if (op == OP_POLLOUT)
        s->flags &= ~S_POLLOUT;
    else
        s->flags &= ~S_SENDING;
    if ((s->flags & S_CLOSED) || (t->flags & T_ENDED)) {
        /* a request of a side already closed: only give its memory back */
        if (has_buf)
            ur_recycle(u, e->bufsize, bid);
        if (op == OP_SENDP) {
            free(s->pend);
            s->pend = NULL;
            s->pend_off = s->pend_len = 0;
        }
        if ((t->flags & T_REPORTED) && !t->s[0].inflight && !t->s[1].inflight)
            free_slot(e, slot);
        return;
    }
    int j = i ^ 1;
    if (op == OP_POLLIN || op == OP_POLLOUT) {
        if (res < 0 && res != -EINTR) {
            lost(e, t, slot, i);
        } else if (op == OP_POLLIN) {
            ur_read_on(e, t, slot, i);
        } else if (ur_flush_pipe(e, t, slot, i) == 1) {
            ur_sent(e, t, slot, i);
        }
        return;
    }
    if (op == OP_RECV) {
        if (res > 0) {
            if (res >= SPLICE_MIN)
                s->flags |= S_SPLICED; /* bulk: read on by splice once this chunk is sent */
            counted(e, t, i, (uint64_t)res);
            eng_side *d = &t->s[j];
            /* the peer is free (recvs are armed only then): send straight from the ring
             * buffer; the source is read again once the peer took it all (ur_sent) */
            struct io_uring_sqe *q = ur_sqe(e);
            q->opcode = IORING_OP_SEND;
            q->fd = d->fd;
            q->addr = (uint64_t)(uintptr_t)(u->bufs + (size_t)bid * e->bufsize);
            q->len = (uint32_t)res;
            q->msg_flags = MSG_NOSIGNAL | MSG_DONTWAIT;
            q->user_data = d->send_ud = ud_make(slot, j, OP_SEND, bid);
            d->send_len = (uint32_t)res;
            d->flags |= S_SENDING;
            d->inflight++;
        } else if (res == 0) {
            if (has_buf)
                ur_recycle(u, e->bufsize, bid);
            on_eof(e, t, slot, i);
        } else if (res == -ENOBUFS) {
            if (u->nstarved == u->starved_cap) {
                unsigned cap = u->starved_cap ? 2 * u->starved_cap : 64;
                uint64_t *n = realloc(u->starved, cap * sizeof *n);
                if (!n) {
                    lost(e, t, slot, i);
                    return;
                }
                u->starved = n;
                u->starved_cap = cap;
            }
            u->starved[u->nstarved++] = ((uint64_t)t->gen << 32) | ((uint64_t)slot << 1) | (uint64_t)i;
        } else if (res == -EINTR || res == -EAGAIN) {
            if (ur_readable(e, t, i))
                ur_arm_recv(e, t, slot, i, 0);
        } else {
            lost(e, t, slot, i);
        }
        return;
    }
    if (op == OP_SEND) {
        const char *data = u->bufs + (size_t)bid * e->bufsize;
        uint32_t len = s->send_len;
        if (res == (int)len) {
            ur_recycle(u, e->bufsize, bid);
            ur_sent(e, t, slot, i);
        } else if (res >= 0 || res == -EAGAIN || res == -EWOULDBLOCK) {
            /* the socket is full: keep the rest aside, give the ring buffer back */
            size_t done = res > 0 ? (size_t)res : 0;
            int ok = ur_keep(e, t, slot, i, data + done, len - done);
            ur_recycle(u, e->bufsize, bid);
            (void)ok;
        } else {
            ur_recycle(u, e->bufsize, bid);
            lost(e, t, slot, i);
        }
        return;
    }
    /* OP_SENDP */
    if (res > 0) {
        s->pend_off += (uint32_t)res;
        if (s->pend_off < s->pend_len) {
            ur_send_pend(e, t, slot, i);
            return;
        }
        free(s->pend);
        s->pend = NULL;
        s->pend_off = s->pend_len = 0;
        ur_sent(e, t, slot, i);
    } else if (res == -EINTR || res == -EAGAIN) {
        ur_send_pend(e, t, slot, i);
    } else {
        lost(e, t, slot, i);
    }
}

static int ur_poll(engine *e) {
    eng_uring *u = e->ur;
    int handled = 0;
    eng_clock(e);
    for (int round = 0; round < 8; round++) {
        unsigned head = *u->cq_head, tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE), seen = 0;
        unsigned recycled_before = u->buf_tail;
        while (head != tail) {
            struct io_uring_cqe *c = &u->cqes[head & *u->cq_mask];
            uint64_t ud = c->user_data;
            int res = c->res;
            uint32_t fl = c->flags;
            head++;
            seen++;
            __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
            ur_complete(e, ud, res, fl);
            if (head == tail)
                tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
        }
        handled += (int)seen;
        if (u->buf_tail != recycled_before && u->nstarved) {
            /* buffers came back: read again where the ring ran dry */
            unsigned n = u->nstarved;
            u->nstarved = 0;
            for (unsigned k = 0; k < n; k++) {
                uint64_t key = u->starved[k];
                uint32_t slot = (uint32_t)(key & 0xffffffff) >> 1;
                int i = (int)(key & 1);
                if (slot < e->cap && e->t[slot].gen == (uint32_t)(key >> 32) &&
                    (e->t[slot].flags & (T_USED | T_ENDED)) == T_USED && ur_readable(e, &e->t[slot], i))
                    ur_arm_recv(e, &e->t[slot], slot, i, 0);
            }
        }
        if (!u->to_submit)
            break;
        /* sends with MSG_DONTWAIT complete during the submit: read them in the next round */
        int r = eng_flush(e);
        if (r < 0)
            return r;
    }
    return handled;
}

static int ur_init(engine *e, const char **why) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL;
    p.cq_entries = 8 * UR_ENTRIES;
    int fd = (int)syscall(__NR_io_uring_setup, UR_ENTRIES, &p);
    if (fd < 0) {
        if (why)
            *why = errno == ENOSYS ? "io_uring is not in this kernel"
                 : errno == EPERM  ? "io_uring is not permitted here (kernel.io_uring_disabled, seccomp)"
                 : errno == EINVAL ? "this kernel's io_uring lacks a needed feature (Linux >= 6.0)"
                                   : "io_uring_setup failed";
        return -1;
    }
    if (!(p.features & IORING_FEAT_SINGLE_MMAP) || !(p.features & IORING_FEAT_NODROP) ||
        !(p.features & IORING_FEAT_FAST_POLL)) {
        close(fd);
        if (why)
            *why = "this kernel's io_uring lacks a needed feature (Linux >= 6.0)";
        return -1;
    }
    eng_uring *u = calloc(1, sizeof *u);
    if (!u) {
        close(fd);
        return -1;
    }
    u->fd = fd;
    size_t sq_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    u->ring_sz = sq_sz > cq_sz ? sq_sz : cq_sz;
    u->ring_map = mmap(NULL, u->ring_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    u->sqes_sz = p.sq_entries * sizeof(struct io_uring_sqe);
    u->sqes_map = mmap(NULL, u->sqes_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    u->nbuf = UR_NBUF;
    u->br_sz = u->nbuf * sizeof(struct io_uring_buf);
    u->br = mmap(NULL, u->br_sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    /* the buffers themselves: reserved, not touched until used */
    u->bufs = mmap(NULL, (size_t)u->nbuf * e->bufsize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (u->ring_map == MAP_FAILED || u->sqes_map == MAP_FAILED || u->br == MAP_FAILED || u->bufs == MAP_FAILED) {
        if (why)
            *why = "cannot map the io_uring rings";
        e->ur = u;
        ur_free(e);
        return -1;
    }
    char *ring = u->ring_map;
    u->sq_head = (unsigned *)(ring + p.sq_off.head);
    u->sq_tail = (unsigned *)(ring + p.sq_off.tail);
    u->sq_mask = (unsigned *)(ring + p.sq_off.ring_mask);
    u->sq_array = (unsigned *)(ring + p.sq_off.array);
    u->cq_head = (unsigned *)(ring + p.cq_off.head);
    u->cq_tail = (unsigned *)(ring + p.cq_off.tail);
    u->cq_mask = (unsigned *)(ring + p.cq_off.ring_mask);
    u->cqes = (struct io_uring_cqe *)(ring + p.cq_off.cqes);
    u->sqes = u->sqes_map;
    u->sq_entries = p.sq_entries;
    for (unsigned k = 0; k < p.sq_entries; k++)
        u->sq_array[k] = k;
    u->sq_tail_local = *u->sq_tail;
    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof reg);
    reg.ring_addr = (uint64_t)(uintptr_t)u->br;
    reg.ring_entries = u->nbuf;
    reg.bgid = 0;
    if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_PBUF_RING, &reg, 1) < 0) {
        if (why)
            *why = "this kernel's io_uring has no provided-buffer rings (Linux >= 5.19)";
        e->ur = u;
        ur_free(e);
        return -1;
    }
    for (unsigned b = 0; b < u->nbuf; b++)
        ur_recycle(u, e->bufsize, b);
    e->ur = u;
    e->epfd = fd;
    return 0;
}

static void ur_free(engine *e) {
    eng_uring *u = e->ur;
    if (!u)
        return;
    if (u->fd >= 0)
        close(u->fd);
    if (u->ring_map && u->ring_map != MAP_FAILED)
        munmap(u->ring_map, u->ring_sz);
    if (u->sqes_map && u->sqes_map != MAP_FAILED)
        munmap(u->sqes_map, u->sqes_sz);
    if (u->br && u->br != MAP_FAILED)
        munmap(u->br, u->br_sz);
    if (u->bufs && u->bufs != MAP_FAILED)
        munmap(u->bufs, (size_t)u->nbuf * e->bufsize);
    free(u->starved);
    free(u);
    e->ur = NULL;
    e->epfd = -1;
}
