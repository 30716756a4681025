/* The fast path (see fast_path.h): the common upgrade decided from tables
 * Python compiled (relay/native/fast_path.py). Each check here is the plain
 * case of a Python rule, named beside it; whatever is not plain declines,
 * and Python decides it as it always did. */
#include "fast_path.h"

#include <string.h>
#include <time.h>

/* -- RFC 6455 §4.2.1 (relay/handshake.py is_upgrade, validate_upgrade) ----------------- */

/* How many lines of header lname there are, and the first (or NULL). */
static uint32_t count_fields(const char *b, const hh_head *h, const char *lname, size_t n, const hh_field **first) {
    uint32_t count = 0;
    *first = NULL;
    for (const hh_field *f = hh_get(b, h, lname, n, 0); f; f = hh_get(b, h, lname, n, (uint32_t)(f - h->fields) + 1)) {
        if (!count)
            *first = f;
        count++;
    }
    return count;
}

static int span_is(const char *b, hh_span s, const char *lit, size_t n) {
    return s.len == n && memcmp(b + s.off, lit, n) == 0;
}

/* base64 of exactly 16 bytes as base64.b64decode(validate=True) reads it:
 * 22 characters of the alphabet, then "==" (the only form of that length the
 * alphabet-then-padding rule lets through that decodes to 16 bytes) */
static int key_is_16_bytes(const char *v, uint32_t n) {
    if (n != 24 || v[22] != '=' || v[23] != '=')
        return 0;
    for (int i = 0; i < 22; i++) {
        char ch = v[i];
        if (!((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '+' ||
              ch == '/'))
            return 0;
    }
    return 1;
}

int fp_websocket(const char *b, const hh_head *h, const hh_field **key, int *status, const char **why) {
    const hh_field *f;
    *status = 400;
    if (!hh_has_token(b, h, "upgrade", 7, "websocket", 9))
        return -1;
    if (!span_is(b, h->method, "GET", 3) || h->http10) {
        *why = "a WebSocket upgrade must be GET over HTTP/1.1";
        return 0;
    }
    if (!hh_has_token(b, h, "connection", 10, "upgrade", 7)) {
        *why = "Connection header lacks the Upgrade token";
        return 0;
    }
    f = hh_get(b, h, "content-length", 14, 0);
    if ((f && !span_is(b, f->value, "0", 1)) || hh_get(b, h, "transfer-encoding", 17, 0)) {
        *why = "an upgrade request carries no body";
        return 0;
    }
    uint32_t n = count_fields(b, h, "sec-websocket-version", 21, &f);
    if (n != 1 || !span_is(b, f->value, "13", 2)) {
        if (!n) {
            *why = "Sec-WebSocket-Version missing";
        } else {
            *why = "unsupported WebSocket version";
            *status = 426;
        }
        return 0;
    }
    if (count_fields(b, h, "sec-websocket-key", 17, &f) != 1) {
        *why = "exactly one Sec-WebSocket-Key is required";
        return 0;
    }
    if (!key_is_16_bytes(b + f->value.off, f->value.len)) {
        *why = "Sec-WebSocket-Key is not 16 bytes in base64";
        return 0;
    }
    const hh_field *origin;
    if (count_fields(b, h, "origin", 6, &origin) > 1) {
        *why = "more than one Origin header";
        return 0;
    }
    *key = f;
    return 1;
}

/* -- the rules ------------------------------------------------------------------------- */

double fp_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int has(const char *s, uint32_t n, const char *lit, uint32_t k) {
    for (uint32_t i = 0; i + k <= n; i++)
        if (memcmp(s + i, lit, k) == 0)
            return 1;
    return 0;
}

/* relay/handshake.py path_allowed. With prefixes, only a path whose decoded,
 * dot-resolved form is itself (no "%", "/.", "//") is judged here: then the
 * raw match is the whole answer. */
static int path_ok(const fp_table *t, const char *b, const hh_head *h) {
    const char *p = b + h->path.off;
    uint32_t n = h->path.len;
    if (h->slash) /* an absolute-form target: Python's */
        return 0;
    if (!n || p[0] != '/')
        return 0;
    if (t->any_path)
        return 1;
    if (memchr(p, '%', n) || has(p, n, "/.", 2) || has(p, n, "//", 2))
        return 0;
    for (uint32_t k = 0; k < t->npaths; k++) { /* _prefix_match: whole segments */
        const fp_str *e = &t->paths[k];
        if (n < e->n || memcmp(p, e->s, e->n) != 0)
            continue;
        if (n == e->n || e->s[e->n - 1] == '/' || p[e->n] == '/')
            return 1;
    }
    return 0;
}

/* relay/handshake.py origin_allowed: any, no Origin (not a browser), or an
 * entry with a scheme equal to the value as sent (entries are lower case
 * without a final "/", so equal bytes are equal after Python's folding). */
static int origin_ok(const fp_pool *t, const char *b, const hh_head *h) {
    if (t->any_origin)
        return 1;
    const hh_field *f = hh_get(b, h, "origin", 6, 0);
    if (!f)
        return 1;
    for (uint32_t k = 0; k < t->norigins; k++)
        if (f->value.len == t->origins[k].n && memcmp(b + f->value.off, t->origins[k].s, t->origins[k].n) == 0)
            return 1;
    return 0;
}

int fp_trusted(const fp_table *t, const uint8_t addr[16]) {
    for (uint32_t k = 0; k < t->ntrusted; k++) {
        int in = 1;
        for (int i = 0; i < 16 && in; i++)
            in = (addr[i] & t->trusted[k][1][i]) == t->trusted[k][0][i];
        if (in)
            return 1;
    }
    return 0;
}

int fp_request_id(const char *b, const hh_head *h, const char **id, uint32_t *n) {
    const hh_field *f;
    if (count_fields(b, h, "x-request-id", 12, &f) != 1 || f->value.len < 1 || f->value.len > 200)
        return 0;
    for (uint32_t i = 0; i < f->value.len; i++) /* [!-~] */
        if (b[f->value.off + i] < '!' || b[f->value.off + i] > '~')
            return 0;
    *id = b + f->value.off;
    *n = f->value.len;
    return 1;
}

/* OriginPool.open_connections */
static int64_t conns_of(const fp_table *t, const fp_member *m) {
    uint32_t n = (uint32_t)*t->in_use;
    int64_t sum = 0;
    for (uint32_t i = 0; i < n; i++)
        sum += m->conns[i];
    return sum;
}

/* OriginPool.weight is 1.0: checked up, not taken out, past its slow start. */
static int full_weight(const fp_table *t, const fp_member *m, double now) {
    const double *s = m->state;
    double slowstart = t->pools[m->pool].slowstart;
    if (s[t->o_check] == 0.0 || now < s[t->o_down_until] || s[t->o_ejected] != 0.0)
        return 0;
    if (slowstart > 0.0) {
        double back = s[t->o_down_until], since = s[t->o_check_since];
        if (since > back)
            back = since;
        if (now - back < slowstart)
            return 0;
    }
    return 1;
}

/* relay/shared_memory.py Admission.take far from the limit, lock-free: an
 * atomic add to this worker's slot, then the sum read again (exact, since a
 * worker has at most one take in flight); near the limit Python takes the lock. */
int fp_admit(int64_t *c, uint32_t n, uint32_t slot, int64_t limit) {
    long long room = limit - (long long)n + 1; /* the most the sum may be, own add included */
    int64_t sum = 0;
    for (uint32_t i = 0; i < n; i++)
        sum += __atomic_load_n(&c[i], __ATOMIC_RELAXED);
    if (sum + 1 > room) /* no add (and no undo) near the limit */
        return 0;
    __atomic_fetch_add(&c[slot], 1, __ATOMIC_SEQ_CST);
    sum = 0;
    for (uint32_t i = 0; i < n; i++)
        sum += __atomic_load_n(&c[i], __ATOMIC_SEQ_CST);
    if (sum <= room)
        return 1;
    __atomic_fetch_sub(&c[slot], 1, __ATOMIC_SEQ_CST);
    return 0;
}

int fp_rules_allow(const fp_table *t, uint32_t pool, const char *b, const hh_head *h) {
    return pool < t->npools && path_ok(t, b, h) && origin_ok(&t->pools[pool], b, h);
}

int fp_decide(fp_table *t, uint32_t pool, const char *b, const hh_head *h, double now, uint32_t *member,
              uint32_t *order, uint32_t *norder) {
    if (!t->on || !fp_rules_allow(t, pool, b, h)) {
        t->declined++;
        return 0;
    }
    fp_pool *p = &t->pools[pool];
    fp_member *ms = &t->members[p->first];
    uint32_t n = p->n, pick = 0;
    int64_t conns[FP_MAX_MEMBERS];
    if (n > 1) { /* OriginPool._least_conn with every weight 1.0; else its trials, panic, slow start: Python's */
        for (uint32_t i = 0; i < n; i++) {
            if (!full_weight(t, &ms[i], now)) {
                t->declined++;
                return 0;
            }
            conns[i] = conns_of(t, &ms[i]);
        }
        uint32_t turn = (p->turn + 1) % n;
        int64_t best = INT64_MAX;
        for (uint32_t i = 0; i < n; i++) {
            uint32_t k = (turn + i) % n;
            if (conns[k] < best) {
                best = conns[k];
                pick = k;
            }
        }
        p->turn = turn;
    }
    if (!fp_admit(t->clients, t->nclients, t->slot, *t->limit)) {
        t->declined++;
        return 0;
    }
    fp_member *m = &ms[pick];
    m->conns[m->cell]++; /* OriginPool.opened: this worker's cell, this worker alone */
    *member = p->first + pick;
    /* OriginPool.failover: the others by their connections, then their place (a stable sort) */
    uint32_t rest[FP_MAX_MEMBERS], k = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (i == pick)
            continue;
        uint32_t j = k++;
        for (; j > 0 && conns[rest[j - 1]] > conns[i]; j--)
            rest[j] = rest[j - 1];
        rest[j] = i;
    }
    order[0] = m->origin;
    for (uint32_t i = 0; i < k; i++)
        order[i + 1] = ms[rest[i]].origin;
    k++;
    *norder = k;
    t->decided++;
    return 1;
}

int fp_still_up(const fp_table *t, uint32_t member) {
    return member < t->nmembers && t->members[member].state[t->o_ejected] == 0.0;
}

void fp_give_back(fp_table *t, uint32_t member) {
    if (member >= t->nmembers)
        return;
    __atomic_fetch_sub(&t->clients[t->slot], 1, __ATOMIC_SEQ_CST);
    fp_member *m = &t->members[member];
    m->conns[m->cell]--;
}

/* metrics/layout.py bucket_index: the first bound >= v (n: +Inf) */
static uint32_t bucket(const double *bounds, uint32_t n, double v) {
    uint32_t i = 0;
    while (i < n && v > bounds[i])
        i++;
    return i;
}

void fp_upgraded(fp_table *t, uint32_t member, double handshake_s, double connect_s) {
    double *m = t->m;
    m[t->upgraded] += 1; /* Counters.upgrade("upgraded", 101, handshake_s) */
    m[t->http101] += 1;
    m[t->handshake + bucket(t->hs_buckets, t->nhs, handshake_s)] += 1;
    m[t->handshake + t->nhs + 1] += handshake_s;
    if (connect_s >= 0 && member < t->nmembers) { /* OriginPool.connected */
        double *hist = t->members[member].hist;
        hist[bucket(t->connect_buckets, t->nconnect, connect_s)] += 1;
        hist[t->nconnect + 1] += connect_s;
    }
    m[t->connections] += 1; /* the tunnel opens */
    t->open++;
    t->upgraded_n++;
}

void fp_ended(fp_table *t, uint32_t member, double duration_s, uint64_t up, uint64_t down) {
    double *m = t->m;
    m[t->duration + bucket(t->dur_buckets, t->ndur, duration_s)] += 1; /* Counters.tunnel_ended */
    m[t->duration + t->ndur + 1] += duration_s;
    m[t->connections] -= 1;
    t->open--;
    t->ended_bytes[0] += up;
    t->ended_bytes[1] += down;
    fp_give_back(t, member);
}
