/* The CPython face of http_head.c: parsed heads as read-only views that answer
 * what relay.http_head.Request and Response answer (method, target, path,
 * version, authority, head_len, status, fields, get, get_all, tokens), so the
 * Python code that decides (relay/gate.py, relay/handshake.py) runs on them
 * unchanged; and the module functions
 *
 *   parse_request_head(buf, max_bytes) -> Request | None      (raises relay.errors.HeadError)
 *   parse_response_head(buf, max_bytes) -> Response | None
 *   forward_head(req, client_ip, proto, upgrade, request_id=b"", default_host=b"localhost") -> bytes
 *
 * with the signatures and results of their Python references, for the fuzz
 * that compares the two (tests/unit/test_native_head.py). A view holds a copy
 * of the head's bytes and the offsets of its parts; each attribute is made
 * the first time it is read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_heads.h"
#include "fast_path.h"

typedef struct {
    PyObject_HEAD
    PyObject *raw;     /* bytes: the head (head_len bytes, leading CRLFs included) */
    hh_head h;
    PyObject *method, *target, *path, *authority, *fields;
} HeadObject;

static PyTypeObject RequestType, ResponseType;
static PyObject *V11, *V10; /* b"1.1", b"1.0" */

static inline const char *RAW(HeadObject *o) { return PyBytes_AS_STRING(o->raw); }

static PyObject *span_bytes(HeadObject *o, hh_span s, int slash) {
    if (!slash)
        return PyBytes_FromStringAndSize(RAW(o) + s.off, s.len);
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)s.len + 1);
    if (b) {
        PyBytes_AS_STRING(b)[0] = '/';
        memcpy(PyBytes_AS_STRING(b) + 1, RAW(o) + s.off, s.len);
    }
    return b;
}

static PyObject *cached(PyObject **slot, PyObject *value) {
    if (!*slot)
        *slot = value;
    else
        Py_XDECREF(value);
    Py_XINCREF(*slot);
    return *slot;
}

static PyObject *Head_method(HeadObject *o, void *c) {
    return o->method ? Py_NewRef(o->method) : cached(&o->method, span_bytes(o, o->h.method, 0));
}
static PyObject *Head_target(HeadObject *o, void *c) {
    return o->target ? Py_NewRef(o->target) : cached(&o->target, span_bytes(o, o->h.target, o->h.slash));
}
static PyObject *Head_path(HeadObject *o, void *c) {
    return o->path ? Py_NewRef(o->path) : cached(&o->path, span_bytes(o, o->h.path, o->h.slash));
}
static PyObject *Head_authority(HeadObject *o, void *c) {
    if (!o->h.has_authority)
        Py_RETURN_NONE;
    return o->authority ? Py_NewRef(o->authority) : cached(&o->authority, span_bytes(o, o->h.authority, 0));
}
static PyObject *Head_version(HeadObject *o, void *c) { return Py_NewRef(o->h.http10 ? V10 : V11); }
static PyObject *Head_head_len(HeadObject *o, void *c) { return PyLong_FromUnsignedLong(o->h.head_len); }
static PyObject *Head_status(HeadObject *o, void *c) { return PyLong_FromLong(o->h.code); }

/* bytes(s).lower(): built fresh (never lowercasing a cached one-byte bytes in place) */
static PyObject *lower_bytes(const char *s, Py_ssize_t n) {
    PyObject *b = PyBytes_FromStringAndSize(NULL, n);
    if (!b)
        return NULL;
    char *p = PyBytes_AS_STRING(b);
    for (Py_ssize_t i = 0; i < n; i++)
        p[i] = (s[i] >= 'A' && s[i] <= 'Z') ? (char)(s[i] + 32) : s[i];
    return b;
}

static PyObject *field_tuple(HeadObject *o, const hh_field *f) {
    PyObject *name = lower_bytes(RAW(o) + f->name.off, f->name.len);
    if (!name)
        return NULL;
    return Py_BuildValue("(Ny#y#)", name, RAW(o) + f->line.off, (Py_ssize_t)f->line.len, RAW(o) + f->value.off,
                         (Py_ssize_t)f->value.len);
}

static PyObject *Head_fields(HeadObject *o, void *c) {
    if (o->fields)
        return Py_NewRef(o->fields);
    PyObject *list = PyList_New(o->h.nfields);
    if (!list)
        return NULL;
    for (uint32_t k = 0; k < o->h.nfields; k++) {
        PyObject *t = field_tuple(o, &o->h.fields[k]);
        if (!t) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, t);
    }
    return cached(&o->fields, list);
}

static int lname_arg(PyObject *arg, const char **s, Py_ssize_t *n) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "a header name is bytes (lowercase)");
        return -1;
    }
    *s = PyBytes_AS_STRING(arg);
    *n = PyBytes_GET_SIZE(arg);
    return 0;
}

static PyObject *value_of(HeadObject *o, const hh_field *f) {
    return PyBytes_FromStringAndSize(RAW(o) + f->value.off, f->value.len);
}

static PyObject *Head_get(HeadObject *o, PyObject *arg) {
    const char *s;
    Py_ssize_t n;
    if (lname_arg(arg, &s, &n) < 0)
        return NULL;
    const hh_field *f = hh_get(RAW(o), &o->h, s, (size_t)n, 0);
    if (!f)
        Py_RETURN_NONE;
    return value_of(o, f);
}

static PyObject *Head_get_all(HeadObject *o, PyObject *arg) {
    const char *s;
    Py_ssize_t n;
    if (lname_arg(arg, &s, &n) < 0)
        return NULL;
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    for (const hh_field *f = hh_get(RAW(o), &o->h, s, (size_t)n, 0); f;
         f = hh_get(RAW(o), &o->h, s, (size_t)n, (uint32_t)(f - o->h.fields) + 1)) {
        PyObject *v = value_of(o, f);
        if (!v || PyList_Append(list, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(v);
    }
    return list;
}

/* Head.tokens: comma-separated, case-insensitive tokens of every line of a header */
static PyObject *Head_tokens(HeadObject *o, PyObject *arg) {
    const char *s;
    Py_ssize_t n;
    if (lname_arg(arg, &s, &n) < 0)
        return NULL;
    PyObject *set = PySet_New(NULL);
    if (!set)
        return NULL;
    for (const hh_field *f = hh_get(RAW(o), &o->h, s, (size_t)n, 0); f;
         f = hh_get(RAW(o), &o->h, s, (size_t)n, (uint32_t)(f - o->h.fields) + 1)) {
        const char *v = RAW(o) + f->value.off, *end = v + f->value.len;
        for (;;) {
            const char *comma = memchr(v, ',', (size_t)(end - v));
            const char *a = v, *b = comma ? comma : end;
            while (a < b && (*a == ' ' || *a == '\t'))
                a++;
            while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
                b--;
            if (b > a) {
                PyObject *t = lower_bytes(a, b - a);
                if (!t) {
                    Py_DECREF(set);
                    return NULL;
                }
                int r = PySet_Add(set, t);
                Py_DECREF(t);
                if (r < 0) {
                    Py_DECREF(set);
                    return NULL;
                }
            }
            if (!comma)
                break;
            v = comma + 1;
        }
    }
    return set;
}

static void Head_dealloc(HeadObject *o) {
    hh_free(&o->h);
    Py_XDECREF(o->raw);
    Py_XDECREF(o->method);
    Py_XDECREF(o->target);
    Py_XDECREF(o->path);
    Py_XDECREF(o->authority);
    Py_XDECREF(o->fields);
    Py_TYPE(o)->tp_free((PyObject *)o);
}

static PyObject *Head_repr(HeadObject *o) {
    if (Py_TYPE(o) == &ResponseType)
        return PyUnicode_FromFormat("<native Response %d, %u fields>", o->h.code, o->h.nfields);
    return PyUnicode_FromFormat("<native Request, %u fields>", o->h.nfields);
}

static PyMethodDef Head_methods[] = {
    {"get", (PyCFunction)Head_get, METH_O, "get(lname) -> the first value of that header, or None"},
    {"get_all", (PyCFunction)Head_get_all, METH_O, "get_all(lname) -> every value of that header"},
    {"tokens", (PyCFunction)Head_tokens, METH_O, "tokens(lname) -> comma-separated lowercase tokens, a set"},
    {NULL, NULL, 0, NULL},
};

/* Request.websocket(): relay/handshake.py's is_upgrade and validate_upgrade
 * in one call, for the head phase in C (tests/unit/test_native_head.py holds
 * it to them): None when the request asks for no WebSocket, the
 * Sec-WebSocket-Key when it is a valid RFC 6455 §4.2.1 upgrade, else the
 * (status, reason) validate_upgrade raises. */
static PyObject *Request_websocket(HeadObject *o, PyObject *Py_UNUSED(ignored)) {
    const hh_field *key;
    int status;
    const char *why;
    int r = fp_websocket(RAW(o), &o->h, &key, &status, &why);
    if (r < 0)
        Py_RETURN_NONE;
    if (r == 0)
        return Py_BuildValue("(is)", status, why);
    return PyBytes_FromStringAndSize(RAW(o) + key->value.off, key->value.len);
}

static PyMethodDef Request_methods[] = {
    {"get", (PyCFunction)Head_get, METH_O, "get(lname) -> the first value of that header, or None"},
    {"get_all", (PyCFunction)Head_get_all, METH_O, "get_all(lname) -> every value of that header"},
    {"tokens", (PyCFunction)Head_tokens, METH_O, "tokens(lname) -> comma-separated lowercase tokens, a set"},
    {"websocket", (PyCFunction)Request_websocket, METH_NOARGS,
     "websocket() -> None (no Upgrade: websocket), the Sec-WebSocket-Key (a valid upgrade, RFC 6455 §4.2.1) "
     "or (status, reason) as relay.handshake.validate_upgrade raises"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Request_getset[] = {
    {"method", (getter)Head_method, NULL, NULL, NULL},
    {"target", (getter)Head_target, NULL, "origin-form target (absolute-form rewritten)", NULL},
    {"path", (getter)Head_path, NULL, "the target without its query", NULL},
    {"version", (getter)Head_version, NULL, "b'1.1' or b'1.0'", NULL},
    {"authority", (getter)Head_authority, NULL, "host[:port] of an absolute-form target, or None", NULL},
    {"head_len", (getter)Head_head_len, NULL, NULL, NULL},
    {"fields", (getter)Head_fields, NULL, "(lowercased name, raw line, value) per header line", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyGetSetDef Response_getset[] = {
    {"status", (getter)Head_status, NULL, NULL, NULL},
    {"version", (getter)Head_version, NULL, "b'1.1' or b'1.0'", NULL},
    {"head_len", (getter)Head_head_len, NULL, NULL, NULL},
    {"fields", (getter)Head_fields, NULL, "(lowercased name, raw line, value) per header line", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RequestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay.native._engine.Request",
    .tp_doc = "A request head parsed in C: relay.http_head.Request's attributes and lookups.",
    .tp_basicsize = sizeof(HeadObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Head_dealloc,
    .tp_repr = (reprfunc)Head_repr,
    .tp_methods = Request_methods,
    .tp_getset = Request_getset,
};

static PyTypeObject ResponseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay.native._engine.Response",
    .tp_doc = "A response head parsed in C: relay.http_head.Response's attributes and lookups.",
    .tp_basicsize = sizeof(HeadObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Head_dealloc,
    .tp_repr = (reprfunc)Head_repr,
    .tp_methods = Head_methods,
    .tp_getset = Response_getset,
};

/* A view over buf's head; hh owned by the view from here (even on failure). */
static PyObject *make_view(PyTypeObject *type, const char *buf, hh_head *hh) {
    HeadObject *o = PyObject_New(HeadObject, type);
    if (!o) {
        hh_free(hh);
        return NULL;
    }
    o->h = *hh;
    o->method = o->target = o->path = o->authority = o->fields = NULL;
    o->raw = PyBytes_FromStringAndSize(buf, hh->head_len);
    if (!o->raw) {
        Py_DECREF(o);
        return NULL;
    }
    return (PyObject *)o;
}

PyObject *heads_view(int response, const char *buf, size_t len, size_t max_bytes, hh_head *err) {
    hh_head hh;
    int r = response ? hh_response(buf, len, max_bytes, &hh) : hh_request(buf, len, max_bytes, &hh);
    if (r != HH_OK) {
        hh_free(&hh);
        if (err)
            *err = hh;
        if (r == HH_NEED && err)
            err->status = 0;
        Py_RETURN_NONE;
    }
    return make_view(response ? &ResponseType : &RequestType, buf, &hh);
}

PyObject *heads_view_parsed(int response, const char *buf, hh_head *hh) {
    return make_view(response ? &ResponseType : &RequestType, buf, hh);
}

int heads_is_request(PyObject *o) { return Py_TYPE(o) == &RequestType; }

const char *heads_raw(PyObject *o, const hh_head **h) {
    *h = &((HeadObject *)o)->h;
    return RAW((HeadObject *)o);
}

static PyObject *head_error(const hh_head *hh) {
    static PyObject *HeadError;
    if (!HeadError) {
        PyObject *m = PyImport_ImportModule("relay.errors");
        if (!m)
            return NULL;
        HeadError = PyObject_GetAttrString(m, "HeadError");
        Py_DECREF(m);
        if (!HeadError)
            return NULL;
    }
    PyObject *e = PyObject_CallFunction(HeadError, "iss", hh->status, hh->reason, hh->outcome);
    if (e) {
        PyErr_SetObject(HeadError, e);
        Py_DECREF(e);
    }
    return NULL;
}

static PyObject *parse(PyObject *args, int response) {
    Py_buffer buf;
    Py_ssize_t max_bytes;
    if (!PyArg_ParseTuple(args, "y*n", &buf, &max_bytes))
        return NULL;
    hh_head err;
    PyObject *r = heads_view(response, buf.buf, (size_t)buf.len, max_bytes < 0 ? 0 : (size_t)max_bytes, &err);
    PyBuffer_Release(&buf);
    if (r == Py_None && err.status) {
        Py_DECREF(r);
        return head_error(&err);
    }
    return r;
}

static PyObject *parse_request_head(PyObject *m, PyObject *args) { return parse(args, 0); }
static PyObject *parse_response_head(PyObject *m, PyObject *args) { return parse(args, 1); }

PyObject *heads_forward(PyObject *req, const char *ip, size_t ip_len, const char *proto, size_t proto_len,
                        int upgrade, const char *rid, size_t rid_len, const char *dhost, size_t dhost_len,
                        int trusted) {
    HeadObject *o = (HeadObject *)req;
    size_t cap = hh_forward_size(&o->h, ip_len, proto_len, rid_len, dhost_len);
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)cap);
    if (!out)
        return NULL;
    size_t n = hh_forward(RAW(o), &o->h, ip, ip_len, proto, proto_len, upgrade, rid, rid_len, dhost, dhost_len,
                          trusted, PyBytes_AS_STRING(out));
    if (_PyBytes_Resize(&out, (Py_ssize_t)n) < 0)
        return NULL;
    return out;
}

static PyObject *forward_head(PyObject *m, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"req", "client_ip", "proto", "upgrade", "request_id", "default_host", "trusted", NULL};
    PyObject *req;
    const char *ip, *proto, *rid = "", *dhost = "localhost";
    Py_ssize_t ip_len, proto_len, rid_len = 0, dhost_len = 9;
    int upgrade, trusted = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!s#y#p|y#y#p", kwlist, &RequestType, &req, &ip, &ip_len, &proto,
                                     &proto_len, &upgrade, &rid, &rid_len, &dhost, &dhost_len, &trusted))
        return NULL;
    return heads_forward(req, ip, (size_t)ip_len, proto, (size_t)proto_len, upgrade, rid, (size_t)rid_len, dhost,
                         (size_t)dhost_len, trusted);
}

static PyMethodDef heads_functions[] = {
    {"parse_request_head", (PyCFunction)parse_request_head, METH_VARARGS,
     "parse_request_head(buf, max_bytes) -> Request | None; raises relay.errors.HeadError (relay.http_head's)"},
    {"parse_response_head", (PyCFunction)parse_response_head, METH_VARARGS,
     "parse_response_head(buf, max_bytes) -> Response | None; raises relay.errors.HeadError"},
    {"forward_head", (PyCFunction)(void (*)(void))forward_head, METH_VARARGS | METH_KEYWORDS,
     "forward_head(req, client_ip, proto, upgrade, request_id=b'', default_host=b'localhost', trusted=False) -> bytes "
     "(relay.headers.forward_head)"},
    {NULL, NULL, 0, NULL},
};

int heads_init(PyObject *module) {
    if (PyType_Ready(&RequestType) < 0 || PyType_Ready(&ResponseType) < 0)
        return -1;
    V11 = PyBytes_FromString("1.1");
    V10 = PyBytes_FromString("1.0");
    if (!V11 || !V10)
        return -1;
    Py_INCREF(&RequestType);
    Py_INCREF(&ResponseType);
    if (PyModule_AddObject(module, "Request", (PyObject *)&RequestType) < 0 ||
        PyModule_AddObject(module, "Response", (PyObject *)&ResponseType) < 0)
        return -1;
    return PyModule_AddFunctions(module, heads_functions);
}
