/* The access log's line for a fast-path tunnel (see access_log.h). */
#include "access_log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char HEX[] = "0123456789abcdef";

size_t al_string_size(size_t n, size_t limit) { return 2 + 6 * (n < limit ? n : limit); }

/* s escaped, without quotes; returns the bytes written. */
static size_t chars(char *out, const char *s, size_t n) {
    char *o = out;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch >= 0x80) { /* latin-1 U+0080..U+00FF in UTF-8 */
            *o++ = (char)(0xC0 | (ch >> 6));
            *o++ = (char)(0x80 | (ch & 0x3F));
        } else if (ch == '"' || ch == '\\') {
            *o++ = '\\';
            *o++ = (char)ch;
        } else if (ch >= 0x20) {
            *o++ = (char)ch;
        } else {
            *o++ = '\\';
            switch (ch) {
            case '\b': *o++ = 'b'; break;
            case '\t': *o++ = 't'; break;
            case '\n': *o++ = 'n'; break;
            case '\f': *o++ = 'f'; break;
            case '\r': *o++ = 'r'; break;
            default:
                memcpy(o, "u00", 3);
                o[3] = HEX[ch >> 4];
                o[4] = HEX[ch & 15];
                o += 5;
            }
        }
    }
    return (size_t)(o - out);
}

size_t al_string(char *out, const char *s, size_t n, size_t limit) {
    out[0] = '"';
    size_t k = 1 + chars(out + 1, s, n < limit ? n : limit);
    out[k] = '"';
    return k + 1;
}

size_t al_number(char *out, double v) {
    int n = snprintf(out, 40, "%.3f", v);
    if (n < 0 || n >= 40) { /* not a duration: never here */
        memcpy(out, "0.0", 3);
        return 3;
    }
    while (n > 2 && out[n - 1] == '0' && out[n - 2] != '.')
        n--;
    return (size_t)n;
}

/* Appends: the fixed parts are literals, the strings escaped. */
#define PUT(lit) (memcpy(o, lit, sizeof lit - 1), o += sizeof lit - 1)
#define STR(v, lim) (o += al_string(o, (v).s, (v).n, lim))

al_record *al_open(const al_fields *f) {
    size_t xff_n = 0;
    for (uint32_t i = 0; i < f->nxff; i++)
        xff_n += f->xff[i].n + (i ? 2 : 0);
    size_t cap = 512 + al_string_size(f->client.n, AL_TEXT_LIMIT) + al_string_size(f->method.n, AL_METHOD_LIMIT) +
                 al_string_size(f->path.n, AL_TEXT_LIMIT) + al_string_size(f->origin.n, AL_TEXT_LIMIT) +
                 al_string_size(f->pool.n, AL_TEXT_LIMIT) + al_string_size(f->user_agent.n, AL_TEXT_LIMIT) +
                 al_string_size(xff_n, AL_TEXT_LIMIT) + al_string_size(f->request_id.n, AL_TEXT_LIMIT) +
                 al_string_size(f->tls_version.n, AL_TEXT_LIMIT);
    al_record *r = malloc(sizeof *r + cap);
    if (!r)
        return NULL;
    char *o = r->text;
    o += snprintf(o, 40, "\"worker\":%d,\"client\":", f->worker);
    STR(f->client, AL_TEXT_LIMIT);
    PUT(",\"method\":");
    STR(f->method, AL_METHOD_LIMIT);
    PUT(",\"path\":");
    STR(f->path, AL_TEXT_LIMIT);
    PUT(",\"status\":101,\"outcome\":\"upgraded\",\"handshake_ms\":");
    o += al_number(o, f->handshake_ms);
    r->split = (uint32_t)(o - r->text);
    PUT(",\"origin\":");
    STR(f->origin, AL_TEXT_LIMIT);
    PUT(",\"pool\":");
    STR(f->pool, AL_TEXT_LIMIT);
    PUT(",\"tries\":1,\"user_agent\":");
    STR(f->user_agent, AL_TEXT_LIMIT);
    PUT(",\"x_forwarded_for\":");
    /* the lines joined, then cut at _text()'s limit, as x_forwarded_for() and _text() do in turn */
    *o++ = '"';
    size_t left = AL_TEXT_LIMIT;
    for (uint32_t i = 0; i < f->nxff && left; i++) {
        if (i) {
            size_t k = left < 2 ? left : 2;
            memcpy(o, ", ", k);
            o += k;
            left -= k;
        }
        size_t k = f->xff[i].n < left ? f->xff[i].n : left;
        o += chars(o, f->xff[i].s, k);
        left -= k;
    }
    *o++ = '"';
    PUT(",\"request_id\":");
    STR(f->request_id, AL_TEXT_LIMIT);
    PUT(",\"data_plane\":\"native\",\"tls_version\":");
    STR(f->tls_version, AL_TEXT_LIMIT);
    if (f->tls_resumed)
        PUT(",\"tls_resumed\":true}\n");
    else
        PUT(",\"tls_resumed\":false}\n");
    r->len = (uint32_t)(o - r->text);
    /* room was for the worst case (every byte escaped as \u00XX): an open
     * tunnel keeps only its line (glibc gives the rest back in place) */
    al_record *fit = realloc(r, sizeof *r + r->len);
    return fit ? fit : r;
}

int al_iov(const al_record *r, double now, double duration_s, uint64_t up, uint64_t down, char scratch[AL_SCRATCH],
           struct iovec iov[4]) {
    time_t sec = (time_t)now;
    int ms = (int)((now - (double)sec) * 1000);
    struct tm tm;
    gmtime_r(&sec, &tm);
    char *o = scratch;
    PUT("{\"time\":\"");
    o += strftime(o, 32, "%Y-%m-%dT%H:%M:%S", &tm);
    o += snprintf(o, 16, ".%03dZ\",", ms < 0 ? 0 : ms > 999 ? 999 : ms);
    iov[0] = (struct iovec){scratch, (size_t)(o - scratch)};
    iov[1] = (struct iovec){(void *)r->text, r->split};
    char *mid = o;
    PUT(",\"duration_s\":");
    o += al_number(o, duration_s);
    o += snprintf(o, 64, ",\"bytes_up\":%llu,\"bytes_down\":%llu", (unsigned long long)up, (unsigned long long)down);
    iov[2] = (struct iovec){mid, (size_t)(o - mid)};
    iov[3] = (struct iovec){(void *)(r->text + r->split), r->len - r->split};
    return 4;
}
