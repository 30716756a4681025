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
 *
 * on_end(token, bytes_up, bytes_down) is called exactly once per tunnel,
 * from whichever of these methods saw it end (so possibly from close()
 * itself). An exception it raises propagates out of that method once every
 * pending ending has been reported.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include "engine.h"

typedef struct {
    PyObject_HEAD
    engine e;
    PyObject *on_end;
    int ready;
    const char *why; /* why io_uring was not used, when it was asked for */
} EngineObject;

/* Report every ended tunnel; returns 0, or -1 with the first callback error set. */
static int report_ended(EngineObject *self) {
    PyObject *et = NULL, *ev = NULL, *tb = NULL;
    uint32_t slot;
    while ((slot = eng_pop_ended(&self->e)) != ENG_NONE) {
        eng_tunnel *t = &self->e.t[slot];
        PyObject *token = (PyObject *)t->token;
        unsigned long long up = t->s[0].nbytes, down = t->s[1].nbytes;
        eng_release(&self->e, slot);
        if (self->on_end != Py_None) {
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
    if (self->ready) {
        for (uint32_t slot = 0; slot < self->e.cap; slot++)
            if (self->e.t[slot].flags & 0x01 /* T_USED */)
                Py_XDECREF((PyObject *)self->e.t[slot].token);
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
    Py_INCREF(token);
    eng_clock(&self->e);
    int64_t id = eng_open(&self->e, cfd, ofd, tc.buf, (size_t)tc.len, to.buf, (size_t)to.len, token);
    if (id >= 0)
        eng_flush(&self->e);
    PyBuffer_Release(&tc);
    PyBuffer_Release(&to);
    if (id < 0) {
        Py_DECREF(token);
        errno = (int)-id;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (report_ended(self) < 0)
        return NULL;
    return PyLong_FromLongLong(id);
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

static PyMethodDef Engine_methods[] = {
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The epoll descriptor (for loop.add_reader)."},
    {"poll", (PyCFunction)Engine_poll, METH_VARARGS, "poll(maxevents=256) -> events handled; never waits."},
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
    {"fallback_reason", (getter)Engine_get_why, NULL, "why io_uring was asked for and not used, or None", NULL},
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
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
