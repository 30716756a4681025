/* The access log's line for a tunnel the fast path opened (README "Logs";
 * fast_path.h), sans-I/O: the same JSON object relay/logs.py writes for one
 * Python opened, field for field and in AccessRecord's order, so a reader
 * (jq, a log shipper, tests/system/relay/test_access_log.py) cannot tell
 * them apart.
 *
 * Built in two steps so an open tunnel holds only what its line needs: at
 * the 101, al_open() formats every field known then into one allocation
 * (an al_record); when the tunnel ends, al_iov() puts the time, duration and
 * byte counts around it for one writev(2) on stdout, as AccessLog.write
 * makes one os.write per line.
 *
 * Strings are relay/logs.py _text()'s: the first 512 bytes (32 of the
 * method), read as latin-1, so any byte is logged and none breaks the line;
 * escaped as RFC 8259 §7 asks (quote, backslash and C0 controls; msgspec,
 * which encodes Python's lines, writes the same characters).
 */
#ifndef WSRELAY_ACCESS_LOG_H
#define WSRELAY_ACCESS_LOG_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/* relay/logs.py _text()'s limits */
#define AL_TEXT_LIMIT 512
#define AL_METHOD_LIMIT 32

typedef struct {
    const char *s;
    size_t n;
} al_str;

/* What a fast-path upgrade's line says besides the time, duration and bytes. */
typedef struct {
    int worker;
    al_str client, method, path, origin, pool, user_agent, request_id, tls_version;
    /* X-Forwarded-For as relay/headers.py x_forwarded_for() gives it: each
     * line's value, in order, joined by ", " */
    const al_str *xff;
    uint32_t nxff;
    double handshake_ms;
    int tls_resumed;
} al_fields;

typedef struct {
    uint32_t split; /* text[0:split]: worker .. handshake_ms; text[split:len]: origin .. the end, "}\n" */
    uint32_t len;
    char text[];
} al_record;

/* The JSON string (quotes included) of the first `limit` bytes of s read as
 * latin-1, into out (room for al_string_size(n, limit)); returns its length. */
size_t al_string(char *out, const char *s, size_t n, size_t limit);
size_t al_string_size(size_t n, size_t limit);

/* A JSON number as Python's repr of round(v, 3) reads (a finite v): the
 * shortest of "%.3f" that keeps one decimal ("12.0", "0.125"); returns its length. */
size_t al_number(char *out, double v);

/* The record for f (malloc'd; free() it), or NULL out of memory. */
al_record *al_open(const al_fields *f);

/* The line: {"time":..., r's first part, duration and bytes, r's second
 * part, as four iovecs into r and scratch;
 * `now` is seconds since the epoch (CLOCK_REALTIME). Returns iovcnt. */
#define AL_SCRATCH 256
int al_iov(const al_record *r, double now, double duration_s, uint64_t up, uint64_t down,
           char scratch[AL_SCRATCH], struct iovec iov[4]);

#endif
