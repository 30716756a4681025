/* HTTP/1.1 message heads in C (see http_head.h): each function follows the
 * Python function named beside it in relay/http_head.py or relay/headers.py,
 * step for step and in the same order, so the first error found is the same
 * error; the regular expressions there are spelled out as character classes.
 */
#define _GNU_SOURCE
#include "http_head.h"

#include <stdlib.h>
#include <string.h>

static const char BAD[] = "bad_request", ORIGIN[] = "origin_error";

/* character classes: 1 token (RFC 9110 §5.6.2), 2 bad in a value, 4 bad in a
 * target, 8 reg-name of a Host, 16 hex/':'/'.' of an IP literal */
static unsigned char cls[256];
static int cls_ready;

static void init_classes(void) {
    const char *tchar = "!#$%&'*+-.^_`|~";
    const char *regname = "-._~!$&'()*+,;=%";
    for (int c = 0; c < 256; c++) {
        unsigned char f = 0;
        int alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        if (alnum || (c && strchr(tchar, c)))
            f |= 1;
        if ((c <= 0x08) || (c >= 0x0a && c <= 0x1f) || c == 0x7f)
            f |= 2;
        if (c <= 0x20 || c == '#' || c == 0x7f)
            f |= 4;
        if (alnum || (c && strchr(regname, c)))
            f |= 8;
        if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') || c == ':' || c == '.')
            f |= 16;
        cls[c] = f;
    }
    cls_ready = 1;
}

static inline int all_of(const char *s, size_t n, unsigned char f) {
    for (size_t i = 0; i < n; i++)
        if (!(cls[(unsigned char)s[i]] & f))
            return 0;
    return 1;
}

static inline int any_of(const char *s, size_t n, unsigned char f) {
    for (size_t i = 0; i < n; i++)
        if (cls[(unsigned char)s[i]] & f)
            return 1;
    return 0;
}

static inline char lower(char c) { return (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c; }

/* case-insensitive, both sides */
static int eq_ci(const char *a, size_t an, const char *b, size_t bn) {
    if (an != bn)
        return 0;
    for (size_t i = 0; i < an; i++)
        if (lower(a[i]) != lower(b[i]))
            return 0;
    return 1;
}

/* s (any case) equals lname (lowercase) */
static int eq_lower(const char *s, size_t n, const char *lname, size_t ln) {
    if (n != ln)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (lower(s[i]) != lname[i])
            return 0;
    return 1;
}

/* buf.find(needle, from, to): -1 when absent. The needles are line ends
 * (CRLF, CRLF CRLF, LF LF), whose first byte is rare in a head: memchr to
 * each candidate and compare the rest, rather than glibc memmem's per-call
 * set-up (a dozen calls per head parsed, the hottest libc symbol per cycle). */
static int64_t find(const char *buf, size_t from, size_t to, const char *needle, size_t nl) {
    if (nl == 0 || to < from + nl)
        return nl == 0 && from <= to ? (int64_t)from : -1;
    const char *p = buf + from, *last = buf + to - nl; /* the last place a match can start */
    while (p <= last) {
        p = memchr(p, needle[0], (size_t)(last - p) + 1);
        if (!p)
            return -1;
        if (memcmp(p + 1, needle + 1, nl - 1) == 0)
            return (int64_t)(p - buf);
        p++;
    }
    return -1;
}

static int fail(hh_head *h, int status, const char *reason, const char *outcome) {
    h->status = status;
    h->reason = reason;
    h->outcome = outcome;
    return HH_ERROR;
}

/* -- _head_bounds ------------------------------------------------------------------- */

enum { B_NEED, B_OK, B_BARE_LF, B_SIZE };

static size_t skip_crlf(const char *buf, size_t len) {
    size_t start = 0;
    while (start + 2 <= len && buf[start] == '\r' && buf[start + 1] == '\n')
        start += 2;
    return start;
}

static int bounds(const char *buf, size_t len, size_t max_bytes, size_t *start, int64_t *end) {
    *start = skip_crlf(buf, len);
    *end = find(buf, *start, len, "\r\n\r\n", 4);
    if (find(buf, *start, *end >= 0 ? (size_t)*end : len, "\n\n", 2) >= 0)
        return B_BARE_LF;
    if (*end < 0)
        return len > max_bytes ? B_SIZE : B_NEED;
    if ((size_t)*end + 4 > max_bytes)
        return B_SIZE;
    return B_OK;
}

/* -- _fields ------------------------------------------------------------------------- */

static int split_fields(const char *buf, size_t from, size_t end, hh_head *h, int who) {
    const char *outcome = who == 400 ? BAD : ORIGIN;
    uint32_t n = 1; /* lines: one more than the CRLFs between them */
    for (int64_t k = (int64_t)from; (k = find(buf, (size_t)k, end, "\r\n", 2)) >= 0; k += 2)
        n++;
    h->fields = calloc(n, sizeof *h->fields);
    if (!h->fields)
        return fail(h, 500, "out of memory", outcome);
    size_t a = from;
    for (;;) {
        int64_t e = find(buf, a, end, "\r\n", 2);
        size_t b = e >= 0 ? (size_t)e : end;
        const char *line = buf + a;
        const char *colon = memchr(line, ':', b - a);
        if (!colon || colon == line || !all_of(line, (size_t)(colon - line), 1))
            return fail(h, who, "malformed header line", outcome);
        size_t vs = (size_t)(colon - buf) + 1, ve = b;
        while (vs < ve && (buf[vs] == ' ' || buf[vs] == '\t'))
            vs++;
        while (ve > vs && (buf[ve - 1] == ' ' || buf[ve - 1] == '\t'))
            ve--;
        if (any_of(buf + vs, ve - vs, 2))
            return fail(h, who, "control character in a header value", outcome);
        hh_field *f = &h->fields[h->nfields++];
        f->name = (hh_span){(uint32_t)a, (uint32_t)(colon - line)};
        f->line = (hh_span){(uint32_t)a, (uint32_t)(b - a)};
        f->value = (hh_span){(uint32_t)vs, (uint32_t)(ve - vs)};
        if (e < 0)
            break;
        a = b + 2;
    }
    return HH_OK;
}

/* -- _HOST ---------------------------------------------------------------------------- */

static int host_ok(const char *s, size_t n) {
    size_t i = 0;
    if (n && s[0] == '[') {
        size_t j = 1;
        while (j < n && (cls[(unsigned char)s[j]] & 16))
            j++;
        if (j == 1 || j >= n || s[j] != ']')
            return 0;
        i = j + 1;
    } else {
        while (i < n && (cls[(unsigned char)s[i]] & 8))
            i++;
        if (i == 0)
            return 0;
    }
    if (i < n) {
        if (s[i] != ':')
            return 0;
        for (i++; i < n; i++)
            if (s[i] < '0' || s[i] > '9')
                return 0;
    }
    return 1;
}

/* -- parse_request_head --------------------------------------------------------------- */

static int origin_form(const char *buf, hh_head *h) {
    const char *t = buf + h->target.off;
    size_t n = h->target.len;
    if (t[0] == '/')
        return HH_OK;
    if (n == 1 && t[0] == '*' && h->method.len == 7 && memcmp(buf + h->method.off, "OPTIONS", 7) == 0)
        return HH_OK;
    static const char *schemes[] = {"http://", "https://", "ws://", "wss://"};
    char low[8];
    size_t ln = n < 8 ? n : 8;
    for (size_t i = 0; i < ln; i++)
        low[i] = lower(t[i]);
    for (int s = 0; s < 4; s++) {
        size_t sl = strlen(schemes[s]);
        if (ln < sl || memcmp(low, schemes[s], sl) != 0)
            continue;
        size_t rs = h->target.off + sl, rn = n - sl;
        const char *rest = buf + rs;
        const char *slash = memchr(rest, '/', rn), *q = memchr(rest, '?', rn);
        const char *cut = slash && q ? (slash < q ? slash : q) : (slash ? slash : q);
        size_t alen = cut ? (size_t)(cut - rest) : rn;
        if (!host_ok(rest, alen))
            return fail(h, 400, "malformed authority in the request target", BAD);
        h->has_authority = 1;
        h->authority = (hh_span){(uint32_t)rs, (uint32_t)alen};
        if (!cut) {
            h->slash = 1;
            h->target = (hh_span){(uint32_t)(rs + rn), 0};
        } else {
            h->target = (hh_span){(uint32_t)(rs + alen), (uint32_t)(rn - alen)};
            h->slash = *cut != '/';
        }
        return HH_OK;
    }
    return fail(h, 400, "malformed request target", BAD);
}

int hh_request_ready(const char *buf, size_t len, size_t max_bytes) {
    size_t start;
    int64_t end;
    return bounds(buf, len, max_bytes, &start, &end) == B_NEED ? HH_NEED : HH_OK;
}

int hh_request(const char *buf, size_t len, size_t max_bytes, hh_head *h) {
    if (!cls_ready)
        init_classes();
    memset(h, 0, sizeof *h);
    size_t start;
    int64_t end;
    int b = bounds(buf, len, max_bytes, &start, &end);
    if (b == B_BARE_LF || b == B_SIZE) {
        /* the request line alone does not fit: 414, as nginx answers */
        int64_t eol = find(buf, start, len, "\r\n", 2);
        if ((int64_t)((eol >= 0 ? (size_t)eol : len) - start) > (int64_t)max_bytes - 4)
            return fail(h, 414, "request target too long", BAD);
        return b == B_BARE_LF ? fail(h, 400, "bare LF in the head", BAD)
                              : fail(h, 431, "request head too large", BAD);
    }
    if (b == B_NEED)
        return HH_NEED;
    size_t e = (size_t)end;
    int64_t eol1 = find(buf, start, e, "\r\n", 2);
    size_t le = eol1 >= 0 ? (size_t)eol1 : e;
    const char *line = buf + start;
    size_t n = le - start;
    const char *sp1 = memchr(line, ' ', n);
    const char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(line + n - sp1 - 1)) : NULL;
    if (!sp2 || memchr(sp2 + 1, ' ', (size_t)(line + n - sp2 - 1)))
        return fail(h, 400, "malformed request line", BAD);
    h->method = (hh_span){(uint32_t)start, (uint32_t)(sp1 - line)};
    h->target = (hh_span){(uint32_t)(sp1 + 1 - buf), (uint32_t)(sp2 - sp1 - 1)};
    const char *v = sp2 + 1;
    size_t vn = (size_t)(line + n - v);
    if (!h->method.len || !all_of(buf + h->method.off, h->method.len, 1) || !h->target.len ||
        any_of(buf + h->target.off, h->target.len, 4))
        return fail(h, 400, "malformed request line", BAD);
    if (vn != 8 || memcmp(v, "HTTP/", 5) != 0 || v[5] < '0' || v[5] > '9' || v[6] != '.' || v[7] < '0' || v[7] > '9')
        return fail(h, 400, "malformed HTTP version", BAD);
    if (v[5] != '1')
        return fail(h, 505, "HTTP version not supported", BAD);
    h->http10 = v[7] == '0';
    if (h->method.len == 7 && memcmp(buf + h->method.off, "CONNECT", 7) == 0)
        return fail(h, 400, "CONNECT is not relayed: wsrelay is not a forward proxy", BAD);
    if (origin_form(buf, h) != HH_OK)
        return HH_ERROR;
    const char *q = memchr(buf + h->target.off, '?', h->target.len);
    h->path = (hh_span){h->target.off, q ? (uint32_t)(q - (buf + h->target.off)) : h->target.len};
    if (eol1 >= 0 && split_fields(buf, le + 2, e, h, 400) != HH_OK)
        return HH_ERROR;
    if (eol1 < 0 && !(h->fields = calloc(1, sizeof *h->fields)))
        return fail(h, 500, "out of memory", BAD);
    int hosts = 0;
    const hh_field *host = NULL;
    for (uint32_t k = 0; k < h->nfields; k++)
        if (eq_lower(buf + h->fields[k].name.off, h->fields[k].name.len, "host", 4) && !hosts++)
            host = &h->fields[k];
    if (hosts > 1 || (!h->http10 && !hosts))
        return fail(h, 400, "a request needs exactly one Host header", BAD);
    if (host && !host_ok(buf + host->value.off, host->value.len))
        return fail(h, 400, "invalid Host", BAD);
    h->head_len = (uint32_t)e + 4;
    return HH_OK;
}

/* -- parse_response_head --------------------------------------------------------------- */

/* _STATUS_LINE: HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [^\x00-\x08\x0a-\x1f\x7f]*)?\Z */
static int status_line(const char *s, size_t n, int *code, int *http10) {
    if (n < 12 || memcmp(s, "HTTP/1.", 7) != 0 || (s[7] != '0' && s[7] != '1') || s[8] != ' ' || s[9] < '1' ||
        s[9] > '5' || s[10] < '0' || s[10] > '9' || s[11] < '0' || s[11] > '9')
        return 0;
    if (n > 12 && (s[12] != ' ' || any_of(s + 13, n - 13, 2)))
        return 0;
    *code = (s[9] - '0') * 100 + (s[10] - '0') * 10 + (s[11] - '0');
    *http10 = s[7] == '0';
    return 1;
}

/* _check_status_start: an answer that cannot become a status line is refused at once */
static int status_start_bad(const char *buf, size_t len) {
    size_t n9 = len < 9 ? len : 9;
    if (memcmp(buf, "HTTP/1.1 ", n9) != 0 && memcmp(buf, "HTTP/1.0 ", n9) != 0)
        return 1;
    const char *nl = memchr(buf, '\n', len);
    if (nl) {
        int code, http10;
        size_t eol = (size_t)(nl - buf);
        if (eol == 0 || buf[eol - 1] != '\r' || !status_line(buf, eol - 1, &code, &http10))
            return 1;
    }
    return 0;
}

int hh_response_ready(const char *buf, size_t len, size_t max_bytes) {
    size_t start;
    int64_t end;
    if (bounds(buf, len, max_bytes, &start, &end) != B_NEED)
        return HH_OK;
    if (!cls_ready)
        init_classes();
    return status_start_bad(buf, len) ? HH_OK : HH_NEED;
}

int hh_response(const char *buf, size_t len, size_t max_bytes, hh_head *h) {
    if (!cls_ready)
        init_classes();
    memset(h, 0, sizeof *h);
    size_t start;
    int64_t end;
    int b = bounds(buf, len, max_bytes, &start, &end);
    if (b == B_BARE_LF)
        return fail(h, 502, "bare LF in the head", ORIGIN);
    if (b == B_SIZE)
        return fail(h, 502, "origin response head too large", ORIGIN);
    if (b == B_NEED)
        return status_start_bad(buf, len) ? fail(h, 502, "malformed origin status line", ORIGIN) : HH_NEED;
    if (start)
        return fail(h, 502, "origin response starts with empty lines", ORIGIN);
    size_t e = (size_t)end;
    int64_t eol1 = find(buf, 0, e, "\r\n", 2);
    size_t le = eol1 >= 0 ? (size_t)eol1 : e;
    if (!status_line(buf, le, &h->code, &h->http10))
        return fail(h, 502, "malformed origin status line", ORIGIN);
    if (eol1 >= 0 && split_fields(buf, le + 2, e, h, 502) != HH_OK)
        return HH_ERROR;
    if (eol1 < 0 && !(h->fields = calloc(1, sizeof *h->fields)))
        return fail(h, 500, "out of memory", ORIGIN);
    h->head_len = (uint32_t)e + 4;
    return HH_OK;
}

void hh_free(hh_head *h) {
    free(h->fields);
    h->fields = NULL;
    h->nfields = 0;
}

/* -- Head.get, Head.tokens ----------------------------------------------------------- */

const hh_field *hh_get(const char *buf, const hh_head *h, const char *lname, size_t n, uint32_t from) {
    for (uint32_t k = from; k < h->nfields; k++)
        if (eq_lower(buf + h->fields[k].name.off, h->fields[k].name.len, lname, n))
            return &h->fields[k];
    return NULL;
}

/* Calls fn(token, len, arg) for each token of the header lname (stripped, may be
 * empty: callers skip those); stops when fn returns nonzero and returns that. */
static int each_token(const char *buf, const hh_head *h, const char *lname, size_t n,
                      int (*fn)(const char *, size_t, void *), void *arg) {
    for (uint32_t k = 0; k < h->nfields; k++) {
        const hh_field *f = &h->fields[k];
        if (!eq_lower(buf + f->name.off, f->name.len, lname, n))
            continue;
        const char *v = buf + f->value.off, *end = v + f->value.len;
        for (;;) {
            const char *comma = memchr(v, ',', (size_t)(end - v));
            const char *a = v, *b = comma ? comma : end;
            while (a < b && (*a == ' ' || *a == '\t'))
                a++;
            while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
                b--;
            if (b > a) {
                int r = fn(a, (size_t)(b - a), arg);
                if (r)
                    return r;
            }
            if (!comma)
                break;
            v = comma + 1;
        }
    }
    return 0;
}

struct tok_arg {
    const char *tok;
    size_t n;
};

static int tok_eq(const char *t, size_t n, void *arg) {
    struct tok_arg *a = arg;
    return eq_lower(t, n, a->tok, a->n);
}

int hh_has_token(const char *buf, const hh_head *h, const char *lname, size_t n, const char *tok, size_t tn) {
    struct tok_arg a = {tok, tn};
    return each_token(buf, h, lname, n, tok_eq, &a);
}

/* -- headers.forward_head -------------------------------------------------------------- */

static const struct {
    const char *s;
    size_t n;
} HOP_BY_HOP[] = {{"connection", 10}, {"keep-alive", 10}, {"proxy-connection", 16}, {"te", 2},
                  {"transfer-encoding", 17}, {"upgrade", 7}},
  FORWARDED[] = {{"x-forwarded-for", 15}, {"x-forwarded-proto", 17}, {"x-forwarded-host", 16}, {"x-request-id", 12}},
  NEVER_NAMED[] = {{"host", 4}, {"content-length", 14}, {"transfer-encoding", 17}, {"sec-websocket-key", 17},
                   {"sec-websocket-version", 21}};

#define IN(set, s, n) in_set(set, sizeof set / sizeof set[0], s, n)

static int in_set(const void *set_, size_t count, const char *s, size_t n) {
    const struct {
        const char *s;
        size_t n;
    } *set = set_;
    for (size_t i = 0; i < count; i++)
        if (eq_lower(s, n, set[i].s, set[i].n))
            return 1;
    return 0;
}

struct named_arg {
    const char *name;
    size_t n;
};

/* a Connection token equal to this field's name, and not one of NEVER_NAMED */
static int names_it(const char *t, size_t n, void *arg) {
    struct named_arg *a = arg;
    return eq_ci(a->name, a->n, t, n);
}

/* name.replace("_", "-") in NO_UNDERSCORE (= FORWARDED | HOP_BY_HOP | content-length) */
static int underscore_spelling(const char *s, size_t n) {
    if (!memchr(s, '_', n) || n > 32)
        return 0;
    char d[32];
    for (size_t i = 0; i < n; i++)
        d[i] = s[i] == '_' ? '-' : lower(s[i]);
    return IN(FORWARDED, d, n) || IN(HOP_BY_HOP, d, n) || eq_lower(d, n, "content-length", 14);
}

size_t hh_forward_size(const hh_head *h, size_t ip_len, size_t proto_len, size_t rid_len, size_t dhost_len) {
    /* every line at most once, Host and X-Forwarded-Host from a value, X-Forwarded-For the values joined */
    return 3 * (size_t)h->head_len + 2 * (size_t)h->nfields + ip_len + proto_len + rid_len + dhost_len + 256;
}

#define PUT(p, s, n) (memcpy((p), (s), (n)), (p) += (n))
#define PUTS(p, lit) PUT(p, lit, sizeof lit - 1)

size_t hh_forward(const char *buf, const hh_head *h, const char *ip, size_t ip_len, const char *proto,
                  size_t proto_len, int upgrade, const char *rid, size_t rid_len, const char *dhost,
                  size_t dhost_len, int trusted, char *out) {
    char *p = out;
    PUT(p, buf + h->method.off, h->method.len);
    PUTS(p, " ");
    if (h->slash)
        PUTS(p, "/");
    PUT(p, buf + h->target.off, h->target.len);
    PUTS(p, " HTTP/1.1\r\n");
    const hh_field *host = NULL;
    uint32_t nxff = 0;
    for (uint32_t k = 0; k < h->nfields; k++) {
        const hh_field *f = &h->fields[k];
        const char *name = buf + f->name.off;
        size_t n = f->name.len;
        struct named_arg na = {name, n};
        int drop = IN(HOP_BY_HOP, name, n) || IN(FORWARDED, name, n) ||
                   (!IN(NEVER_NAMED, name, n) && each_token(buf, h, "connection", 10, names_it, &na));
        if (drop) {
            if (eq_lower(name, n, "x-forwarded-for", 15))
                nxff += trusted != 0; /* only a trusted proxy's list is kept (nginx's set_real_ip_from) */
            else if ((upgrade && eq_lower(name, n, "upgrade", 7)) ||
                     (!upgrade && eq_lower(name, n, "transfer-encoding", 17))) {
                PUT(p, buf + f->line.off, f->line.len);
                PUTS(p, "\r\n");
            }
            continue;
        }
        if (underscore_spelling(name, n))
            continue;
        if (eq_lower(name, n, "host", 4)) {
            if (h->has_authority)
                continue;
            host = f;
        }
        PUT(p, buf + f->line.off, f->line.len);
        PUTS(p, "\r\n");
    }
    const char *hv = NULL;
    size_t hn = 0;
    if (h->has_authority) {
        hv = buf + h->authority.off;
        hn = h->authority.len;
        PUTS(p, "Host: ");
        PUT(p, hv, hn);
        PUTS(p, "\r\n");
    } else if (host) {
        hv = buf + host->value.off;
        hn = host->value.len;
    } else {
        PUTS(p, "Host: ");
        PUT(p, dhost, dhost_len);
        PUTS(p, "\r\n");
    }
    PUTS(p, "X-Forwarded-For: ");
    if (nxff) {
        for (uint32_t k = 0; k < h->nfields; k++) {
            const hh_field *f = &h->fields[k];
            if (eq_lower(buf + f->name.off, f->name.len, "x-forwarded-for", 15)) {
                PUT(p, buf + f->value.off, f->value.len);
                PUTS(p, ", ");
            }
        }
    }
    PUT(p, ip, ip_len);
    PUTS(p, "\r\nX-Forwarded-Proto: ");
    PUT(p, proto, proto_len);
    PUTS(p, "\r\n");
    if (hv && hn) {
        PUTS(p, "X-Forwarded-Host: ");
        PUT(p, hv, hn);
        PUTS(p, "\r\n");
    }
    if (rid_len) {
        PUTS(p, "X-Request-ID: ");
        PUT(p, rid, rid_len);
        PUTS(p, "\r\n");
    }
    if (upgrade)
        PUTS(p, "Connection: Upgrade\r\n\r\n");
    else
        PUTS(p, "Connection: keep-alive\r\n\r\n");
    return (size_t)(p - out);
}
