/* relay.native._engine: the CPython binding of engine.c (the pump).
 *
 * A plain C-API module rather than Cython: the binding is one type with a
 * dozen small methods, so it needs no build-time dependency beyond a C
 * compiler and Python's headers, nothing is generated, and the
 * AddressSanitizer build (tests/test_native_asan.py) is one cc command.
 *
 *   Engine(read_size=262144, on_end=callable, backend="io_uring")
 *                              backend "io_uring" falls back to "epoll" where
 *                              io_uring is unavailable (.backend, .fallback_reason)
 *   .fileno()                  the descriptor to watch (ring or epoll set), for loop.add_reader
 *   .poll(maxevents=256)       handle what is ready, without waiting; -> events handled
 *   .tunnel(client_fd, origin_fd, to_client, to_origin, token) -> id
 *                              takes both descriptors (non-blocking TCP
 *                              sockets); OSError leaves them with the caller
 *   .close(id) / .abort(id)    -> False if the tunnel already ended
 *   .close_all() / .abort_all() / .close_idle(seconds) -> tunnels closed
 *   .bytes(id) -> (up, down) | None;  .idle(id) -> seconds | None
 *   .totals -> (up, down) ever;  .open_bytes -> (up, down) of open tunnels;  .open
 *   .tls_tunnel(client_fd, origin_fd, to_client, to_origin, token, sslsock) -> id
 *                              a TLS tunnel (epoll engines only): the client side
 *                              speaks TLS through sslsock (an _ssl._SSLSocket,
 *                              handshake done), which the caller keeps alive until
 *                              on_end; to_client is plaintext. Module functions:
 *                              tls_load(path of _ssl) finds OpenSSL (tls.c), and
 *                              tls_held(sslsock) -> (ciphertext read, not yet
 *                              decrypted; records written, not yet sent) in its BIOs
 *
 * on_end(token, bytes_up, bytes_down) is called exactly once per tunnel,
 * from whichever of these methods saw it end (so possibly from close()
 * itself). An exception it raises propagates out of that method once every
 * pending ending has been reported.
 *
 * The head phase (handshake.c; relay/native/front.py is its Python side):
 *   .handshakes(front, max_head, head_timeout, connect_timeout, proto)
 *   .listen(fd), .set_origins([[(host, port), ...], ...]), .balance(...),
 *   .hs_fileno(), .poll_handshakes(), .expire(), .accepting = bool
 *   front.on_head(id, req | None, ip)            -> must connect, refuse or detach
 *       .connect(id, order, req, request_id | None, trusted, token[, timeout[, accept]])
 *                   request_id None: a new one, made in C
 *                   accept: True (from req's Sec-WebSocket-Key, ws_accept.c) or the value a 101 must carry
 *                                                     forward_head in C, origins in order
 *   front.on_upgrade(id, token, origin, attempts, connect_s)  (optional) a 101 that carries accept,
 *       checked in C; connect_s: connect_time(id), taken
 *       -> .splice(id, tunnel_token), refuse or detach
 *       .refuse(id, answer)                           write, half-close, linger
 *       .detach(id) -> (client_fd, origin_fd, client_bytes, origin_bytes)
 *   front.on_response(id, token, resp | (status, reason, outcome), origin, attempts)
 *       -> .splice(id, tunnel_token) (the pump), .skip(id, n) (an interim 1xx), refuse or detach
 *   front.on_failed(id, token, origin, attempts), front.on_timeout(id, token, origin, attempts)
 *       -> refuse (or detach)
 *   front.on_head_timeout(id, bytes_read, ip)    (closed after it)
 * req/resp are _heads.c's views; attempts are the failed origin attempts,
 * ((origin, kind, errno), ...) or None. A callback that leaves its
 * connection undecided makes poll_handshakes() raise, and the connection
 * is closed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include <arpa/inet.h>
#include <errno.h>
#include <time.h>
#include <sys/uio.h>
#include <sys/random.h>
#include <sys/socket.h>

#include "_heads.h"
#include "access_log.h"
#include "engine.h"
#include "fast_path.h"
#include "handshake.h"
#include "tls.h"
#include "ws_accept.h"

#define NCALLBACKS 5
#define CB_UPGRADE NCALLBACKS /* optional: front.on_upgrade */

typedef struct EngineObject {
    PyObject_HEAD
    engine e;
    PyObject *on_end;
    int ready;
    const char *why; /* why io_uring was not used, when it was asked for */
    handshaker hs;   /* the head phase (handshake.c), once handshakes() was called */
    int hs_ready;
    PyObject *cb[NCALLBACKS + 1]; /* the front's bound methods (CALLBACKS), then on_upgrade or NULL */
    PyObject *proto;          /* X-Forwarded-Proto */
    PyObject *wrap_bio;       /* TLS listeners: the default ssl.SSLContext's _wrap_bio, and the two */
    PyObject *tls_bios[2];    /* MemoryBIOs it is given (replaced by the socket at once: shared by all) */
    Py_buffer tls_metrics;    /* wsrelay_tls_handshakes_total's counts in the worker's slot (tls_server()) */
    PyObject *last_ip;        /* the last client address, as a str */
    struct sockaddr_storage last_peer;
    socklen_t last_peerlen;
    Py_buffer bal_bufs[65];  /* this worker's slot, then its siblings' (accept balancing) */
    int nbal;
    uint64_t rng[2];         /* xorshift128+ state for request ids (seeded from getrandom) */
    /* the fast path (fast_path.h; fast_path() installs it): its tables, the
     * shared memory they point into, the strings of its rules, and
     * front.on_adopt, which takes over a connection it decided */
    fp_table fp;
    Py_buffer fp_bufs[8];
    int nfp;
    PyObject *fp_keep;
    PyObject *fp_router;     /* the fast path's routes (relay/native/fast_path.py), or NULL: one pool */
    PyObject *cb_adopt;
    /* wss:// on the fast path: the engine that relays TLS tunnels (self on
     * epoll; a second one on io_uring, engine.c "TLS tunnels"), which counts
     * their ends into this engine's table (its fp_count, and fp_owner: this one) */
    struct EngineObject *fp_tls;
    fp_table *fp_count;       /* where this engine's tagged tunnels are counted: &fp, or its owner's */
    PyObject *fp_owner;
} EngineObject;

/* A new X-Request-ID: 32 hex digits, 128 bits from a seeded PRNG, as
 * relay/logs.py's new_request_id and nginx's $request_id (ids need to be
 * unique, not secret: no syscall per request). */
static void new_request_id(EngineObject *self, char out[32]) {
    static const char HEX[] = "0123456789abcdef";
    for (int half = 0; half < 2; half++) {
        uint64_t x = self->rng[0], y = self->rng[1];
        self->rng[0] = y;
        x ^= x << 23;
        self->rng[1] = x ^ y ^ (x >> 17) ^ (y >> 26);
        uint64_t v = self->rng[1] + y;
        for (int i = 15; i >= 0; i--, v >>= 4)
            out[half * 16 + i] = HEX[v & 15];
    }
}

static void fast_log_line(al_record *r, double duration_s, uint64_t up, uint64_t down);

/* Report every ended tunnel; returns 0, or -1 with the first callback error set. */
static int report_ended(EngineObject *self) {
    PyObject *et = NULL, *ev = NULL, *tb = NULL;
    uint32_t slot;
    while ((slot = eng_pop_ended(&self->e)) != ENG_NONE) {
        eng_tunnel *t = &self->e.t[slot];
        PyObject *token = (PyObject *)t->token;
        unsigned long long up = t->s[0].nbytes, down = t->s[1].nbytes;
        int carrier = eng_is_carrier(&self->e, slot); /* a TLS offload's: the owner counts it, not on_end */
        uint32_t tag = t->tag;
        double born = t->born;
        al_record *log = t->log;
        t->log = NULL; /* freed below, once written */
        eng_release(&self->e, slot);
        if (tag) { /* the fast path's: counted, given back and logged here, Python not called */
            double duration = fp_now() - born;
            fp_ended(self->fp_count ? self->fp_count : &self->fp, tag - 1, duration, up, down);
            if (log) {
                fast_log_line(log, duration, up, down);
                free(log);
            }
            Py_XDECREF(token); /* a wss:// tunnel's: its SSL's owner, after the pump let go of the SSL */
            continue;
        }
        if (self->on_end != Py_None && !carrier) {
            PyObject *r = PyObject_CallFunction(self->on_end, "OKK", token, up, down);
            if (r == NULL) {
                if (et == NULL)
                    PyErr_Fetch(&et, &ev, &tb);
                else
                    PyErr_WriteUnraisable(self->on_end);
            }
            Py_XDECREF(r);
        }
        Py_XDECREF(token);
    }
    if (et != NULL) {
        PyErr_Restore(et, ev, tb);
        return -1;
    }
    return 0;
}

/* The end of every call that opens a tunnel: its id, or the error eng_open*
 * gave (the token given back); tunnels that ended meanwhile are reported. */
static PyObject *opened(EngineObject *self, int64_t id, PyObject *token) {
    if (id < 0) {
        Py_DECREF(token);
        errno = (int)-id;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (report_ended(self) < 0)
        return NULL;
    return PyLong_FromLongLong(id);
}

static int Engine_init(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"read_size", "on_end", "backend", NULL};
    Py_ssize_t read_size = 256 * 1024;
    PyObject *on_end = Py_None;
    const char *backend = "io_uring";
    if (self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Engine already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|nOs", kwlist, &read_size, &on_end, &backend))
        return -1;
    int want;
    if (strcmp(backend, "io_uring") == 0)
        want = ENG_URING;
    else if (strcmp(backend, "epoll") == 0)
        want = ENG_EPOLL;
    else {
        PyErr_SetString(PyExc_ValueError, "backend must be 'io_uring' or 'epoll'");
        return -1;
    }
    if (read_size < 1024 || read_size > (1 << 26)) {
        PyErr_SetString(PyExc_ValueError, "read_size must be within 1 KiB .. 64 MiB");
        return -1;
    }
    if (on_end != Py_None && !PyCallable_Check(on_end)) {
        PyErr_SetString(PyExc_TypeError, "on_end must be callable");
        return -1;
    }
    int r = eng_init(&self->e, (size_t)read_size, want, &self->why);
    if (r < 0) {
        errno = -r;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    Py_INCREF(on_end);
    self->on_end = on_end;
    self->ready = 1;
    return 0;
}

static void Engine_dealloc(EngineObject *self) {
    if (self->hs_ready)
        hs_free(&self->hs);
    for (int k = 0; k < self->nbal; k++)
        PyBuffer_Release(&self->bal_bufs[k]);
    for (int k = 0; k <= NCALLBACKS; k++)
        Py_XDECREF(self->cb[k]);
    Py_XDECREF(self->proto);
    Py_XDECREF(self->wrap_bio);
    if (self->tls_metrics.obj)
        PyBuffer_Release(&self->tls_metrics);
    Py_XDECREF(self->tls_bios[0]);
    Py_XDECREF(self->tls_bios[1]);
    Py_XDECREF(self->last_ip);
    for (int k = 0; k < self->nfp; k++)
        PyBuffer_Release(&self->fp_bufs[k]);
    Py_XDECREF(self->fp_keep);
    Py_XDECREF(self->cb_adopt);
    if (self->fp_tls != self)
        Py_XDECREF((PyObject *)self->fp_tls);
    Py_XDECREF(self->fp_owner);
    if (self->ready) {
        eng_tls_detach_all(&self->e); /* before the tokens, which hold the SSLs, go */
        for (uint32_t slot = 0; slot < self->e.cap; slot++)
            if (self->e.t[slot].flags & 0x01 /* T_USED */) {
                Py_XDECREF((PyObject *)self->e.t[slot].token);
                free(self->e.t[slot].log); /* a fast-path tunnel's line, never written: it did not end */
            }
        eng_free(&self->e);
    }
    Py_XDECREF(self->on_end);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define CHECK_READY(self)                                                    \
    if (!(self)->ready) {                                                    \
        PyErr_SetString(PyExc_RuntimeError, "Engine is not initialised"); \
        return NULL;                                                         \
    }

static PyObject *Engine_fileno(EngineObject *self, PyObject *Py_UNUSED(ignored)) {
    CHECK_READY(self);
    return PyLong_FromLong(self->e.epfd);
}

static PyObject *Engine_poll(EngineObject *self, PyObject *args) {
    int maxevents = 256;
    CHECK_READY(self);
    if (!PyArg_ParseTuple(args, "|i", &maxevents))
        return NULL;
    int n = eng_poll(&self->e, maxevents);
    if (report_ended(self) < 0)
        return NULL;
    if (n < 0) {
        errno = -n;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(n);
}

static PyObject *Engine_tunnel(EngineObject *self, PyObject *args) {
    int cfd, ofd;
    Py_buffer tc, to;
    PyObject *token;
    CHECK_READY(self);
    if (!PyArg_ParseTuple(args, "iiy*y*O", &cfd, &ofd, &tc, &to, &token))
        return NULL;
    if (self->e.backend == ENG_URING) {
        /* io_uring learns of a bad descriptor only at its first request: check now, so
         * that as with epoll the caller keeps what the engine refused (splice() skips
         * this: its sockets are the engine's own) */
        int type;
        socklen_t len = sizeof type;
        if (getsockopt(cfd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 ||
            getsockopt(ofd, SOL_SOCKET, SO_TYPE, &type, &len) < 0) {
            PyBuffer_Release(&tc);
            PyBuffer_Release(&to);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    Py_INCREF(token);
    eng_clock(&self->e);
    int64_t id = eng_open(&self->e, cfd, ofd, tc.buf, (size_t)tc.len, to.buf, (size_t)to.len, token);
    if (id >= 0)
        eng_flush(&self->e);
    PyBuffer_Release(&tc);
    PyBuffer_Release(&to);
    return opened(self, id, token);
}

/* -- TLS tunnels (engine.c "TLS tunnels", tls.c) ---------------------------------- */

/* _ssl's PySSLSocket and PySSLContext as CPython 3.7 to 3.13 lay them out:
 * the SSL is the second field, the context object the third. ssl_of()
 * checks that against what the object says of itself before trusting it. */
typedef struct {
    PyObject_HEAD
    PyObject *socket;
    SSL *ssl;
    PyObject *ctx;
} py_ssl_socket;

typedef struct {
    PyObject_HEAD
    void *ctx;
} py_ssl_context;

static SSL *ssl_of(PyObject *obj) {
    if (tls_bio_method == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "relay.native._engine.tls_load() has not succeeded");
        return NULL;
    }
    if (strcmp(Py_TYPE(obj)->tp_name, "_ssl._SSLSocket") != 0) {
        PyErr_Format(PyExc_TypeError, "expected an _ssl._SSLSocket, not %s", Py_TYPE(obj)->tp_name);
        return NULL;
    }
    py_ssl_socket *s = (py_ssl_socket *)obj;
    PyObject *ctx = PyObject_GetAttrString(obj, "context");
    if (ctx == NULL)
        return NULL;
    int same = ctx == s->ctx && s->ssl != NULL && tls.SSL_get_SSL_CTX(s->ssl) == ((py_ssl_context *)ctx)->ctx;
    Py_DECREF(ctx);
    if (!same) {
        PyErr_SetString(PyExc_TypeError, "this Python's _ssl._SSLSocket is laid out differently from what it knows");
        return NULL;
    }
    return s->ssl;
}

static PyObject *tls_load_py(PyObject *Py_UNUSED(m), PyObject *arg) {
    const char *path = NULL, *why = NULL;
    if (arg != Py_None && (path = PyUnicode_AsUTF8(arg)) == NULL)
        return NULL;
    if (tls_load(path, &why) < 0) {
        PyErr_SetString(PyExc_OSError, why);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *tls_held(PyObject *Py_UNUSED(m), PyObject *arg) {
    SSL *ssl = ssl_of(arg);
    if (ssl == NULL)
        return NULL;
    BIO *r = tls.SSL_get_rbio(ssl), *w = tls.SSL_get_wbio(ssl);
    return Py_BuildValue("ll", r ? tls.BIO_ctrl(r, 10 /* BIO_CTRL_PENDING */, 0, NULL) : 0L,
                         w ? tls.BIO_ctrl(w, 10, 0, NULL) : 0L);
}

static PyObject *Engine_tls_tunnel(EngineObject *self, PyObject *args) {
    int cfd, ofd;
    Py_buffer tc, to;
    PyObject *token, *sslsock;
    CHECK_READY(self);
    if (!PyArg_ParseTuple(args, "iiy*y*OO", &cfd, &ofd, &tc, &to, &token, &sslsock))
        return NULL;
    SSL *ssl = ssl_of(sslsock);
    if (ssl == NULL) {
        PyBuffer_Release(&tc);
        PyBuffer_Release(&to);
        return NULL;
    }
    Py_INCREF(token);
    eng_clock(&self->e);
    int64_t id = eng_open_tls(&self->e, cfd, ofd, ssl, tc.buf, (size_t)tc.len, to.buf, (size_t)to.len, token);
    PyBuffer_Release(&tc);
    PyBuffer_Release(&to);
    return opened(self, id, token);
}

typedef int (*id_op)(engine *, int64_t);

static PyObject *by_id(EngineObject *self, PyObject *arg, id_op op) {
    CHECK_READY(self);
    long long id = PyLong_AsLongLong(arg);
    if (id == -1 && PyErr_Occurred())
        return NULL;
    int r = op(&self->e, id);
    eng_flush(&self->e);
    if (report_ended(self) < 0)
        return NULL;
    return PyBool_FromLong(r);
}

static PyObject *Engine_close(EngineObject *self, PyObject *arg) { return by_id(self, arg, eng_close); }
static PyObject *Engine_abort(EngineObject *self, PyObject *arg) { return by_id(self, arg, eng_abort); }

static PyObject *all_of(EngineObject *self, id_op op) {
    CHECK_READY(self);
    long n = 0;
    for (uint32_t slot = 0; slot < self->e.cap; slot++)
        if (eng_get(&self->e, eng_id(&self->e, slot)))
            n += op(&self->e, eng_id(&self->e, slot));
    eng_flush(&self->e);
    if (report_ended(self) < 0)
        return NULL;
    return PyLong_FromLong(n);
}

static PyObject *Engine_close_all(EngineObject *self, PyObject *Py_UNUSED(i)) { return all_of(self, eng_close); }
static PyObject *Engine_abort_all(EngineObject *self, PyObject *Py_UNUSED(i)) { return all_of(self, eng_abort); }

static PyObject *Engine_close_idle(EngineObject *self, PyObject *arg) {
    CHECK_READY(self);
    double seconds = PyFloat_AsDouble(arg);
    if (seconds == -1.0 && PyErr_Occurred())
        return NULL;
    int n = eng_close_idle(&self->e, (int64_t)(seconds * 1000.0));
    eng_flush(&self->e);
    if (report_ended(self) < 0)
        return NULL;
    return PyLong_FromLong(n);
}

static eng_tunnel *lookup(EngineObject *self, PyObject *arg) {
    long long id = PyLong_AsLongLong(arg);
    if (id == -1 && PyErr_Occurred())
        return NULL;
    return eng_get(&self->e, id);
}

static PyObject *Engine_bytes(EngineObject *self, PyObject *arg) {
    CHECK_READY(self);
    eng_tunnel *t = lookup(self, arg);
    if (t == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    return Py_BuildValue("KK", (unsigned long long)t->s[0].nbytes, (unsigned long long)t->s[1].nbytes);
}

static PyObject *Engine_idle(EngineObject *self, PyObject *arg) {
    CHECK_READY(self);
    eng_tunnel *t = lookup(self, arg);
    if (t == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    eng_clock(&self->e);
    return PyFloat_FromDouble((double)(self->e.now_ms - t->last_active_ms) / 1000.0);
}

static PyObject *Engine_get_totals(EngineObject *self, void *Py_UNUSED(c)) {
    CHECK_READY(self);
    return Py_BuildValue("KK", (unsigned long long)self->e.total[0], (unsigned long long)self->e.total[1]);
}

static PyObject *Engine_get_spliced(EngineObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromUnsignedLongLong(self->e.spliced);
}

static PyObject *Engine_get_open_bytes(EngineObject *self, void *Py_UNUSED(c)) {
    CHECK_READY(self);
    engine *e = &self->e;
    return Py_BuildValue("KK", (unsigned long long)(e->total[0] - e->ended_bytes[0]),
                         (unsigned long long)(e->total[1] - e->ended_bytes[1]));
}

static PyObject *Engine_get_backend(EngineObject *self, void *Py_UNUSED(c)) {
    CHECK_READY(self);
    return PyUnicode_FromString(self->e.backend == ENG_URING ? "io_uring" : "epoll");
}

static PyObject *Engine_get_why(EngineObject *self, void *Py_UNUSED(c)) {
    CHECK_READY(self);
    if (self->why == NULL)
        Py_RETURN_NONE;
    return PyUnicode_FromString(self->why);
}

static PyObject *Engine_get_open(EngineObject *self, void *Py_UNUSED(c)) {
    CHECK_READY(self);
    return PyLong_FromUnsignedLong(self->e.open);
}

/* -- the head phase (handshake.c) ------------------------------------------------ */

#define CHECK_HS(self)                                                                    \
    CHECK_READY(self);                                                                    \
    if (!(self)->hs_ready) {                                                              \
        PyErr_SetString(PyExc_RuntimeError, "handshakes() was not called on this Engine"); \
        return NULL;                                                                      \
    }

static void release_token(void *token) { Py_DECREF((PyObject *)token); }

static const char *CALLBACKS[NCALLBACKS] = {"on_head", "on_response", "on_failed", "on_timeout",
                                            "on_head_timeout"};

static PyObject *Engine_handshakes(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"front", "max_head", "head_timeout", "connect_timeout", "proto", NULL};
    PyObject *front;
    unsigned int max_head = 16384;
    double head_timeout = 10.0, connect_timeout = 5.0;
    const char *proto = "http";
    Py_ssize_t proto_len = 4;
    CHECK_READY(self);
    if (self->hs_ready) {
        PyErr_SetString(PyExc_RuntimeError, "handshakes() already called");
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|Iddy#", kwlist, &front, &max_head, &head_timeout,
                                     &connect_timeout, &proto, &proto_len))
        return NULL;
    PyObject *cb[NCALLBACKS];
    for (int k = 0; k < NCALLBACKS; k++) {
        cb[k] = PyObject_GetAttrString(front, CALLBACKS[k]);
        if (!cb[k] || !PyCallable_Check(cb[k])) {
            if (cb[k])
                PyErr_Format(PyExc_TypeError, "front.%s must be callable", CALLBACKS[k]);
            for (int j = 0; j <= k; j++)
                Py_XDECREF(cb[j]);
            return NULL;
        }
    }
    self->proto = PyBytes_FromStringAndSize(proto, proto_len);
    if (!self->proto) {
        for (int k = 0; k < NCALLBACKS; k++)
            Py_DECREF(cb[k]);
        return NULL;
    }
    int r = hs_init(&self->hs, max_head, head_timeout, connect_timeout);
    if (r < 0) {
        for (int k = 0; k < NCALLBACKS; k++)
            Py_DECREF(cb[k]);
        errno = -r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->hs.release = release_token;
    memcpy(self->cb, cb, sizeof cb);
    /* optional: without it, connect() takes no accept and every answer comes as a view */
    self->cb[CB_UPGRADE] = PyObject_GetAttrString(front, "on_upgrade");
    if (!self->cb[CB_UPGRADE])
        PyErr_Clear();
    /* request ids: seeded per process (a worker's engine is made after the fork) */
    if (getrandom(self->rng, sizeof self->rng, 0) != (ssize_t)sizeof self->rng || !(self->rng[0] | self->rng[1])) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        self->rng[0] = (uint64_t)ts.tv_nsec * 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid();
        self->rng[1] = (uint64_t)ts.tv_sec ^ 0xD1B54A32D192ED03ull;
    }
    self->hs_ready = 1;
    Py_RETURN_NONE;
}

static EngineObject *tls_engine_of(EngineObject *self, PyObject *other);

/* A fast-path connection closed before it was decided (a drain's end, the
 * engine freed): what fp_decide took goes back. */
static void release_fast(handshaker *h, hs_conn *c) {
    EngineObject *self = h->fast_owner;
    fp_give_back(&self->fp, c->fast_member);
}

/* One writable buffer of the fast path's shared memory, kept for the engine's life. */
static void *fp_buffer(EngineObject *self, PyObject *obj, size_t item, Py_ssize_t *n) {
    if (self->nfp >= (int)(sizeof self->fp_bufs / sizeof self->fp_bufs[0])) {
        PyErr_SetString(PyExc_ValueError, "fast_path(): too many buffers");
        return NULL;
    }
    Py_buffer *b = &self->fp_bufs[self->nfp];
    if (PyObject_GetBuffer(obj, b, PyBUF_WRITABLE) < 0)
        return NULL;
    self->nfp++;
    if (((uintptr_t)b->buf & 7) || b->len % (Py_ssize_t)item) {
        PyErr_SetString(PyExc_ValueError, "fast_path(): a buffer is misaligned");
        return NULL;
    }
    *n = b->len / (Py_ssize_t)item;
    return b->buf;
}

static int fp_strings(PyObject *seq, fp_str *out, uint32_t *n, const char *what) {
    Py_ssize_t k = PyTuple_GET_SIZE(seq);
    if (k > FP_MAX_RULES) {
        PyErr_Format(PyExc_ValueError, "fast_path(): more than %d %s", FP_MAX_RULES, what);
        return -1;
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *b = PyTuple_GET_ITEM(seq, i);
        if (!PyBytes_Check(b) || !PyBytes_GET_SIZE(b)) {
            PyErr_Format(PyExc_TypeError, "fast_path(): %s are non-empty bytes", what);
            return -1;
        }
        out[i].s = PyBytes_AS_STRING(b);
        out[i].n = (uint32_t)PyBytes_GET_SIZE(b);
    }
    *n = (uint32_t)k;
    return 0;
}

/* The path table (paths () = every path) and a pool's Origin table (origins None = any, else a tuple). */
static int fp_rules(fp_table *t, fp_pool *p, PyObject *paths, PyObject *origins) {
    t->any_path = PyTuple_GET_SIZE(paths) == 0;
    p->any_origin = origins == Py_None;
    if (!p->any_origin && !PyTuple_Check(origins)) {
        PyErr_SetString(PyExc_TypeError, "fast_path(): origins is a tuple or None (any)");
        return -1;
    }
    if (fp_strings(paths, t->paths, &t->npaths, "paths") < 0 ||
        (!p->any_origin && fp_strings(origins, p->origins, &p->norigins, "origins") < 0))
        return -1;
    return 0;
}

static int fp_bounds(PyObject *seq, double *out, uint32_t *n) {
    Py_ssize_t k = PyTuple_GET_SIZE(seq);
    if (k > FP_MAX_BUCKETS) {
        PyErr_SetString(PyExc_ValueError, "fast_path(): too many buckets");
        return -1;
    }
    for (Py_ssize_t i = 0; i < k; i++)
        if ((out[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(seq, i))) == -1.0 && PyErr_Occurred())
            return -1;
    *n = (uint32_t)k;
    return 0;
}

/* access: (worker, (each pool's name, ...), (each member's name, ...)), bytes
 * kept alive by fp_keep: the access log's fields that do not change (access_log.h). */
static int fp_access(fp_table *t, PyObject *access, Py_ssize_t nmembers) {
    PyObject *names, *pools;
    if (!PyArg_ParseTuple(access, "iO!O!", &t->log_worker, &PyTuple_Type, &pools, &PyTuple_Type, &names))
        return -1;
    if (PyTuple_GET_SIZE(names) != nmembers || PyTuple_GET_SIZE(pools) != t->npools) {
        PyErr_SetString(PyExc_ValueError, "fast_path(): access names each pool and each member");
        return -1;
    }
    for (uint32_t i = 0; i < t->npools; i++) {
        PyObject *b = PyTuple_GET_ITEM(pools, i);
        if (!PyBytes_Check(b)) {
            PyErr_SetString(PyExc_TypeError, "fast_path(): pool names are bytes");
            return -1;
        }
        t->pools[i].log_name = (fp_str){PyBytes_AS_STRING(b), (uint32_t)PyBytes_GET_SIZE(b)};
    }
    for (Py_ssize_t i = 0; i < nmembers; i++) {
        PyObject *b = PyTuple_GET_ITEM(names, i);
        if (!PyBytes_Check(b)) {
            PyErr_SetString(PyExc_TypeError, "fast_path(): origin names are bytes");
            return -1;
        }
        t->log_names[i] = (fp_str){PyBytes_AS_STRING(b), (uint32_t)PyBytes_GET_SIZE(b)};
    }
    t->log = 1;
    return 0;
}

/* fast_path(...): see relay/native/fast_path.py, which computes every
 * argument from the worker's context; offsets are checked against the
 * buffers they index. Installed once, before the first accept. */
static PyObject *Engine_fast_path(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"on_adopt", "metrics", "counts", "buckets", "clients", "slot", "header", "in_use",
                             "conns", "state", "connect", "pools", "health", "paths", "tls_engine", "trusted",
                             "access", "router", NULL};
    PyObject *on_adopt, *metrics, *counts, *buckets, *clients, *header, *in_use, *conns, *state, *connect, *pools;
    PyObject *health, *paths, *tls_engine = Py_None, *trusted = NULL, *access = Py_None, *router = Py_None;
    unsigned int slot;
    CHECK_HS(self);
    if (self->fp.on || self->nfp) {
        PyErr_SetString(PyExc_RuntimeError, "fast_path() already called");
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO!O!OIOOOOOO!O!O!|OO!OO", kwlist, &on_adopt, &metrics,
                                     &PyTuple_Type, &counts, &PyTuple_Type, &buckets, &clients, &slot, &header,
                                     &in_use, &conns, &state, &connect, &PyTuple_Type, &pools, &PyTuple_Type,
                                     &health, &PyTuple_Type, &paths, &tls_engine, &PyTuple_Type, &trusted, &access,
                                     &router))
        return NULL;
    if (router != Py_None && !PyCallable_Check(router)) {
        PyErr_SetString(PyExc_TypeError, "fast_path(): router is callable or None");
        return NULL;
    }
    fp_table *t = &self->fp;
    memset(t, 0, sizeof *t);
    Py_ssize_t nm, nc, nh, nu, nco, ns, nx;
    int64_t *conns_base;
    double *state_base, *connect_base;
    if (!(t->m = fp_buffer(self, metrics, 8, &nm)) || !(t->clients = fp_buffer(self, clients, 8, &nc)) ||
        !(t->limit = fp_buffer(self, header, 8, &nh)) || !(t->in_use = fp_buffer(self, in_use, 8, &nu)) ||
        !(conns_base = fp_buffer(self, conns, 8, &nco)) || !(state_base = fp_buffer(self, state, 8, &ns)) ||
        !(connect_base = fp_buffer(self, connect, 8, &nx)))
        goto fail;
    t->nclients = (uint32_t)nc;
    t->slot = slot;
    if (slot >= nc || nh < 1 || nu < 1) {
        PyErr_SetString(PyExc_ValueError, "fast_path(): slot or header out of range");
        goto fail;
    }
    if (!PyArg_ParseTuple(counts, "IIIII", &t->upgraded, &t->http101, &t->handshake, &t->duration, &t->connections) ||
        !PyArg_ParseTuple(health, "IIII", &t->o_check, &t->o_check_since, &t->o_down_until, &t->o_ejected))
        goto fail;
    PyObject *hb, *db, *cb;
    if (!PyArg_ParseTuple(buckets, "O!O!O!", &PyTuple_Type, &hb, &PyTuple_Type, &db, &PyTuple_Type, &cb) ||
        fp_bounds(hb, t->hs_buckets, &t->nhs) < 0 || fp_bounds(db, t->dur_buckets, &t->ndur) < 0 ||
        fp_bounds(cb, t->connect_buckets, &t->nconnect) < 0)
        goto fail;
    if (t->upgraded >= nm || t->http101 >= nm || t->connections >= nm || t->handshake + t->nhs + 2 > nm ||
        t->duration + t->ndur + 2 > nm) {
        PyErr_SetString(PyExc_ValueError, "fast_path(): a count is outside the metrics slot");
        goto fail;
    }
    /* pools: ((members, origins, slowstart, connect timeout), ...); members:
     * ((origin, row, cell, state, hist), ...), one flat table for all pools */
    Py_ssize_t np = PyTuple_GET_SIZE(pools);
    if (np < 1 || np > FP_MAX_POOLS) {
        PyErr_SetString(PyExc_ValueError, "fast_path(): 1 to 16 pools");
        goto fail;
    }
    uint32_t health_end = t->o_check;
    if (t->o_check_since > health_end) health_end = t->o_check_since;
    if (t->o_down_until > health_end) health_end = t->o_down_until;
    if (t->o_ejected > health_end) health_end = t->o_ejected;
    Py_ssize_t k = 0;
    for (Py_ssize_t j = 0; j < np; j++) {
        PyObject *members, *origins;
        double slowstart, connect_timeout;
        fp_pool *p = &t->pools[j];
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(pools, j), "O!Odd", &PyTuple_Type, &members, &origins, &slowstart,
                              &connect_timeout))
            goto fail;
        Py_ssize_t n = PyTuple_GET_SIZE(members);
        if (n < 1 || k + n > FP_MAX_MEMBERS) {
            PyErr_SetString(PyExc_ValueError, "fast_path(): 1 or more members a pool, 64 in all");
            goto fail;
        }
        p->first = (uint32_t)k;
        p->n = (uint32_t)n;
        p->slowstart = slowstart;
        p->connect_timeout_ms = (int64_t)(connect_timeout * 1000);
        for (Py_ssize_t i = 0; i < n; i++, k++) {
            unsigned int origin, row, cell, st, hist;
            if (!PyArg_ParseTuple(PyTuple_GET_ITEM(members, i), "IIIII", &origin, &row, &cell, &st, &hist))
                goto fail;
            /* a row holds every worker slot: in_use of them are read */
            if (cell < row || cell >= (unsigned)nco || row + (unsigned)*t->in_use > (unsigned)nco ||
                st + health_end >= (unsigned)ns || hist + t->nconnect + 2 > (unsigned)nx) {
                PyErr_SetString(PyExc_ValueError, "fast_path(): a member is outside the origin table");
                goto fail;
            }
            t->members[k] = (fp_member){origin, conns_base + row, cell - row, state_base + st, connect_base + hist,
                                        (uint32_t)j};
        }
        if (fp_rules(t, p, paths, origins) < 0)
            goto fail;
    }
    t->nmembers = (uint32_t)k;
    t->npools = (uint32_t)np;
    self->fp_keep = Py_BuildValue("(OOOO)", paths, pools, access, router);
    if (!self->fp_keep)
        goto fail;
    self->fp_router = router == Py_None ? NULL : router; /* borrowed: fp_keep holds it */
    if (access != Py_None && fp_access(t, access, k) < 0)
        goto fail;
    if (trusted) { /* ((network, mask), ...), 16 bytes each */
        Py_ssize_t nt = PyTuple_GET_SIZE(trusted);
        if (nt > FP_MAX_RULES) {
            PyErr_SetString(PyExc_ValueError, "fast_path(): too many trusted networks");
            goto fail;
        }
        for (Py_ssize_t i = 0; i < nt; i++) {
            const char *net, *mask;
            Py_ssize_t nn, nmk;
            if (!PyArg_ParseTuple(PyTuple_GET_ITEM(trusted, i), "y#y#", &net, &nn, &mask, &nmk))
                goto fail;
            if (nn != 16 || nmk != 16) {
                PyErr_SetString(PyExc_ValueError, "fast_path(): a trusted network is 16 bytes and a mask");
                goto fail;
            }
            memcpy(t->trusted[i][0], net, 16);
            memcpy(t->trusted[i][1], mask, 16);
        }
        t->ntrusted = (uint32_t)nt;
    }
    if (tls_engine != Py_None) { /* wss:// too: its tunnels counted here when they end there */
        EngineObject *te = tls_engine_of(self, tls_engine);
        if (!te)
            goto fail;
        if (te->e.backend != ENG_EPOLL || (te != self && te->fp_count)) {
            PyErr_SetString(PyExc_ValueError, "fast_path(): tls_engine is an epoll Engine of its own");
            goto fail;
        }
        self->fp_tls = te;
        if (te != self) {
            Py_INCREF(te);
            te->fp_count = &self->fp;
            te->fp_owner = Py_NewRef((PyObject *)self);
        }
    }
    Py_XSETREF(self->cb_adopt, Py_NewRef(on_adopt));
    self->hs.release_fast = release_fast;
    self->hs.fast_owner = self;
    t->on = 1;
    Py_RETURN_NONE;
fail:
    for (int j = 0; j < self->nfp; j++)
        PyBuffer_Release(&self->fp_bufs[j]);
    self->nfp = 0;
    Py_CLEAR(self->fp_keep);
    self->fp_router = NULL;
    memset(t, 0, sizeof *t);
    return NULL;
}

static PyObject *Engine_get_fast_path_stats(EngineObject *self, void *Py_UNUSED(c)) {
    fp_table *t = &self->fp;
    return Py_BuildValue("{sOsKsKsKsKsIs(KK)}", "on", t->on ? Py_True : Py_False, "decided",
                         (unsigned long long)t->decided, "upgraded", (unsigned long long)t->upgraded_n, "adopted",
                         (unsigned long long)t->adopted, "declined", (unsigned long long)t->declined, "open", t->open,
                         "ended_bytes", (unsigned long long)t->ended_bytes[0], (unsigned long long)t->ended_bytes[1]);
}

/* close() every fast-path tunnel (the end of a drain): -> how many */
static PyObject *Engine_close_fast(EngineObject *self, PyObject *Py_UNUSED(i)) {
    CHECK_READY(self);
    int n = 0;
    for (uint32_t slot = 0; slot < self->e.cap; slot++)
        if (self->e.t[slot].tag && eng_close(&self->e, eng_id(&self->e, slot)))
            n++;
    if (report_ended(self) < 0)
        return NULL;
    return PyLong_FromLong(n);
}

/* -- TLS listeners (handshake.c "TLS") ------------------------------------------------- */

static SSL *ssl_of(PyObject *obj);

/* A TLS connection's SSL: Python's ssl module makes it (_wrap_bio: the
 * listener's certificates, SNI callback, ticket keys and profile, the same
 * as the Python plane's), kept alive by the connection (tls_token); its
 * handshake then runs here on the socket. */
static int new_tls(handshaker *h, hs_conn *c) {
    EngineObject *self = (EngineObject *)((char *)h - offsetof(EngineObject, hs));
    PyObject *sock = PyObject_CallFunctionObjArgs(self->wrap_bio, self->tls_bios[0], self->tls_bios[1], Py_True, NULL);
    SSL *ssl = sock ? ssl_of(sock) : NULL;
    if (ssl == NULL || tls.SSL_set_fd(ssl, c->cfd) != 1) {
        if (PyErr_Occurred())
            PyErr_WriteUnraisable(self->wrap_bio);
        Py_XDECREF(sock);
        return -1;
    }
    /* read what the socket holds at once, not a record header then its body:
     * a handshake's flights and the head in a read or two (what SSL holds
     * beyond the head is decrypted by the pump first, engine.c tls_up) */
    tls.SSL_set_read_ahead(ssl, 1);
    c->ssl = ssl;
    c->tls_token = sock;
    return 0;
}

static PyObject *Engine_tls_server(EngineObject *self, PyObject *args) {
    PyObject *context, *reasons, *metrics = Py_None;
    unsigned int shift;
    unsigned long mask;
    CHECK_HS(self);
    if (!PyArg_ParseTuple(args, "OOIk|O", &context, &reasons, &shift, &mask, &metrics))
        return NULL;
    if (self->wrap_bio) {
        PyErr_SetString(PyExc_RuntimeError, "tls_server() already called");
        return NULL;
    }
    if (tls_bio_method == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "relay.native._engine.tls_load() has not succeeded");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(reasons, "tls_server(): reasons must be a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > HS_TLS_REASONS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "tls_server(): too many reasons");
        return NULL;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        unsigned int lib, reason, outcome;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, k), "III", &lib, &reason, &outcome)) {
            Py_DECREF(seq);
            return NULL;
        }
        if (outcome >= HT_N) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "tls_server(): outcome index out of range");
            return NULL;
        }
        self->hs.tls_reasons[k] = (hs_tls_reason){lib, reason, outcome};
    }
    Py_DECREF(seq);
    PyObject *wrap = PyObject_GetAttrString(context, "_wrap_bio");
    PyObject *bio = PyImport_ImportModule("ssl");
    PyObject *cls = bio ? PyObject_GetAttrString(bio, "MemoryBIO") : NULL;
    Py_XDECREF(bio);
    PyObject *in = cls ? PyObject_CallNoArgs(cls) : NULL, *out = cls ? PyObject_CallNoArgs(cls) : NULL;
    Py_XDECREF(cls);
    if (!wrap || !in || !out) {
        Py_XDECREF(wrap);
        Py_XDECREF(in);
        Py_XDECREF(out);
        return NULL;
    }
    if (metrics != Py_None) {
        if (PyObject_GetBuffer(metrics, &self->tls_metrics, PyBUF_WRITABLE) < 0) {
            Py_DECREF(wrap);
            Py_DECREF(in);
            Py_DECREF(out);
            return NULL;
        }
        if ((size_t)self->tls_metrics.len < HT_N * sizeof(double)) {
            PyBuffer_Release(&self->tls_metrics);
            Py_DECREF(wrap);
            Py_DECREF(in);
            Py_DECREF(out);
            PyErr_SetString(PyExc_ValueError, "tls_server(): metrics must hold one float64 per outcome");
            return NULL;
        }
        self->hs.tls_metrics = (double *)self->tls_metrics.buf;
    }
    Py_XSETREF(self->wrap_bio, wrap);
    Py_XSETREF(self->tls_bios[0], in);
    Py_XSETREF(self->tls_bios[1], out);
    self->hs.ntls_reasons = (uint32_t)n;
    self->hs.tls_lib_shift = shift;
    self->hs.tls_reason_mask = mask;
    self->hs.new_tls = new_tls;
    self->hs.release_tls = release_token;
    Py_RETURN_NONE;
}

static PyTypeObject EngineType;

/* The bytes the head phase read so far from the client and from the origin:
 * 0, or -1 with an error set. */
static int read_so_far(hs_conn *c, PyObject **cb, PyObject **ob) {
    *cb = PyBytes_FromStringAndSize(c->buf ? c->buf : "", c->buf ? c->len : 0);
    *ob = PyBytes_FromStringAndSize(c->obuf ? c->obuf : "", c->obuf ? c->olen : 0);
    if (*cb && *ob)
        return 0;
    Py_XDECREF(*cb);
    Py_XDECREF(*ob);
    return -1;
}


/* The Engine TLS tunnels of this head phase go to: `other` (an Engine on
 * epoll, engine.c "TLS tunnels"), or this one when None. */
static EngineObject *tls_engine_of(EngineObject *self, PyObject *other) {
    if (other == Py_None)
        return self;
    if (!PyObject_TypeCheck(other, &EngineType) || !((EngineObject *)other)->ready) {
        PyErr_SetString(PyExc_TypeError, "expected a ready Engine for the TLS tunnel");
        return NULL;
    }
    return (EngineObject *)other;
}

/* The pump takes a TLS connection's SSL from the head phase: `token` (what
 * the pump keeps for the tunnel) must keep the SSL's owner alive, as its
 * `tls` (relay/native/plane.py's NativeTunnel.tls). */
static int holds_ssl(PyObject *token, hs_conn *c) {
    PyObject *held = PyObject_GetAttrString(token, "tls");
    if (!held)
        return -1;
    Py_DECREF(held);
    if (held != (PyObject *)c->tls_token) {
        PyErr_SetString(PyExc_ValueError, "the tunnel's token must hold the connection's SSL as its .tls");
        return -1;
    }
    return 0;
}

static PyObject *Engine_tls_offload(EngineObject *self, PyObject *args) {
    long long id;
    int fd;
    PyObject *other, *token;
    CHECK_HS(self);
    if (!PyArg_ParseTuple(args, "LiOO", &id, &fd, &other, &token))
        return NULL;
    EngineObject *eo = tls_engine_of(self, other);
    if (!eo)
        return NULL;
    engine *e = &eo->e;
    hs_conn *c = hs_get(&self->hs, id);
    if (c == NULL || !c->ssl || (c->state != H_DECIDE && c->state != H_DECIDE2)) {
        PyErr_SetString(PyExc_ValueError, "tls_offload(): no TLS connection waits for a decision with this id");
        return NULL;
    }
    if (holds_ssl(token, c) < 0)
        return NULL;
    PyObject *cb, *ob;
    if (read_so_far(c, &cb, &ob) < 0)
        return NULL;
    SSL *ssl = c->ssl;
    int cfd, ofd;
    hs_detach(&self->hs, id, &cfd, &ofd); /* our reference to the SSL's owner goes: token holds one */
    Py_INCREF(token);
    eng_clock(e);
    int64_t tid = eng_open_tls(e, cfd, fd, ssl, "", 0, "", 0, token);
    if (tid < 0)
        close(cfd); /* fd stays the caller's */
    else /* the Python plane behind it counts the connection, and keeps its time (not a tunnel's idle timeout) */
        eng_carrier(e, tid);
    PyObject *t = opened(eo, tid, token);
    if (!t) {
        if (ofd >= 0)
            close(ofd);
        Py_DECREF(cb);
        Py_DECREF(ob);
        return NULL;
    }
    return Py_BuildValue("(iNNN)", ofd, cb, ob, t);
}

static PyObject *Engine_hs_fileno(EngineObject *self, PyObject *Py_UNUSED(i)) {
    CHECK_HS(self);
    return PyLong_FromLong(self->hs.epfd);
}

static PyObject *Engine_listen(EngineObject *self, PyObject *args) {
    int fd, is_tls = 0;
    CHECK_HS(self);
    if (!PyArg_ParseTuple(args, "i|p", &fd, &is_tls))
        return NULL;
    if (is_tls && !self->wrap_bio) {
        PyErr_SetString(PyExc_RuntimeError, "listen(fd, tls=True): tls_server() was not called");
        return NULL;
    }
    int r = hs_listen(&self->hs, fd, is_tls);
    if (r < 0) {
        errno = -r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* The client's address as text ("-" for none): X-Forwarded-For, and peer_ip's str. */
static size_t peer_text(const hs_conn *c, char out[INET6_ADDRSTRLEN]) {
    const void *a = c->peer.ss_family == AF_INET6 ? (const void *)&((const struct sockaddr_in6 *)&c->peer)->sin6_addr
                                                  : (const void *)&((const struct sockaddr_in *)&c->peer)->sin_addr;
    if ((c->peer.ss_family != AF_INET && c->peer.ss_family != AF_INET6) ||
        !inet_ntop(c->peer.ss_family, a, out, INET6_ADDRSTRLEN)) {
        strcpy(out, "-");
        return 1;
    }
    return strlen(out);
}

/* The client's address as a str: the last one is kept, since a burst of
 * connections mostly comes from few addresses (and tunnels keep one string). */
static PyObject *peer_ip(EngineObject *self, hs_conn *c) {
    if (self->last_ip && c->peerlen == self->last_peerlen) {
        if (c->peer.ss_family == AF_INET &&
            ((struct sockaddr_in *)&c->peer)->sin_addr.s_addr == ((struct sockaddr_in *)&self->last_peer)->sin_addr.s_addr)
            return Py_NewRef(self->last_ip);
        if (c->peer.ss_family == AF_INET6 &&
            memcmp(&((struct sockaddr_in6 *)&c->peer)->sin6_addr, &((struct sockaddr_in6 *)&self->last_peer)->sin6_addr,
                   16) == 0)
            return Py_NewRef(self->last_ip);
    }
    char host[INET6_ADDRSTRLEN];
    peer_text(c, host);
    PyObject *ip = PyUnicode_InternFromString(host);
    if (!ip)
        return NULL;
    Py_XSETREF(self->last_ip, Py_NewRef(ip));
    self->last_peer = c->peer;
    self->last_peerlen = c->peerlen;
    return ip;
}

/* The failed attempts, for the failure log: ((origin, kind, errno), ...) or None. */
static PyObject *attempts_of(hs_conn *c) {
    if (!c->nattempts)
        Py_RETURN_NONE;
    PyObject *t = PyTuple_New(c->nattempts);
    if (!t)
        return NULL;
    for (int k = 0; k < c->nattempts; k++) {
        PyObject *a = Py_BuildValue("(iii)", c->attempts[k].origin, c->attempts[k].kind, c->attempts[k].error);
        if (!a) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, k, a);
    }
    return t;
}

static PyObject *response_of(EngineObject *self, hs_conn *c) {
    hh_head err;
    PyObject *resp = heads_view(1, c->obuf, c->olen, self->hs.max_response, &err);
    if (resp == Py_None && err.status) {
        Py_DECREF(resp);
        return Py_BuildValue("(iss)", err.status, err.reason, err.outcome);
    }
    return resp;
}

/* cb(*args) for the front's bound methods, without a format string parsed
 * nor an argument tuple built per call (two calls per handshake): argv[0]
 * is room for the method's self (PY_VECTORCALL_ARGUMENTS_OFFSET). Takes
 * the references in argv[1..n]; a NULL among them (a failed conversion)
 * makes it return NULL with that error set. */
static PyObject *call_front(PyObject *cb, PyObject **argv, size_t n) {
    PyObject *r = NULL;
    size_t k;
    for (k = 1; k <= n; k++)
        if (argv[k] == NULL)
            break;
    if (k > n)
        r = PyObject_Vectorcall(cb, argv + 1, n | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    for (k = 1; k <= n; k++)
        Py_XDECREF(argv[k]);
    return r;
}

/* Whether the origin's answer is a 101 relay/handshake.py's
 * check_upgrade_response passes: Upgrade has the websocket token, Connection
 * the upgrade token, and the first Sec-WebSocket-Accept is the one connect()
 * was given. Anything else (another status, a bad 101, a head that does not
 * parse) goes to Python as a view, which checks it again and says why. */
static int checked_101(EngineObject *self, hs_conn *c) {
    hh_head h;
    if (hh_response(c->obuf, c->olen, self->hs.max_response, &h) != HH_OK)
        return 0;
    int ok = h.code == 101 && hh_has_token(c->obuf, &h, "upgrade", 7, "websocket", 9) &&
             hh_has_token(c->obuf, &h, "connection", 10, "upgrade", 7);
    if (ok) {
        const hh_field *f = hh_get(c->obuf, &h, "sec-websocket-accept", 20, 0);
        ok = f && f->value.len == c->accept_len && memcmp(c->obuf + f->value.off, c->accept, c->accept_len) == 0;
    }
    hh_free(&h);
    return ok;
}

/* -- the fast path (fast_path.h; relay/native/fast_path.py compiles its tables) ------------ */

static int64_t splice_conn(EngineObject *self, EngineObject *eo, hs_conn *c, int64_t id, void *token, uint32_t tag,
                           double born, void *log);

/* The pool of a request: pools[0] without routes; with them, what the
 * owner's router says (relay/routes.py Router over the pools' places:
 * relay/native/fast_path.py), called with the path and Host as on_head's
 * gate.route would be. -1: Python's to decide (no route, a pool the fast
 * path does not decide for, an absolute-form target, a path that routes
 * elsewhere once decoded, or any error, which is cleared). */
static int fast_pool(EngineObject *self, const char *b, const hh_head *hh) {
    if (!self->fp_router)
        return 0;
    if (hh->slash || hh->has_authority)
        return -1;
    const hh_field *host = hh_get(b, hh, "host", 4, 0);
    PyObject *path = PyBytes_FromStringAndSize(b + hh->path.off, hh->path.len);
    PyObject *name = host ? PyBytes_FromStringAndSize(b + host->value.off, host->value.len) : Py_NewRef(Py_None);
    PyObject *r = path && name ? PyObject_CallFunctionObjArgs(self->fp_router, path, name, NULL) : NULL;
    Py_XDECREF(path);
    Py_XDECREF(name);
    long v = r && PyLong_Check(r) ? PyLong_AsLong(r) : -1;
    Py_XDECREF(r);
    if (PyErr_Occurred())
        PyErr_Clear();
    return v >= 0 && v < (long)self->fp.npools ? (int)v : -1;
}

/* A parsed, valid upgrade the fast path may take: decided, forwarded and
 * connected here, no Python (on_head's work for the plain case, with the same
 * forward_head and X-Request-ID rule). 1: taken. */
static int fast_take(EngineObject *self, hs_conn *c, int64_t id, const hh_head *hh, const hh_field *key) {
    uint32_t order[FP_MAX_MEMBERS], norder, member;
    int pool = fast_pool(self, c->buf, hh);
    if (pool < 0) {
        self->fp.declined++;
        return 0;
    }
    /* an origin without addresses (a host name not resolved yet, as when a worker
     * starts): on_head's to decide (it sends such upgrades to the Python plane
     * until the resolver answered), not a connect C would fail */
    const fp_pool *p = &self->fp.pools[pool];
    for (uint32_t k = p->first; k < p->first + p->n; k++) {
        uint32_t o = self->fp.members[k].origin;
        if (o >= self->hs.norigins || !self->hs.origins[o].naddrs) {
            self->fp.declined++;
            return 0;
        }
    }
    double now = fp_now();
    if (!fp_decide(&self->fp, (uint32_t)pool, c->buf, hh, now, &member, order, &norder))
        return 0;
    char ip[INET6_ADDRSTRLEN];
    size_t ip_len = peer_text(c, ip);
    /* a trusted proxy's X-Forwarded-For is kept and appended to, its X-Request-ID kept (README
     * "Trusted proxies"), as on_head asks connect() to; anyone else's replaced */
    uint8_t addr[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (c->peer.ss_family == AF_INET6)
        memcpy(addr, &((struct sockaddr_in6 *)&c->peer)->sin6_addr, 16);
    else if (c->peer.ss_family == AF_INET)
        memcpy(addr + 12, &((struct sockaddr_in *)&c->peer)->sin_addr, 4);
    int trusted = self->fp.ntrusted && c->peer.ss_family != AF_UNSPEC && fp_trusted(&self->fp, addr);
    const char *rid;
    uint32_t rid_len;
    if (!trusted || !fp_request_id(c->buf, hh, &rid, &rid_len)) {
        new_request_id(self, c->fast_rid);
        rid = c->fast_rid;
        rid_len = 32;
        c->rid_off = UINT32_MAX;
    } else {
        c->rid_off = (uint32_t)(rid - c->buf);
    }
    c->rid_len = rid_len;
    /* a TLS connection's requests are X-Forwarded-Proto: https (README "TLS"), as in connect() */
    const char *proto = c->ssl ? "https" : PyBytes_AS_STRING(self->proto);
    size_t proto_len = c->ssl ? 5 : (size_t)PyBytes_GET_SIZE(self->proto);
    char *head = malloc(hh_forward_size(hh, ip_len, proto_len, rid_len, 9));
    if (!head) {
        fp_give_back(&self->fp, member);
        return 0;
    }
    size_t n = hh_forward(c->buf, hh, ip, ip_len, proto, proto_len, 1, rid, rid_len, "localhost", 9, trusted, head);
    ws_accept(c->buf + key->value.off, key->value.len, c->accept);
    c->accept_len = WS_ACCEPT_LEN;
    c->head_end = hh->head_len; /* what follows is held until the 101 */
    c->fast = 1;
    c->fast_member = member;
    c->fast_started = now;
    hs_connect(&self->hs, id, order, norder, head, n, NULL, p->connect_timeout_ms);
    free(head);
    return 1;
}

/* The X-Request-ID a fast-path connection forwarded (c->rid_len bytes). */
static const char *rid_of(const hs_conn *c) {
    return c->rid_off == UINT32_MAX ? c->fast_rid : c->buf + c->rid_off;
}

/* Anything but the common outcome on a connection the fast path decided:
 * Python takes it over (front.on_adopt(id, req, ip, started, origin, tls,
 * request_id) -> its token), with the admission slot and the connection
 * count on the origin asked first, and the event is delivered to it as to
 * any other. */
static PyObject *fast_adopt(EngineObject *self, hs_conn *c, int64_t id) {
    PyObject *req = heads_view(0, c->buf, c->len, self->hs.max_head, NULL);
    PyObject *argv[8] = {NULL, req ? PyLong_FromLongLong(id) : NULL, req, req ? peer_ip(self, c) : NULL,
                         req ? PyFloat_FromDouble(c->fast_started) : NULL,
                         req ? PyLong_FromUnsignedLong(self->fp.members[c->fast_member].origin) : NULL,
                         Py_NewRef(c->ssl ? (PyObject *)c->tls_token : Py_None),
                         req ? PyBytes_FromStringAndSize(rid_of(c), c->rid_len) : NULL};
    PyObject *token = call_front(self->cb_adopt, argv, 7);
    if (!token)
        return NULL; /* still fast: its close gives back what it holds */
    c->fast = 0;
    c->token = token; /* the connection's, released with it */
    self->fp.adopted++;
    return token;
}

/* The access-log record of a fast-path upgrade (access_log.h): what
 * NativeFront.on_head and _upgraded put in Python's AccessRecord. */
static al_record *fast_record(EngineObject *self, hs_conn *c, uint32_t member, double handshake_s) {
    hh_head hh;
    if (hh_request(c->buf, c->len, self->hs.max_head, &hh) != HH_OK) { /* parsed before: never */
        hh_free(&hh);
        return NULL;
    }
    const char *b = c->buf;
    char ip[INET6_ADDRSTRLEN];
    size_t ip_len = peer_text(c, ip);
    const fp_table *t = self->fp_count ? self->fp_count : &self->fp;
    /* X-Forwarded-For's lines: on the stack, as a proxy chain has few; more on the heap */
    al_str xff[8], *xv = xff;
    uint32_t nxff = 0;
    for (const hh_field *f = hh_get(b, &hh, "x-forwarded-for", 15, 0); f;
         f = hh_get(b, &hh, "x-forwarded-for", 15, (uint32_t)(f - hh.fields) + 1))
        nxff++;
    if (nxff > 8 && !(xv = malloc(nxff * sizeof *xv)))
        nxff = 0, xv = xff; /* out of memory: the line says none */
    uint32_t k = 0;
    for (const hh_field *f = hh_get(b, &hh, "x-forwarded-for", 15, 0); f && k < nxff;
         f = hh_get(b, &hh, "x-forwarded-for", 15, (uint32_t)(f - hh.fields) + 1))
        xv[k++] = (al_str){b + f->value.off, f->value.len};
    const hh_field *ua = hh_get(b, &hh, "user-agent", 10, 0);
    const char *version = c->ssl ? tls.SSL_get_version(c->ssl) : "";
    al_fields f = {
        .worker = t->log_worker,
        .client = {ip, ip_len},
        .method = {b + hh.method.off, hh.method.len},
        .path = {b + hh.path.off, hh.path.len}, /* an absolute-form target (slash) is Python's */
        .origin = {t->log_names[member].s, t->log_names[member].n},
        .pool = {t->pools[t->members[member].pool].log_name.s, t->pools[t->members[member].pool].log_name.n},
        .user_agent = ua ? (al_str){b + ua->value.off, ua->value.len} : (al_str){"", 0},
        .request_id = {rid_of(c), c->rid_len},
        .tls_version = {version ? version : "", version ? strlen(version) : 0},
        .xff = xv,
        .nxff = nxff,
        /* round(handshake_s * 1000, 3), as _upgraded */
        .handshake_ms = handshake_s * 1000,
        .tls_resumed = c->ssl ? tls.SSL_session_reused(c->ssl) : 0,
    };
    al_record *r = al_open(&f);
    if (xv != xff)
        free(xv);
    hh_free(&hh);
    return r;
}

/* A fast-path tunnel's access-log line, on stdout (fd 1) in one writev, as
 * relay/logs.py AccessLog.write; a failed write loses the line, as there. */
static void fast_log_line(al_record *r, double duration_s, uint64_t up, uint64_t down) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    char scratch[AL_SCRATCH];
    struct iovec iov[4];
    int n = al_iov(r, (double)ts.tv_sec + ts.tv_nsec / 1e9, duration_s, up, down, scratch, iov);
    ssize_t w;
    do
        w = writev(1, iov, n);
    while (w < 0 && errno == EINTR);
}

/* The origin's 101, checked in C, on a fast-path connection: counted, and
 * both sockets to the pump; the tunnel's end is counted in report_ended. */
static void fast_upgrade(EngineObject *self, hs_conn *c, int64_t id) {
    double now = fp_now();
    int64_t ns = hs_connect_time(&self->hs, id);
    uint32_t member = c->fast_member;
    fp_upgraded(&self->fp, member, now - c->fast_started, ns < 0 ? -1.0 : (double)ns / 1e9);
    c->fast = 0; /* the tunnel holds the slot and the count now */
    /* its access-log line, less what the end adds (NULL out of memory: no line, as an unwritable stdout) */
    al_record *log = self->fp.log ? fast_record(self, c, member, now - c->fast_started) : NULL;
    PyObject *token = c->ssl ? Py_NewRef((PyObject *)c->tls_token) : NULL; /* keeps the SSL alive */
    if (splice_conn(self, c->ssl ? self->fp_tls : self, c, id, token, member + 1, now, log) < 0) {
        fp_ended(&self->fp, member, 0.0, 0, 0);
        free(log);
        Py_XDECREF(token);
    }
}

/* Deliver queued head-phase events to Python; 0 or -1 with the first error set.
 * Each callback must leave the connection decided (connected, refused,
 * detached, spliced or closed): one it left waiting is closed, and that is
 * an error of the caller's. */
static int deliver(EngineObject *self) {
    PyObject *et = NULL, *ev = NULL, *tb = NULL;
    hs_event e;
    int fast_spliced = 0;
    while (hs_pop(&self->hs, &e)) {
        if (e.slot >= self->hs.cap || self->hs.c[e.slot].gen != e.gen || self->hs.c[e.slot].state == H_FREE)
            continue;
        hs_conn *c = &self->hs.c[e.slot];
        long long id = hs_id(&self->hs, e.slot);
        PyObject *r = NULL, *cb = NULL;
        c->acted = 0;
        if (c->fast && e.kind != HE_HEAD) {
            if (e.kind == HE_RESPONSE && !c->nattempts && checked_101(self, c) && fp_still_up(&self->fp, c->fast_member)) {
                fast_upgrade(self, c, id); /* the common outcome: no Python */
                fast_spliced = 1;
                continue;
            }
            cb = self->cb_adopt;
            if (!fast_adopt(self, c, id))
                goto decided;
        }
        PyObject *token = c->token ? (PyObject *)c->token : Py_None;
        switch (e.kind) {
        case HE_HEAD: {
            cb = self->cb[0];
            /* tls: None on a plain listener; on a TLS one the SSL's owner, or
             * False when the client sent no TLS (plain HTTP, nothing read) */
            PyObject *tls_arg = !c->tls ? Py_None : c->ssl ? (PyObject *)c->tls_token : Py_False;
            PyObject *req;
            if (c->tls && !c->ssl) {
                req = Py_NewRef(Py_None);
            } else if (self->fp.on && (!c->tls || self->fp_tls)) {
                /* parsed once: the fast path decides the plain case, else a view of the same parse for Python */
                hh_head hh;
                const hh_field *key;
                int status;
                const char *why;
                if (hh_request(c->buf, c->len, self->hs.max_head, &hh) != HH_OK) {
                    hh_free(&hh);
                    req = Py_NewRef(Py_None);
                } else if (fp_websocket(c->buf, &hh, &key, &status, &why) == 1 && fast_take(self, c, id, &hh, key)) {
                    hh_free(&hh);
                    continue;
                } else {
                    req = heads_view_parsed(0, c->buf, &hh);
                }
            } else {
                req = heads_view(0, c->buf, c->len, self->hs.max_head, NULL);
            }
            if (req && req != Py_None) {
                const hh_head *hh;
                heads_raw(req, &hh);
                c->head_end = hh->head_len; /* what follows is held until the 101 */
            }
            PyObject *ip = req ? peer_ip(self, c) : NULL;
            PyObject *argv[5] = {NULL, req ? PyLong_FromLongLong(id) : NULL, req, ip, Py_NewRef(tls_arg)};
            r = call_front(cb, argv, 4);
            break;
        }
        case HE_RESPONSE: {
            if (c->accept_len && self->cb[CB_UPGRADE] && checked_101(self, c)) {
                /* the common answer, checked here: Python is told the origin and
                 * what failed before it, and splices (no view built, no check in Python) */
                cb = self->cb[CB_UPGRADE];
                int64_t ns = hs_connect_time(&self->hs, id);
                PyObject *argv[6] = {NULL, PyLong_FromLongLong(id), Py_NewRef(token), PyLong_FromLong(c->asked),
                                     attempts_of(c), ns < 0 ? Py_NewRef(Py_None) : PyFloat_FromDouble((double)ns / 1e9)};
                r = call_front(cb, argv, 5);
                break;
            }
            cb = self->cb[1];
            PyObject *resp = response_of(self, c);
            PyObject *argv[6] = {NULL, resp ? PyLong_FromLongLong(id) : NULL, Py_NewRef(token), resp,
                                 resp ? PyLong_FromLong(c->asked) : NULL, resp ? attempts_of(c) : NULL};
            r = call_front(cb, argv, 5);
            break;
        }
        case HE_FAILED:
            cb = self->cb[2];
            r = PyObject_CallFunction(cb, "LOiN", id, token, c->asked, attempts_of(c));
            break;
        default: /* HE_TIMEOUT */
            if (c->state == H_DECIDE) { /* the head: Python counts a started one (408), nothing is written */
                cb = self->cb[4];
                PyObject *ip = peer_ip(self, c);
                r = ip ? PyObject_CallFunction(cb, "Ly#N", id, c->buf ? c->buf : "", (Py_ssize_t)c->len, ip) : NULL;
                if (hs_get(&self->hs, id))
                    hs_close(&self->hs, e.slot);
            } else {
                cb = self->cb[3];
                r = PyObject_CallFunction(cb, "LOiN", id, token, c->asked, attempts_of(c));
            }
            break;
        }
    decided:
        c = hs_get(&self->hs, id);
        if (r != NULL && c && !c->acted && (c->state == H_DECIDE || c->state == H_DECIDE2)) {
            Py_DECREF(r);
            r = NULL;
            PyErr_Format(PyExc_RuntimeError, "%R left head-phase connection %lld undecided: closed", cb, id);
        }
        if (r == NULL) {
            /* Python could not decide: drop the connection rather than leave it hanging */
            if (hs_get(&self->hs, id))
                hs_close(&self->hs, e.slot);
            if (et == NULL)
                PyErr_Fetch(&et, &ev, &tb);
            else
                PyErr_WriteUnraisable(cb);
        }
        Py_XDECREF(r);
    }
    /* A tunnel the splice ended at once (its client reset before or at the
     * 101) waits in the ended list with no event left to have it reported:
     * report it now, as opened() does after Python's splice. */
    EngineObject *pumps[2] = {self, self->fp_tls && self->fp_tls != self ? self->fp_tls : NULL};
    for (int k = 0; fast_spliced && k < 2; k++) {
        if (pumps[k] && report_ended(pumps[k]) < 0) {
            if (et == NULL)
                PyErr_Fetch(&et, &ev, &tb);
            else
                PyErr_WriteUnraisable(pumps[k]->on_end);
        }
    }
    if (et != NULL) {
        PyErr_Restore(et, ev, tb);
        return -1;
    }
    return 0;
}

static PyObject *Engine_poll_handshakes(EngineObject *self, PyObject *args) {
    int maxaccept = 64;
    CHECK_HS(self);
    if (!PyArg_ParseTuple(args, "|i", &maxaccept))
        return NULL;
    int n = hs_poll(&self->hs, maxaccept);
    if (deliver(self) < 0)
        return NULL;
    if (n < 0) {
        errno = -n;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(n);
}

static PyObject *Engine_expire(EngineObject *self, PyObject *Py_UNUSED(i)) {
    CHECK_HS(self);
    hs_expire(&self->hs);
    if (deliver(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Engine_refuse(EngineObject *self, PyObject *args) {
    long long id;
    Py_buffer data;
    CHECK_HS(self);
    if (!PyArg_ParseTuple(args, "Ly*", &id, &data))
        return NULL;
    int r = hs_refuse(&self->hs, id, data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return PyBool_FromLong(r);
}

static int to_sockaddr(PyObject *item, struct sockaddr_storage *out) {
    const char *host;
    int port;
    unsigned int flow = 0, scope = 0;
    if (!PyArg_ParseTuple(item, "si|II", &host, &port, &flow, &scope))
        return -1;
    memset(out, 0, sizeof *out);
    struct sockaddr_in *a4 = (struct sockaddr_in *)out;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)out;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
    } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        a6->sin6_flowinfo = htonl(flow);
        a6->sin6_scope_id = scope;
    } else {
        PyErr_Format(PyExc_ValueError, "not a numeric address: %s", host);
        return -1;
    }
    return 0;
}

static PyObject *Engine_set_origins(EngineObject *self, PyObject *arg) {
    CHECK_HS(self);
    PyObject *seq = PySequence_Fast(arg, "origins: a sequence of address lists");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    hs_origin *o = calloc((size_t)(n ? n : 1), sizeof *o);
    if (!o) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    int ok = 1;
    for (Py_ssize_t k = 0; ok && k < n; k++) {
        PyObject *addrs = PySequence_Fast(PySequence_Fast_GET_ITEM(seq, k), "an origin's addresses: a sequence");
        if (!addrs) {
            ok = 0;
            break;
        }
        Py_ssize_t m = PySequence_Fast_GET_SIZE(addrs);
        o[k].addrs = calloc((size_t)(m ? m : 1), sizeof *o[k].addrs);
        ok = o[k].addrs != NULL;
        for (Py_ssize_t j = 0; ok && j < m; j++)
            ok = to_sockaddr(PySequence_Fast_GET_ITEM(addrs, j), &o[k].addrs[j]) == 0;
        if (ok)
            o[k].naddrs = (uint32_t)m;
        Py_DECREF(addrs);
    }
    Py_DECREF(seq);
    if (!ok) {
        for (Py_ssize_t k = 0; k < n; k++)
            free(o[k].addrs);
        free(o);
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        return NULL;
    }
    hs_set_origins(&self->hs, o, (uint32_t)n);
    Py_RETURN_NONE;
}

/* The origins to ask, in order: a sequence of indices into set_origins()'s list. */
#define MAX_ORDER 1024
static int read_order(PyObject *seq, uint32_t *out, uint32_t *n) {
    PyObject *fast = PySequence_Fast(seq, "connect(): order must be a sequence of origin indices");
    if (!fast)
        return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(fast);
    if (len < 1 || len > MAX_ORDER) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "connect(): order must name 1 to 1024 origins");
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned long v = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == (unsigned long)-1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        out[i] = (uint32_t)v;
    }
    *n = (uint32_t)len;
    Py_DECREF(fast);
    return 0;
}

static PyObject *Engine_connect(EngineObject *self, PyObject *args) {
    long long id;
    PyObject *order_seq, *req, *token;
    PyObject *rid_obj;
    const char *rid;
    Py_ssize_t rid_len;
    char fresh[32];
    int trusted;
    uint32_t order[MAX_ORDER], norder;
    double timeout = -1.0;
    PyObject *accept = Py_None;
    CHECK_HS(self);
    if (!PyArg_ParseTuple(args, "LOOOpO|dO", &id, &order_seq, &req, &rid_obj, &trusted, &token, &timeout, &accept))
        return NULL;
    if (rid_obj == Py_None) { /* Python needs no id of its own (no access log, no trusted one): a new one */
        new_request_id(self, fresh);
        rid = fresh;
        rid_len = 32;
    } else if (PyBytes_Check(rid_obj)) {
        rid = PyBytes_AS_STRING(rid_obj);
        rid_len = PyBytes_GET_SIZE(rid_obj);
    } else {
        PyErr_SetString(PyExc_TypeError, "connect(): request_id is bytes or None");
        return NULL;
    }
    if (accept != Py_None && accept != Py_True && accept != Py_False &&
        (!PyBytes_Check(accept) || PyBytes_GET_SIZE(accept) > (Py_ssize_t)sizeof(((hs_conn *)0)->accept))) {
        PyErr_SetString(PyExc_TypeError, "connect(): accept is True, None or a Sec-WebSocket-Accept value");
        return NULL;
    }
    if (!heads_is_request(req)) {
        PyErr_SetString(PyExc_TypeError, "connect(): req must be the Request this head phase delivered");
        return NULL;
    }
    if (read_order(order_seq, order, &norder) < 0)
        return NULL;
    hs_conn *c = hs_get(&self->hs, id);
    if (!c || c->state != H_DECIDE)
        Py_RETURN_FALSE;
    /* the forwarded head: relay.headers.forward_head's policy, in C (http_head.c) */
    PyObject *ip = peer_ip(self, c);
    if (!ip)
        return NULL;
    Py_ssize_t ip_len;
    const char *ips = PyUnicode_AsUTF8AndSize(ip, &ip_len);
    /* a TLS connection's requests are X-Forwarded-Proto: https (README "TLS") */
    const char *proto = c->ssl ? "https" : PyBytes_AS_STRING(self->proto);
    size_t proto_len = c->ssl ? 5 : (size_t)PyBytes_GET_SIZE(self->proto);
    PyObject *head = ips ? heads_forward(req, ips, (size_t)ip_len, proto, proto_len, 1, rid, (size_t)rid_len,
                                         "localhost", 9, trusted)
                         : NULL;
    Py_DECREF(ip);
    if (!head)
        return NULL;
    c->accept_len = 0;
    if (PyBytes_Check(accept)) {
        memcpy(c->accept, PyBytes_AS_STRING(accept), (size_t)PyBytes_GET_SIZE(accept));
        c->accept_len = (uint8_t)PyBytes_GET_SIZE(accept);
    } else if (accept == Py_True) { /* from the request's key (the gate checked there is one) */
        const hh_head *hh;
        const char *raw = heads_raw(req, &hh);
        const hh_field *f = hh_get(raw, hh, "sec-websocket-key", 17, 0);
        if (f) {
            ws_accept(raw + f->value.off, f->value.len, c->accept);
            c->accept_len = WS_ACCEPT_LEN;
        }
    }
    Py_INCREF(token);
    int r = hs_connect(&self->hs, id, order, norder, PyBytes_AS_STRING(head), (size_t)PyBytes_GET_SIZE(head), token,
                       timeout >= 0 ? (int64_t)(timeout * 1000) : -1);
    Py_DECREF(head);
    if (!r)
        Py_DECREF(token);
    Py_RETURN_TRUE;
}

static PyObject *Engine_skip(EngineObject *self, PyObject *args) {
    long long id;
    unsigned int n;
    CHECK_HS(self);
    if (!PyArg_ParseTuple(args, "LI", &id, &n))
        return NULL;
    return PyBool_FromLong(hs_skip(&self->hs, id, n));
}

static PyObject *Engine_connect_time(EngineObject *self, PyObject *arg) {
    CHECK_HS(self);
    long long id = PyLong_AsLongLong(arg);
    if (id == -1 && PyErr_Occurred())
        return NULL;
    int64_t ns = hs_connect_time(&self->hs, id);
    if (ns < 0)
        Py_RETURN_NONE;
    return PyFloat_FromDouble((double)ns / 1e9);
}

static PyObject *Engine_detach(EngineObject *self, PyObject *arg) {
    CHECK_HS(self);
    long long id = PyLong_AsLongLong(arg);
    if (id == -1 && PyErr_Occurred())
        return NULL;
    hs_conn *c = hs_get(&self->hs, id);
    if (c == NULL)
        Py_RETURN_NONE;
    if (c->ssl) {
        PyErr_SetString(PyExc_ValueError, "detach(): a TLS connection's SSL cannot leave the engine (tls_offload())");
        return NULL;
    }
    PyObject *cb, *ob;
    if (read_so_far(c, &cb, &ob) < 0)
        return NULL;
    int cfd, ofd;
    hs_detach(&self->hs, id, &cfd, &ofd);
    return Py_BuildValue("(iiNN)", cfd, ofd, cb, ob);
}

static PyObject *Engine_close_handshake(EngineObject *self, PyObject *arg) {
    CHECK_HS(self);
    long long id = PyLong_AsLongLong(arg);
    if (id == -1 && PyErr_Occurred())
        return NULL;
    if (hs_get(&self->hs, id) == NULL)
        Py_RETURN_FALSE;
    hs_close(&self->hs, (uint32_t)(id & 0xffffffff));
    Py_RETURN_TRUE;
}

static PyObject *Engine_close_handshakes(EngineObject *self, PyObject *Py_UNUSED(i)) {
    CHECK_HS(self);
    return PyLong_FromLong(hs_close_all(&self->hs));
}

/* Both sockets of a decided connection to the pump of eo (self's, or its TLS
 * engine): the origin's answer (its 101 and what followed) to the client, what
 * the client sent behind its head to the origin, now, after the 101. tag and
 * born go to the tunnel (a fast-path tunnel's, else 0), and log (its access-log
 * record, the tunnel's from here on; NULL: none). Returns the tunnel id,
 * or -errno (the sockets closed). The token is the tunnel's from here on. */
static int64_t splice_conn(EngineObject *self, EngineObject *eo, hs_conn *c, int64_t id, void *token, uint32_t tag,
                           double born, void *log) {
    SSL *ssl = c->ssl;
    uint32_t head_len = c->head_end <= c->len ? c->head_end : c->len;
    char *cbuf = c->buf, *obuf = c->obuf;
    uint32_t clen = c->len, olen = c->olen, ccap = c->cap, ocap = c->ocap;
    c->buf = c->obuf = NULL; /* ours until the pump has copied what it needs */
    int cfd, ofd;
    hs_detach(&self->hs, id, &cfd, &ofd);
    eng_clock(&eo->e);
    int64_t tid = ssl ? eng_open_tls(&eo->e, cfd, ofd, ssl, obuf, olen, cbuf + head_len, clen - head_len, token)
                      : eng_open(&eo->e, cfd, ofd, obuf, olen, cbuf + head_len, clen - head_len, token);
    hs_put_buffer(&self->hs, cbuf, ccap);
    hs_put_buffer(&self->hs, obuf, ocap);
    if (tid < 0) { /* the sockets were ours, not the caller's */
        close(cfd);
        close(ofd);
        return tid;
    }
    eng_tunnel *t = &eo->e.t[(uint32_t)(tid & 0xffffffff)];
    t->tag = tag;
    t->born = born;
    t->log = log;
    if (eo->e.backend == ENG_URING && eng_poll(&eo->e, 0) < 0) {
        /* io_uring: submit, and reap what completed in the submission (a 101 sent
         * at once), rather than wake up again for it */
        eng_flush(&eo->e);
    }
    return tid;
}

static PyObject *Engine_splice(EngineObject *self, PyObject *args) {
    long long id;
    PyObject *token, *other = Py_None;
    CHECK_HS(self);
    if (!PyArg_ParseTuple(args, "LO|O", &id, &token, &other))
        return NULL;
    hs_conn *c = hs_get(&self->hs, id);
    if (c == NULL || c->state != H_DECIDE2 || c->ofd < 0) {
        PyErr_SetString(PyExc_ValueError, "splice(): no origin answer waits on this connection");
        return NULL;
    }
    EngineObject *eo = self;
    if (c->ssl && (!(eo = tls_engine_of(self, other)) || holds_ssl(token, c) < 0))
        return NULL;
    Py_INCREF(token);
    return opened(eo, splice_conn(self, eo, c, id, token, 0, 0.0, NULL), token);
}

static PyObject *Engine_get_accepting(EngineObject *self, void *Py_UNUSED(c)) {
    CHECK_HS(self);
    return PyBool_FromLong(!self->hs.stopped);
}

static PyObject *Engine_balance(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"mine", "siblings", "load_index", "accepting_index", "slack", "defer", NULL};
    PyObject *mine, *siblings;
    unsigned int load_i, accepting_i, slack = 4;
    double defer = 0.005;
    CHECK_HS(self);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOII|Id", kwlist, &mine, &siblings, &load_i, &accepting_i,
                                     &slack, &defer))
        return NULL;
    PyObject *seq = PySequence_Fast(siblings, "siblings must be a sequence of buffers");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > 64) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "at most 64 siblings");
        return NULL;
    }
    for (int k = 0; k < self->nbal; k++)
        PyBuffer_Release(&self->bal_bufs[k]);
    self->nbal = 0;
    self->hs.bal.mine = NULL; /* off until every buffer is in hand */
    double **sib = calloc((size_t)(n ? n : 1), sizeof *sib);
    if (!sib) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t k = 0; k <= n; k++) {
        PyObject *obj = k == 0 ? mine : PySequence_Fast_GET_ITEM(seq, k - 1);
        if (PyObject_GetBuffer(obj, &self->bal_bufs[k], k == 0 ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
            free(sib);
            Py_DECREF(seq);
            return NULL;
        }
        self->nbal++;
        if ((size_t)self->bal_bufs[k].len < (size_t)((load_i > accepting_i ? load_i : accepting_i) + 1) * sizeof(double)) {
            free(sib);
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "a slot buffer is smaller than the indices given");
            return NULL;
        }
        if (k)
            sib[k - 1] = (double *)self->bal_bufs[k].buf;
    }
    Py_DECREF(seq);
    hs_balance b = {.mine = (double *)self->bal_bufs[0].buf, .siblings = sib, .nsiblings = (int)n,
                    .load_i = load_i, .accepting_i = accepting_i, .slack = slack,
                    .defer_ms = (int64_t)(defer * 1000), .tunnels = &self->e.open};
    if (b.defer_ms < 1)
        b.defer_ms = 1;
    int r = hs_balance_init(&self->hs, &b);
    if (r < 0) {
        errno = -r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static int Engine_set_accepting(EngineObject *self, PyObject *v, void *Py_UNUSED(c)) {
    if (!self->hs_ready) {
        PyErr_SetString(PyExc_RuntimeError, "handshakes() was not called on this Engine");
        return -1;
    }
    int t = PyObject_IsTrue(v);
    if (t < 0)
        return -1;
    self->hs.stopped = !t;
    if (t && self->hs.deferred)
        return 0; /* the balancing timer resumes it */
    int r = hs_pause(&self->hs, !t);
    if (r < 0) {
        errno = -r;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *Engine_get_hs_live(EngineObject *self, void *Py_UNUSED(c)) {
    CHECK_HS(self);
    return PyLong_FromUnsignedLong(self->hs.live);
}

static PyObject *Engine_get_hs_stats(EngineObject *self, void *Py_UNUSED(c)) {
    CHECK_HS(self);
    PyObject *tls_counts = PyTuple_New(HT_N);
    if (!tls_counts)
        return NULL;
    for (int k = 0; k < HT_N; k++) {
        PyObject *v = PyLong_FromUnsignedLongLong(self->hs.tls_outcomes[k]);
        if (!v) {
            Py_DECREF(tls_counts);
            return NULL;
        }
        PyTuple_SET_ITEM(tls_counts, k, v);
    }
    return Py_BuildValue("{sIsKsKsN}", "live", self->hs.live, "accepted", (unsigned long long)self->hs.accepted,
                         "accept_errors", (unsigned long long)self->hs.accept_errors, "tls", tls_counts);
}

static PyMethodDef Engine_methods[] = {
    {"handshakes", (PyCFunction)(void (*)(void))Engine_handshakes, METH_VARARGS | METH_KEYWORDS,
     "handshakes(front, max_head=16384, head_timeout=10.0, connect_timeout=5.0, proto=b'http'): run the head "
     "phase in C too, calling front.on_head, on_response, on_failed, on_timeout, on_head_timeout"},
    {"hs_fileno", (PyCFunction)Engine_hs_fileno, METH_NOARGS, "The head phase's epoll descriptor."},
    {"balance", (PyCFunction)(void (*)(void))Engine_balance, METH_VARARGS | METH_KEYWORDS,
     "balance(mine, siblings, load_index, accepting_index, slack=4, defer=0.005): balance accepts "
     "against the siblings' loads in shared memory (workers/accept.py's rule)"},
    {"listen", (PyCFunction)Engine_listen, METH_VARARGS,
     "listen(fd, tls=False): accept from this listening socket (tls: its connections speak TLS, tls_server())."},
    {"tls_server", (PyCFunction)Engine_tls_server, METH_VARARGS,
     "tls_server(context, reasons, lib_shift, reason_mask, metrics=None): TLS listeners' SSLs come from this "
     "ssl.SSLContext; reasons: ((lib, reason, outcome index), ...) name failed handshakes; metrics: a writable "
     "float64 buffer, one count per outcome, added to as handshakes end"},
    {"tls_offload", (PyCFunction)Engine_tls_offload, METH_VARARGS,
     "tls_offload(id, fd, engine, token) -> (origin fd, client bytes, origin bytes, tunnel id): a TLS "
     "connection's SSL and socket to a TLS tunnel of `engine` with `fd` (plaintext) as its other side"},
    {"set_origins", (PyCFunction)Engine_set_origins, METH_O,
     "set_origins([[(host, port[, flow, scope]), ...], ...]): each origin's numeric addresses, in order."},
    {"poll_handshakes", (PyCFunction)Engine_poll_handshakes, METH_VARARGS,
     "poll_handshakes(maxaccept=64): accept, read, write, expire; calls the front's callbacks."},
    {"expire", (PyCFunction)Engine_expire, METH_NOARGS, "Run the head phase's timeouts now."},
    {"refuse", (PyCFunction)Engine_refuse, METH_VARARGS,
     "refuse(id, answer): write it, half-close, linger up to 2 s discarding input, close."},
    {"connect", (PyCFunction)Engine_connect, METH_VARARGS,
     "connect(id, order, req, request_id, trusted, token, timeout=-1): forward req (forward_head in C; trusted "
     "keeps the client's X-Forwarded-For) to the origins of order (indices of set_origins), each once, all within "
     "timeout seconds (the pool's RELAY_CONNECT_TIMEOUT; < 0: handshakes()' connect_timeout); the answer "
     "comes to front.on_response with token."},
    {"skip", (PyCFunction)Engine_skip, METH_VARARGS,
     "skip(id, n): the response head delivered was interim (1xx): drop its n bytes and read on."},
    {"connect_time", (PyCFunction)Engine_connect_time, METH_O,
     "connect_time(id) -> seconds the last origin connect took, once; None: none since."},
    {"detach", (PyCFunction)Engine_detach, METH_O,
     "detach(id) -> (client_fd, origin_fd or -1, client_bytes, origin_bytes): the caller takes over."},
    {"close_handshake", (PyCFunction)Engine_close_handshake, METH_O, "close_handshake(id): drop it."},
    {"close_handshakes", (PyCFunction)Engine_close_handshakes, METH_NOARGS, "Drop every head-phase connection."},
    {"fast_path", (PyCFunction)(void (*)(void))Engine_fast_path, METH_VARARGS | METH_KEYWORDS,
     "fast_path(on_adopt, metrics, counts, buckets, clients, slot, header, in_use, conns, state, connect, pools, "
     "health, paths, tls_engine=None, trusted=(), access=None, router=None): decide the common upgrade in C "
     "(fast_path.h; relay/native/fast_path.py builds the arguments); pools: ((members, origins, slowstart, "
     "connect timeout), ...); tls_engine: the epoll Engine relaying wss:// tunnels, whose fast-path tunnels are "
     "then counted here; trusted: RELAY_TRUSTED_PROXIES as ((network, mask), ...) of 16 bytes each; access: "
     "(worker, pool names, member names) to write the access log's lines; router: route(path, host) -> a pool's "
     "place, -1 or None (Python's), with RELAY_ROUTES"},
    {"close_fast", (PyCFunction)Engine_close_fast, METH_NOARGS, "close() every fast-path tunnel -> count."},
    {"splice", (PyCFunction)Engine_splice, METH_VARARGS,
     "splice(id, token) -> tunnel id: the pump takes both sockets; the origin's answer goes to the client, "
     "the client's early bytes to the origin."},
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The epoll descriptor (for loop.add_reader)."},
    {"poll", (PyCFunction)Engine_poll, METH_VARARGS, "poll(maxevents=256) -> events handled; never waits."},
    {"tls_tunnel", (PyCFunction)Engine_tls_tunnel, METH_VARARGS,
     "tls_tunnel(client_fd, origin_fd, to_client, to_origin, token, sslsock) -> id (epoll engines)"},
    {"tunnel", (PyCFunction)Engine_tunnel, METH_VARARGS,
     "tunnel(client_fd, origin_fd, to_client, to_origin, token) -> id; takes both descriptors."},
    {"close", (PyCFunction)Engine_close, METH_O, "close(id): flush, then close both sockets."},
    {"abort", (PyCFunction)Engine_abort, METH_O, "abort(id): close both sockets now."},
    {"close_all", (PyCFunction)Engine_close_all, METH_NOARGS, "close() every open tunnel -> count."},
    {"abort_all", (PyCFunction)Engine_abort_all, METH_NOARGS, "abort() every open tunnel -> count."},
    {"close_idle", (PyCFunction)Engine_close_idle, METH_O,
     "close_idle(seconds): close() tunnels with no byte read for that long -> count."},
    {"bytes", (PyCFunction)Engine_bytes, METH_O, "bytes(id) -> (up, down), or None once ended."},
    {"idle", (PyCFunction)Engine_idle, METH_O, "idle(id) -> seconds since the last byte, or None."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"totals", (getter)Engine_get_totals, NULL, "(up, down): bytes ever read from clients and origins", NULL},
    {"open_bytes", (getter)Engine_get_open_bytes, NULL, "(up, down) of the tunnels still open", NULL},
    {"open", (getter)Engine_get_open, NULL, "tunnels open", NULL},
    {"backend", (getter)Engine_get_backend, NULL, "'io_uring' or 'epoll': what drives the sockets", NULL},
    {"spliced", (getter)Engine_get_spliced, NULL,
     "bytes of totals moved by splice() (bulk directions on io_uring: engine.c 'Bulk by splice')", NULL},
    {"fallback_reason", (getter)Engine_get_why, NULL, "why io_uring was asked for and not used, or None", NULL},
    {"accepting", (getter)Engine_get_accepting, (setter)Engine_set_accepting, "accept new connections", NULL},
    {"handshake_stats", (getter)Engine_get_hs_stats, NULL, "{live, accepted, accept_errors}", NULL},
    {"handshakes_live", (getter)Engine_get_hs_live, NULL, "connections in the head phase", NULL},
    {"fast_path_stats", (getter)Engine_get_fast_path_stats, NULL,
     "{on, decided, upgraded, adopted, declined, open, ended_bytes: (up, down)}", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay.native._engine.Engine",
    .tp_doc = "One worker's native tunnel pump (relay/native/engine.c).",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

/* The admission limit's fast path (relay/shared_memory.py, Admission.take):
 * one more client in this worker's slot of the shared client counts, taken
 * without the lock while the sum is far from the limit. The add is a locked
 * instruction (a full barrier on x86, sequentially consistent anywhere), so
 * the sum read after it holds every other fast take that came before; each
 * of the nslots workers can have at most one take in flight (the locked
 * path's plain store may not be visible yet, a fast one is), so a sum at
 * most limit - nslots + 1, own add included, can never become more than the
 * limit. Nearer than that: False, nothing left taken, and the caller takes
 * the lock and decides exactly, as before. No lock is held, so a worker
 * killed here leaves nothing behind but its own slot (reset by the
 * supervisor). */
static PyObject *websocket_accept(PyObject *Py_UNUSED(m), PyObject *arg) {
    char out[WS_ACCEPT_LEN];
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "websocket_accept(key: bytes)");
        return NULL;
    }
    ws_accept(PyBytes_AS_STRING(arg), (size_t)PyBytes_GET_SIZE(arg), out);
    return PyBytes_FromStringAndSize(out, WS_ACCEPT_LEN);
}

static PyObject *admit_fast(PyObject *Py_UNUSED(m), PyObject *args) {
    Py_buffer b;
    Py_ssize_t slot;
    long long limit;
    if (!PyArg_ParseTuple(args, "w*nL", &b, &slot, &limit))
        return NULL;
    int64_t *c = (int64_t *)b.buf;
    Py_ssize_t n = b.len / (Py_ssize_t)sizeof *c;
    if (slot < 0 || slot >= n || ((uintptr_t)c & 7)) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "admit_fast(): slot out of range or buffer misaligned");
        return NULL;
    }
    int ok = fp_admit(c, (uint32_t)n, (uint32_t)slot, limit);
    PyBuffer_Release(&b);
    return PyBool_FromLong(ok);
}

/* fast_path_allows(head, paths, origins) -> bool | None: whether the fast
 * path's rules (fp_rules_allow) allow this request head with these tables
 * (paths () = every path, origins None = any); None: the head does not
 * parse. For the differential test against relay/handshake.py. */
static PyObject *fast_path_allows(PyObject *Py_UNUSED(m), PyObject *args) {
    Py_buffer head;
    PyObject *paths, *origins;
    if (!PyArg_ParseTuple(args, "y*O!O", &head, &PyTuple_Type, &paths, &origins))
        return NULL;
    fp_table *t = PyMem_Calloc(1, sizeof *t);
    PyObject *r = NULL;
    if (!t) {
        PyErr_NoMemory();
        goto out;
    }
    t->npools = 1;
    if (fp_rules(t, &t->pools[0], paths, origins) < 0)
        goto out;
    hh_head h;
    if (hh_request(head.buf, (size_t)head.len, (size_t)head.len, &h) != HH_OK) {
        hh_free(&h);
        r = Py_NewRef(Py_None);
        goto out;
    }
    r = PyBool_FromLong(fp_rules_allow(t, 0, head.buf, &h));
    hh_free(&h);
out:
    PyMem_Free(t);
    PyBuffer_Release(&head);
    return r;
}

/* access_line(...) -> bytes: the access-log line of a fast-path tunnel
 * (access_log.c) from given values, for tests/unit/test_access_line.py to
 * hold against relay/logs.py's encoding of the same record. */
static PyObject *access_line(PyObject *Py_UNUSED(m), PyObject *args) {
    al_fields f = {0};
    PyObject *xff;
    double now, duration;
    unsigned long long up, down;
    Py_ssize_t n[8];
    if (!PyArg_ParseTuple(args, "iy#y#y#y#y#y#O!y#y#dpddKK", &f.worker, &f.client.s, &n[0], &f.method.s, &n[1],
                          &f.path.s, &n[2], &f.origin.s, &n[3], &f.pool.s, &n[4], &f.user_agent.s, &n[5],
                          &PyTuple_Type, &xff, &f.request_id.s, &n[6], &f.tls_version.s, &n[7], &f.handshake_ms,
                          &f.tls_resumed, &now, &duration, &up, &down))
        return NULL;
    f.client.n = (size_t)n[0], f.method.n = (size_t)n[1], f.path.n = (size_t)n[2], f.origin.n = (size_t)n[3];
    f.pool.n = (size_t)n[4], f.user_agent.n = (size_t)n[5], f.request_id.n = (size_t)n[6];
    f.tls_version.n = (size_t)n[7];
    Py_ssize_t k = PyTuple_GET_SIZE(xff);
    al_str *xv = PyMem_Malloc((k ? k : 1) * sizeof *xv);
    if (!xv)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *b = PyTuple_GET_ITEM(xff, i);
        if (!PyBytes_Check(b)) {
            PyMem_Free(xv);
            PyErr_SetString(PyExc_TypeError, "access_line(): X-Forwarded-For lines are bytes");
            return NULL;
        }
        xv[i] = (al_str){PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b)};
    }
    f.xff = xv;
    f.nxff = (uint32_t)k;
    al_record *r = al_open(&f);
    PyMem_Free(xv);
    if (!r)
        return PyErr_NoMemory();
    char scratch[AL_SCRATCH];
    struct iovec iov[4];
    int cnt = al_iov(r, now, duration, up, down, scratch, iov);
    size_t total = 0;
    for (int i = 0; i < cnt; i++)
        total += iov[i].iov_len;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (out) {
        char *o = PyBytes_AS_STRING(out);
        for (int i = 0; i < cnt; i++) {
            memcpy(o, iov[i].iov_base, iov[i].iov_len);
            o += iov[i].iov_len;
        }
    }
    free(r);
    return out;
}

static PyMethodDef engine_functions[] = {
    {"access_line", access_line, METH_VARARGS,
     "access_line(worker, client, method, path, origin, pool, user_agent, xff_lines, request_id, tls_version, "
     "handshake_ms, tls_resumed, now, duration_s, up, down) -> bytes: a fast-path tunnel's access-log line"},
    {"fast_path_allows", fast_path_allows, METH_VARARGS,
     "fast_path_allows(head, paths, origins) -> bool | None: the fast path's path and Origin rules on a request "
     "head (paths (): every path; origins None: any); None when it does not parse"},
    {"tls_load", (PyCFunction)tls_load_py, METH_O,
     "tls_load(path of _ssl or None): find OpenSSL where Python's ssl module found it (OSError: not usable)"},
    {"tls_held", (PyCFunction)tls_held, METH_O,
     "tls_held(sslsock) -> (ciphertext its read BIO holds, records its write BIO holds), in bytes"},
    {"admit_fast", (PyCFunction)admit_fast, METH_VARARGS,
     "admit_fast(clients, slot, limit) -> bool: one more client in clients[slot] (int64 counts in shared memory), "
     "taken lock-free while the sum stays at most limit - len(clients) + 1; False: nothing taken, decide under the lock"},
    {"websocket_accept", (PyCFunction)websocket_accept, METH_O,
     "websocket_accept(key) -> the 28-byte Sec-WebSocket-Accept for key (RFC 6455 §4.2.2; ws_accept.c)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "relay.native._engine", "The native data plane (relay/native/engine.c).", -1, NULL,
};

PyMODINIT_FUNC PyInit__engine(void) {
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EngineType);
    if (heads_init(m) < 0 || PyModule_AddFunctions(m, engine_functions) < 0 ||
        PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
