/* The CPython views of http_head.c's parsed heads (_heads.c), for _engine.c. */
#ifndef WSRELAY_HEADS_PY_H
#define WSRELAY_HEADS_PY_H

#include <Python.h>

#include "http_head.h"

int heads_init(PyObject *module);
/* A Request (response=0) or Response view of the head at the start of buf;
 * None (a new reference) when incomplete or malformed, with *err (if given)
 * holding the error (status 0: incomplete). */
PyObject *heads_view(int response, const char *buf, size_t len, size_t max_bytes, hh_head *err);
/* The view of a head parsed already (hh_request/hh_response gave HH_OK): takes hh. */
PyObject *heads_view_parsed(int response, const char *buf, hh_head *hh);
int heads_is_request(PyObject *o);
/* The bytes and the parse of a view. */
const char *heads_raw(PyObject *o, const hh_head **h);
PyObject *heads_forward(PyObject *req, const char *ip, size_t ip_len, const char *proto, size_t proto_len,
                        int upgrade, const char *rid, size_t rid_len, const char *dhost, size_t dhost_len,
                        int trusted);

#endif
