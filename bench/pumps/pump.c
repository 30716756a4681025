/* TCP relay pumps for the "epoll or io_uring" measurement
 * (python -m bench.pump_compare; bench/RESULTS.md).
 *
 *   pump epoll      LISTEN_PORT ORIGIN_PORT   relay/native/engine.c, epoll backend
 *   pump uring      LISTEN_PORT ORIGIN_PORT   relay/native/engine.c, io_uring backend
 *   pump multishot  LISTEN_PORT ORIGIN_PORT   the first io_uring prototype: multishot
 *                                             recv into a provided-buffer ring, sends
 *                                             queued per socket (one in flight, so
 *                                             bytes stay in order), no per-tunnel
 *                                             bound (a benchmark-only design)
 *   pump splice     LISTEN_PORT ORIGIN_PORT   socket -> pipe -> socket with splice(2) on
 *                                             epoll, 1 MiB pipes (benchmark-only: is
 *                                             the copy through user space the bulk cost?)
 *
 * Both accept clients and connect to the origin the same way, and both sit
 * under an outer epoll as the worker's engine sits under uvloop's: the
 * engine's epoll descriptor or the ring's descriptor is one entry in it.
 * The relay is byte-transparent, so the WebSocket load generator's
 * handshakes and frames pass through untouched. Benchmark code: a peer that
 * half-closes ends its tunnel here.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../../relay/native/engine.h"

static int origin_port;

static int listen_on(int port) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(0x7f000001)};
    if (bind(s, (void *)&a, sizeof a) < 0 || listen(s, 4096) < 0) {
        perror("listen");
        exit(1);
    }
    return s;
}

/* accept one client and connect its origin (blocking connect: loopback) */
static int accept_pair(int lst, int *cfd, int *ofd) {
    int one = 1;
    *cfd = accept4(lst, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (*cfd < 0)
        return -1;
    *ofd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(origin_port),
                            .sin_addr.s_addr = htonl(0x7f000001)};
    if (connect(*ofd, (void *)&a, sizeof a) < 0) {
        close(*cfd);
        close(*ofd);
        return -1;
    }
    fcntl(*ofd, F_SETFL, O_NONBLOCK);
    setsockopt(*cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(*ofd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return 0;
}

/* -- epoll: the engine ------------------------------------------------------ */

static void run_engine(int lst, int backend) {
    engine e;
    const char *why;
    eng_init(&e, 256 * 1024, backend, &why);
    if (e.backend != backend) {
        fprintf(stderr, "engine: %s\n", why ? why : "backend unavailable");
        exit(1);
    }
    int outer = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0};
    epoll_ctl(outer, EPOLL_CTL_ADD, lst, &ev);
    ev.data.u32 = 1;
    epoll_ctl(outer, EPOLL_CTL_ADD, e.epfd, &ev);
    for (;;) {
        struct epoll_event evs[2];
        int n = epoll_wait(outer, evs, 2, -1);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u32 == 0) {
                int c, o;
                while (accept_pair(lst, &c, &o) == 0)
                    eng_open(&e, c, o, NULL, 0, NULL, 0, NULL);
                eng_flush(&e);
            } else {
                eng_poll(&e, 256);
                uint32_t slot;
                while ((slot = eng_pop_ended(&e)) != ENG_NONE)
                    eng_release(&e, slot);
            }
        }
    }
}

/* -- io_uring ----------------------------------------------------------------- */

#define NBUF 256
#define BUFSZ (256 * 1024)
#define QMAX 64
enum { OP_RECV = 0, OP_SEND = 1 };

typedef struct uside {
    int fd, peer;          /* peer: index of the other side */
    int recv_armed, eof, closed;
    int sending;           /* a send is in flight */
    uint16_t q[QMAX];      /* buffer ids waiting to be sent to this fd */
    uint32_t qlen[QMAX], qoff_head;
    int qh, qn;
} uside;

static struct io_uring ring;
static struct io_uring_buf_ring *br;
static char *bufs;
static uside *sides;
static int nsides, capsides;
static int *starved, nstarved;

static inline uint64_t ud(int side, int op) { return ((uint64_t)side << 1) | (uint64_t)op; }

static struct io_uring_sqe *sqe_get(void) {
    struct io_uring_sqe *s = io_uring_get_sqe(&ring);
    if (!s) {
        io_uring_submit(&ring);
        s = io_uring_get_sqe(&ring);
    }
    return s;
}

static void arm_recv(int i) {
    struct io_uring_sqe *s = sqe_get();
    io_uring_prep_recv_multishot(s, sides[i].fd, NULL, 0, 0);
    s->flags |= IOSQE_BUFFER_SELECT;
    s->buf_group = 0;
    io_uring_sqe_set_data64(s, ud(i, OP_RECV));
    sides[i].recv_armed = 1;
}

static void give_back(uint16_t bid) {
    io_uring_buf_ring_add(br, bufs + (size_t)bid * BUFSZ, BUFSZ, bid, io_uring_buf_ring_mask(NBUF), 0);
    io_uring_buf_ring_advance(br, 1);
}

static void send_head(int j) {
    uside *d = &sides[j];
    if (d->sending || !d->qn || d->closed)
        return;
    uint16_t bid = d->q[d->qh];
    struct io_uring_sqe *s = sqe_get();
    io_uring_prep_send(s, d->fd, bufs + (size_t)bid * BUFSZ + d->qoff_head, d->qlen[d->qh] - d->qoff_head,
                       MSG_NOSIGNAL);
    io_uring_sqe_set_data64(s, ud(j, OP_SEND));
    d->sending = 1;
}

static void close_pair(int i) {
    int j = sides[i].peer;
    for (int k = 0; k < 2; k++) {
        int x = k ? j : i;
        if (!sides[x].closed) {
            sides[x].closed = 1;
            close(sides[x].fd); /* cancels its multishot recv (-ECANCELED / 0) */
            while (sides[x].qn) {
                give_back(sides[x].q[sides[x].qh]);
                sides[x].qh = (sides[x].qh + 1) % QMAX;
                sides[x].qn--;
            }
        }
    }
}

static void on_cqe(struct io_uring_cqe *c) {
    uint64_t d = io_uring_cqe_get_data64(c);
    int i = (int)(d >> 1), op = (int)(d & 1);
    uside *s = &sides[i];
    if (op == OP_RECV) {
        if (!(c->flags & IORING_CQE_F_MORE))
            s->recv_armed = 0;
        if (c->res > 0) {
            uint16_t bid = c->flags >> IORING_CQE_BUFFER_SHIFT;
            uside *p = &sides[s->peer];
            if (s->closed || p->closed || p->qn == QMAX) {
                give_back(bid);
                if (!s->closed)
                    close_pair(i);
                return;
            }
            int slot = (p->qh + p->qn) % QMAX;
            p->q[slot] = bid;
            p->qlen[slot] = (uint32_t)c->res;
            if (!p->qn)
                p->qoff_head = 0;
            p->qn++;
            send_head(s->peer);
            if (!s->recv_armed && !s->closed)
                arm_recv(i);
        } else if (c->res == -ENOBUFS) {
            starved[nstarved++] = i; /* re-armed once sends give buffers back */
        } else if (!s->closed) {
            close_pair(i); /* EOF or error: the benchmark ends the tunnel */
        }
    } else {
        s->sending = 0;
        if (s->closed)
            return;
        if (c->res < 0) {
            close_pair(i);
            return;
        }
        s->qoff_head += (uint32_t)c->res;
        if (s->qoff_head >= s->qlen[s->qh]) {
            give_back(s->q[s->qh]);
            s->qh = (s->qh + 1) % QMAX;
            s->qn--;
            s->qoff_head = 0;
            while (nstarved) {
                int k = starved[--nstarved];
                if (!sides[k].closed && !sides[k].recv_armed)
                    arm_recv(k);
            }
        }
        send_head(i);
    }
}

static void run_uring(int lst) {
    struct io_uring_params p = {.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN};
    if (io_uring_queue_init_params(4096, &ring, &p) < 0) {
        perror("io_uring_queue_init");
        exit(1);
    }
    /* liburing 2.3 (Debian 12) has no io_uring_setup_buf_ring: map and register it by hand */
    br = mmap(NULL, NBUF * sizeof(struct io_uring_buf), PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    io_uring_buf_ring_init(br);
    struct io_uring_buf_reg reg = {.ring_addr = (unsigned long)br, .ring_entries = NBUF, .bgid = 0};
    int err = io_uring_register_buf_ring(&ring, &reg, 0);
    if (err < 0) {
        fprintf(stderr, "buf ring: %s\n", strerror(-err));
        exit(1);
    }
    bufs = malloc((size_t)NBUF * BUFSZ);
    for (int b = 0; b < NBUF; b++)
        io_uring_buf_ring_add(br, bufs + (size_t)b * BUFSZ, BUFSZ, b, io_uring_buf_ring_mask(NBUF), b);
    io_uring_buf_ring_advance(br, NBUF);
    capsides = 65536;
    sides = calloc(capsides, sizeof *sides);
    starved = calloc(capsides, sizeof *starved);
    int outer = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0};
    epoll_ctl(outer, EPOLL_CTL_ADD, lst, &ev);
    ev.data.u32 = 1;
    epoll_ctl(outer, EPOLL_CTL_ADD, ring.ring_fd, &ev);
    for (;;) {
        struct epoll_event evs[2];
        int n = epoll_wait(outer, evs, 2, -1);
        for (int k = 0; k < n; k++) {
            if (evs[k].data.u32 == 0) {
                int c, o;
                while (nsides + 2 <= capsides && accept_pair(lst, &c, &o) == 0) {
                    int i = nsides++, j = nsides++;
                    memset(&sides[i], 0, sizeof sides[i]);
                    memset(&sides[j], 0, sizeof sides[j]);
                    sides[i].fd = c;
                    sides[i].peer = j;
                    sides[j].fd = o;
                    sides[j].peer = i;
                    arm_recv(i);
                    arm_recv(j);
                }
            }
        }
        /* reap whatever completed (no syscall), then submit what that produced */
        for (int rounds = 0; rounds < 4; rounds++) {
            struct io_uring_cqe *c;
            unsigned head, seen = 0;
            io_uring_for_each_cqe(&ring, head, c) {
                on_cqe(c);
                seen++;
            }
            io_uring_cq_advance(&ring, seen);
            if (!io_uring_sq_ready(&ring))
                break;
            io_uring_submit(&ring);
        }
    }
}

/* -- splice: socket -> pipe -> socket, no copy through user space ------------- */

#define SPLICE_MAX (1 << 20)

typedef struct sdir {
    int src, dst, pr, pw; /* pipe read/write ends */
    size_t inpipe;
    int dst_blocked;
} sdir;

typedef struct spair {
    sdir d[2]; /* 0: client -> origin, 1: origin -> client */
    int cfd, ofd, dead;
} spair;

static int s_outer;

static void s_watch(spair *p) {
    /* each socket: readable unless its direction's pipe is waiting; writable while blocked */
    int fds[2] = {p->cfd, p->ofd};
    for (int k = 0; k < 2; k++) {
        sdir *rd = &p->d[k];       /* fds[k] reads in direction k */
        sdir *wr = &p->d[1 - k];   /* fds[k] writes in direction 1-k */
        struct epoll_event ev = {.events = (rd->inpipe ? 0 : EPOLLIN) | (wr->dst_blocked ? EPOLLOUT : 0),
                                 .data.ptr = p};
        epoll_ctl(s_outer, EPOLL_CTL_MOD, fds[k], &ev);
    }
}

static void s_close(spair *p) {
    if (p->dead)
        return;
    p->dead = 1;
    close(p->cfd);
    close(p->ofd);
    for (int k = 0; k < 2; k++) {
        close(p->d[k].pr);
        close(p->d[k].pw);
    }
}

/* move what the pipe holds to dst, then what src has (until EAGAIN either way) */
static int s_pump(sdir *d) {
    for (;;) {
        while (d->inpipe) {
            ssize_t n = splice(d->pr, NULL, d->dst, NULL, d->inpipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n < 0) {
                if (errno == EAGAIN) {
                    d->dst_blocked = 1;
                    return 0;
                }
                return -1;
            }
            d->inpipe -= (size_t)n;
        }
        d->dst_blocked = 0;
        ssize_t n = splice(d->src, NULL, d->pw, NULL, SPLICE_MAX, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n == 0)
            return -1; /* EOF: benchmark code ends the pair */
        if (n < 0)
            return errno == EAGAIN ? 0 : -1;
        d->inpipe = (size_t)n;
    }
}

static void run_splice(int lst) {
    s_outer = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(s_outer, EPOLL_CTL_ADD, lst, &ev);
    for (;;) {
        struct epoll_event evs[64];
        int n = epoll_wait(s_outer, evs, 64, -1);
        for (int i = 0; i < n; i++) {
            spair *p = evs[i].data.ptr;
            if (!p) {
                int c, o;
                while (accept_pair(lst, &c, &o) == 0) {
                    p = calloc(1, sizeof *p);
                    p->cfd = c;
                    p->ofd = o;
                    for (int k = 0; k < 2; k++) {
                        int pp[2];
                        pipe2(pp, O_NONBLOCK | O_CLOEXEC);
                        fcntl(pp[1], F_SETPIPE_SZ, SPLICE_MAX);
                        p->d[k] = (sdir){.src = k ? o : c, .dst = k ? c : o, .pr = pp[0], .pw = pp[1]};
                    }
                    struct epoll_event e2 = {.events = EPOLLIN, .data.ptr = p};
                    epoll_ctl(s_outer, EPOLL_CTL_ADD, c, &e2);
                    epoll_ctl(s_outer, EPOLL_CTL_ADD, o, &e2);
                }
                continue;
            }
            if (p->dead)
                continue;
            if (s_pump(&p->d[0]) < 0 || s_pump(&p->d[1]) < 0) {
                s_close(p); /* leaked on purpose: a benchmark pump */
                continue;
            }
            s_watch(p);
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: pump epoll|uring|multishot|splice LISTEN_PORT ORIGIN_PORT\n");
        return 2;
    }
    origin_port = atoi(argv[3]);
    int lst = listen_on(atoi(argv[2]));
    printf("listening on 127.0.0.1:%d\n", atoi(argv[2]));
    fflush(stdout);
    if (!strcmp(argv[1], "epoll"))
        run_engine(lst, ENG_EPOLL);
    else if (!strcmp(argv[1], "uring"))
        run_engine(lst, ENG_URING);
    else if (!strcmp(argv[1], "splice"))
        run_splice(lst);
    else
        run_uring(lst);
    return 0;
}
