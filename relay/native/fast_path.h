/* The fast path: the common upgrade decided in C, without calling Python
 * (README "Architecture", "The fast path").
 *
 * Python keeps every rule; what it compiles here is the part of them a
 * typical request needs, as tables C reads (fp_table, filled by
 * relay/native/fast_path.py): the path and Origin rules, the one pool and
 * its least-connections pick, the global admission limit, and where the
 * counters live in shared memory. fp_decide() says yes only when every
 * answer is the plain one (an allowed path and Origin, every origin of the
 * pool up with full weight, room under the limit); anything else is
 * Python's to decide, as before, with nothing taken. After a yes, anything
 * that is not the common outcome (a failed connect, another answer than a
 * checked 101, an origin taken out meanwhile) goes back to Python with what
 * C took (relay/native/front.py on_adopt), so failure handling, logging and
 * passive health stay in one place.
 *
 * Sans-I/O: bytes and parsed heads in, decisions out; the only state written
 * is shared memory the Python side writes the same way (the admission slot,
 * the origin table's connection counts and connect histograms, the worker's
 * metrics slot), by this worker alone (or atomically, for admission).
 */
#ifndef WSRELAY_FAST_PATH_H
#define WSRELAY_FAST_PATH_H

#include <stddef.h>
#include <stdint.h>

#include "http_head.h"

/* relay/handshake.py's is_upgrade + validate_upgrade (RFC 6455 §4.2.1):
 * -1 no WebSocket asked for; 1 a valid upgrade (*key: its Sec-WebSocket-Key);
 * 0 refused, with *status (400 or 426) and *why. */
int fp_websocket(const char *b, const hh_head *h, const hh_field **key, int *status, const char **why);

#define FP_MAX_BUCKETS 16
#define FP_MAX_MEMBERS 64
#define FP_MAX_RULES 32
#define FP_MAX_POOLS 16

typedef struct {
    uint32_t origin;      /* the head phase's origin index (NativeFront.members) */
    int64_t *conns;       /* its row of the origin table's open connections: one int64 per worker slot */
    uint32_t cell;        /* this worker's place in that row */
    double *state;        /* its health fields (metrics/layout.py O_*) */
    double *hist;         /* this worker's connect-time histogram of it: buckets..., +Inf, sum */
    uint32_t pool;        /* its pool's place in fp_table.pools */
} fp_member;

typedef struct {
    const char *s;
    uint32_t n;
} fp_str;

/* A pool the fast path decides for: its members, Origin rule and settings. */
typedef struct {
    uint32_t first, n;    /* its members: fp_table.members[first .. first + n) */
    uint32_t turn;        /* least connections' tie-break, by turns */
    /* RELAY_ALLOWED_ORIGINS: any (empty, or "*"), or the entries with a scheme, matched exactly */
    int any_origin;
    fp_str origins[FP_MAX_RULES];
    uint32_t norigins;
    double slowstart;
    int64_t connect_timeout_ms;
    fp_str log_name;      /* its name, for the access log */
} fp_pool;

typedef struct {
    int on;
    /* RELAY_WS_PATHS: every path ("/"), or prefixes matched on whole segments */
    int any_path;
    fp_str paths[FP_MAX_RULES];
    uint32_t npaths;
    /* RELAY_TRUSTED_PROXIES: networks as 16-byte addresses and masks (IPv4 mapped) */
    uint8_t trusted[FP_MAX_RULES][2][16];
    uint32_t ntrusted;
    /* RELAY_MAX_CLIENTS: every worker's admitted clients (int64), this worker's, the limit */
    int64_t *clients;
    uint32_t nclients, slot;
    const int64_t *limit;
    /* the pools (relay/native/fast_path.py decides which: with routes, the
     * owner routes, else pools[0]); least connections across workers (in_use:
     * worker slots in use, float64) over each pool's members */
    fp_pool pools[FP_MAX_POOLS];
    uint32_t npools;
    fp_member members[FP_MAX_MEMBERS];
    uint32_t nmembers;
    const double *in_use;
    uint32_t o_check, o_check_since, o_down_until, o_ejected;
    /* the worker's metrics slot (float64) and where the counts go in it */
    double *m;
    uint32_t upgraded, http101, handshake, duration, connections;
    double hs_buckets[FP_MAX_BUCKETS], dur_buckets[FP_MAX_BUCKETS], connect_buckets[FP_MAX_BUCKETS];
    uint32_t nhs, ndur, nconnect;
    /* the access log (access_log.h): on, the worker's number, each member's name (pools have theirs) */
    int log;
    int log_worker;
    fp_str log_names[FP_MAX_MEMBERS];
    /* what it did (Engine.fast_path_stats) */
    uint64_t decided, upgraded_n, adopted, declined;
    uint32_t open;             /* its tunnels open now */
    uint64_t ended_bytes[2];   /* bytes of its tunnels that ended (up, down) */
} fp_table;

/* CLOCK_MONOTONIC in seconds: Python's time.monotonic(). */
double fp_now(void);
/* The path and Origin rules' plain case: 1 when Python's path_allowed and
 * origin_allowed surely allow the request (never when they refuse it; 0 also
 * for what they may allow: Python's to judge). */
int fp_rules_allow(const fp_table *t, uint32_t pool, const char *b, const hh_head *h);
/* relay/addresses.py TrustedProxies: whether a client's address (16 bytes,
 * IPv4 mapped) is in RELAY_TRUSTED_PROXIES. */
int fp_trusted(const fp_table *t, const uint8_t addr[16]);
/* relay/headers.py request_id_for with a trusted client: its X-Request-ID
 * when it sent exactly one of 1-200 visible ASCII characters (*id, *n), else 0. */
int fp_request_id(const char *b, const hh_head *h, const char **id, uint32_t *n);
/* Admission.take far from the limit, lock-free: 1 taken, 0 Python takes the lock (near the limit). */
int fp_admit(int64_t *clients, uint32_t n, uint32_t slot, int64_t limit);
/* Decide a valid upgrade (h parsed from b) routed to pool: 1 when the fast path takes it,
 * having taken an admission slot and a connection count on the first
 * origin; *member is its place in the pool, order/norder the origins to
 * ask (the head phase's indices: the pick, then the rest by their
 * connections, as OriginPool.failover). 0: Python decides, nothing taken. */
int fp_decide(fp_table *t, uint32_t pool, const char *b, const hh_head *h, double now, uint32_t *member, uint32_t *order,
              uint32_t *norder);
/* Whether the pool member may be answered for in C still (not taken out since). */
int fp_still_up(const fp_table *t, uint32_t member);
/* Give back what fp_decide took (a connection closed before it was decided, or handed to Python undone). */
void fp_give_back(fp_table *t, uint32_t member);
/* The origin's checked 101: counted (upgrades, 101, handshake seconds, the connect's seconds when >= 0). */
void fp_upgraded(fp_table *t, uint32_t member, double handshake_s, double connect_s);
/* A fast-path tunnel ended after duration_s: counted, its admission slot and connection count given back. */
void fp_ended(fp_table *t, uint32_t member, double duration_s, uint64_t up, uint64_t down);

#endif
