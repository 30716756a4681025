/* The native tunnel pump: one per worker, plain C, no Python (see engine.c).
 *
 * Ownership: eng_open() takes both descriptors (non-blocking TCP sockets);
 * from then on only the engine reads, writes and closes them. A tunnel ends
 * once both are closed; its slot is queued on `ended` and released by
 * eng_release() after the owner has read its byte counts and token.
 */
#ifndef WSRELAY_ENGINE_H
#define WSRELAY_ENGINE_H

#include <stddef.h>
#include <stdint.h>

typedef struct eng_side {
    int fd;
    uint32_t flags;          /* S_* in engine.c */
    char *pend;              /* bytes for this fd that it could not take yet */
    uint32_t pend_off, pend_len;
    uint64_t nbytes;         /* bytes read from this fd */
} eng_side;

typedef struct eng_tunnel {
    eng_side s[2];           /* 0: client, 1: origin */
    uint32_t gen;            /* bumped when the slot is released: stale ids and events miss */
    uint32_t flags;          /* T_* in engine.c */
    int64_t last_active_ms;  /* CLOCK_MONOTONIC ms of the last byte read either way */
    void *token;             /* the owner's, untouched */
    uint32_t next_free;
} eng_tunnel;

typedef struct engine {
    int epfd;
    char *buf;               /* the one read buffer, reused by every tunnel */
    size_t bufsize;
    eng_tunnel *t;
    uint32_t cap, free_head, open;
    uint64_t total[2];       /* bytes ever read from clients (up) and origins (down) */
    uint64_t ended_bytes[2]; /* of which by tunnels that have ended */
    int64_t now_ms;
    uint32_t *ended;         /* slots whose tunnel ended, not yet released */
    uint32_t nended, ended_cap;
} engine;

#define ENG_NONE 0xffffffffu

int eng_init(engine *e, size_t bufsize);
void eng_free(engine *e);
/* Returns the tunnel id (>= 0) or -errno; on error the caller keeps the fds. */
int64_t eng_open(engine *e, int cfd, int ofd, const char *to_client, size_t nc,
                   const char *to_origin, size_t no, void *token);
/* Wait at most timeout_ms (0: not at all) and handle up to maxevents events. */
int eng_poll(engine *e, int maxevents, int timeout_ms);
eng_tunnel *eng_get(engine *e, int64_t id);  /* NULL for unknown or ended ids */
int eng_close(engine *e, int64_t id);  /* clean: flush what is pending, then close */
int eng_abort(engine *e, int64_t id);  /* now, discarding what is pending */
int eng_close_idle(engine *e, int64_t limit_ms);
/* Pop one ended tunnel: its slot index, or ENG_NONE; then eng_release(slot). */
uint32_t eng_pop_ended(engine *e);
void eng_release(engine *e, uint32_t slot);
void eng_clock(engine *e);
int64_t eng_id(engine *e, uint32_t slot);

#endif
