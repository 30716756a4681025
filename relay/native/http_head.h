/* HTTP/1.1 message heads in C, sans-I/O: the compiled twin of relay/http_head.py
 * (the reference) and of relay/headers.py's forward_head. Bytes in; a head,
 * "need more bytes" or an error (the status and reason the reference raises)
 * out. Every result is the reference's, byte for byte: tests/unit/
 * test_native_head.py fuzzes the two against each other with the invariants
 * of tests/fuzz/invariants.py. Nothing here decides anything: it splits.
 */
#ifndef WSRELAY_HTTP_HEAD_H
#define WSRELAY_HTTP_HEAD_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t off, len;
} hh_span;

typedef struct {
    hh_span name;  /* as sent (a token; compared case-insensitively) */
    hh_span line;  /* the whole line, without its CRLF */
    hh_span value; /* without surrounding SP/HTAB */
} hh_field;

enum { HH_ERROR = -1, HH_NEED = 0, HH_OK = 1 };

typedef struct {
    /* HH_ERROR: what the reference raises (relay/errors.HeadError) */
    int status;
    const char *reason;
    const char *outcome; /* "bad_request" or "origin_error" */
    /* HH_OK */
    uint32_t head_len;   /* bytes of the buffer the head took, terminator included */
    hh_span method;
    hh_span target;      /* origin-form target: `slash` then these bytes */
    hh_span path;        /* the target without its query: `slash` then these bytes */
    int slash;           /* an absolute-form target rewritten to "/" + target */
    int has_authority;
    hh_span authority;   /* host[:port] of an absolute-form target (RFC 9112 §3.2.2) */
    int http10;          /* HTTP/1.0 (else 1.1) */
    int code;            /* a response's status */
    hh_field *fields;    /* malloc'd: hh_free() */
    uint32_t nfields;
} hh_head;

/* relay.http_head.parse_request_head / parse_response_head. */
int hh_request(const char *buf, size_t len, size_t max_bytes, hh_head *h);
int hh_response(const char *buf, size_t len, size_t max_bytes, hh_head *h);
/* Whether parsing buf would give an answer (complete head or error) yet:
 * HH_NEED, or HH_OK meaning "parse now" (cheap: no fields are split). */
int hh_request_ready(const char *buf, size_t len, size_t max_bytes);
int hh_response_ready(const char *buf, size_t len, size_t max_bytes);
void hh_free(hh_head *h);

/* Head.get(lname): the first value of that header, or NULL (lname lowercase). */
const hh_field *hh_get(const char *buf, const hh_head *h, const char *lname, size_t n, uint32_t from);
/* Whether any comma-separated token of that header equals tok (lowercase). */
int hh_has_token(const char *buf, const hh_head *h, const char *lname, size_t n, const char *tok, size_t tn);

/* relay.headers.forward_head: the request head for the origin, into out
 * (at least hh_forward_size() bytes); returns its length. trusted: the client
 * is in RELAY_TRUSTED_PROXIES, so its X-Forwarded-For is kept and appended to
 * (else replaced). */
size_t hh_forward_size(const hh_head *h, size_t ip_len, size_t proto_len, size_t rid_len, size_t dhost_len);
size_t hh_forward(const char *buf, const hh_head *h, const char *ip, size_t ip_len, const char *proto,
                  size_t proto_len, int upgrade, const char *rid, size_t rid_len, const char *dhost,
                  size_t dhost_len, int trusted, char *out);

#endif
