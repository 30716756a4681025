/* TLS tunnels in the pump (README "TLS", bench/RESULTS.md): OpenSSL's
 * functions, and the BIO through which a tunnel's SSL reads ciphertext and
 * writes records.
 *
 * Why no OpenSSL at build time (as relay/tls/_openssl.c): the SSL the engine
 * takes over was made by the libssl that Python's _ssl module loaded. A
 * second copy linked here (another build, another version: a Python built
 * against its own OpenSSL, a distribution's libssl beside it) would be
 * handed a pointer from the first and crash. So every function is looked up
 * with dlsym() in _ssl's own dependency tree, which is by construction the
 * libssl/libcrypto that made the SSL; `pip install .` needs no libssl-dev.
 *
 * Why our own BIO, not the memory BIOs uvloop gave the SSL: a memory BIO is
 * one more copy each way, and it keeps the largest size it ever held (a
 * tunnel that once moved 256 KiB in a write would hold that for life). Ours
 * reads from the engine's receive buffer in place (the rest of a read that
 * backpressure leaves unread is copied aside into `carry`, at most one
 * read's worth) and writes records into the engine's one output buffer,
 * sent at once: an idle TLS tunnel owns no buffer of ours at all.
 */
#define _GNU_SOURCE
#include "tls.h"

#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"

tls_api tls;
BIO_METHOD *tls_bio_method;

#define BIO_FLAGS_READ 0x01
#define BIO_FLAGS_WRITE 0x02
#define BIO_FLAGS_RWS 0x07
#define BIO_FLAGS_SHOULD_RETRY 0x08
#define BIO_TYPE_SOURCE_SINK 0x0400
#define BIO_CTRL_FLUSH 11

/* SSL_read wants ciphertext: the carry first, then the engine's receive
 * window (set by the pump for this tunnel only); none: retry later. */
static int bio_read(BIO *b, char *out, int len) {
    tls.BIO_clear_flags(b, BIO_FLAGS_RWS | BIO_FLAGS_SHOULD_RETRY);
    eng_tls *x = tls.BIO_get_data(b);
    if (x == NULL || len <= 0)
        return 0; /* detached: the tunnel is gone, nothing more will come */
    if (x->carry) {
        size_t n = x->carry_len - x->carry_off;
        if (n > (size_t)len)
            n = (size_t)len;
        memcpy(out, x->carry + x->carry_off, n);
        x->carry_off += (uint32_t)n;
        if (x->carry_off == x->carry_len) {
            free(x->carry);
            x->carry = NULL;
            x->carry_off = x->carry_len = 0;
        }
        return (int)n;
    }
    engine *e = x->e;
    if (e->tls_cur == x && e->tls_in_len) {
        size_t n = e->tls_in_len < (size_t)len ? e->tls_in_len : (size_t)len;
        memcpy(out, e->tls_in, n);
        e->tls_in += n;
        e->tls_in_len -= n;
        return (int)n;
    }
    tls.BIO_set_flags(b, BIO_FLAGS_READ | BIO_FLAGS_SHOULD_RETRY);
    return -1;
}

/* Records (and alerts, close_notify) go to the engine's output buffer,
 * which the pump sends to the client after each SSL call. It is sized for
 * the largest write the pump makes (tls_sealed_max); growing it is a
 * fallback for what SSL adds unasked (a KeyUpdate's answer), never per chunk. */
static int bio_write(BIO *b, const char *in, int len) {
    tls.BIO_clear_flags(b, BIO_FLAGS_RWS | BIO_FLAGS_SHOULD_RETRY);
    eng_tls *x = tls.BIO_get_data(b);
    if (x == NULL || len < 0)
        return -1;
    engine *e = x->e;
    if (e->tls_out_len + (size_t)len > e->tls_out_cap) {
        size_t cap = 2 * e->tls_out_cap > e->tls_out_len + (size_t)len ? 2 * e->tls_out_cap
                                                                       : e->tls_out_len + (size_t)len;
        char *n = realloc(e->tls_out, cap);
        if (n == NULL)
            return -1; /* SSL_write fails: the pump ends the tunnel as after a send error */
        e->tls_out = n;
        e->tls_out_cap = cap;
    }
    memcpy(e->tls_out + e->tls_out_len, in, (size_t)len);
    e->tls_out_len += (size_t)len;
    return len;
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr) {
    (void)b, (void)num, (void)ptr;
    return cmd == BIO_CTRL_FLUSH; /* written is sent: flushing is a no-op; nothing else applies */
}

#define LOOKUP(name)                                       \
    do {                                                   \
        *(void **)(&tls.name) = dlsym(h, #name);           \
        if (tls.name == NULL) {                            \
            *why = #name " not found in Python's libssl"; \
            return -1;                                     \
        }                                                  \
    } while (0)

int tls_load(const char *path, const char **why) {
    if (tls_bio_method != NULL)
        return 0;
    void *h = path ? dlopen(path, RTLD_NOW | RTLD_NOLOAD) : RTLD_DEFAULT;
    if (h == NULL) {
        *why = "Python's _ssl module is not loaded in this process";
        return -1;
    }
    LOOKUP(SSL_read);
    LOOKUP(SSL_write);
    LOOKUP(SSL_get_error);
    LOOKUP(SSL_shutdown);
    LOOKUP(SSL_has_pending);
    LOOKUP(SSL_pending);
    LOOKUP(SSL_set_options);
    LOOKUP(SSL_get_rbio);
    LOOKUP(SSL_get_wbio);
    LOOKUP(SSL_set_bio);
    LOOKUP(SSL_get_SSL_CTX);
    LOOKUP(BIO_get_new_index);
    LOOKUP(BIO_meth_new);
    LOOKUP(BIO_meth_set_write);
    LOOKUP(BIO_meth_set_read);
    LOOKUP(BIO_meth_set_ctrl);
    LOOKUP(BIO_new);
    LOOKUP(BIO_free);
    LOOKUP(BIO_set_data);
    LOOKUP(BIO_get_data);
    LOOKUP(BIO_set_init);
    LOOKUP(BIO_set_flags);
    LOOKUP(BIO_clear_flags);
    LOOKUP(BIO_read);
    LOOKUP(BIO_ctrl);
    LOOKUP(ERR_clear_error);
    LOOKUP(SSL_set_fd);
    LOOKUP(SSL_set_read_ahead);
    LOOKUP(SSL_do_handshake);
    LOOKUP(SSL_session_reused);
    LOOKUP(SSL_get_version);
    LOOKUP(ERR_peek_error);
    int type = tls.BIO_get_new_index();
    BIO_METHOD *m = type > 0 ? tls.BIO_meth_new(type | BIO_TYPE_SOURCE_SINK, "wsrelay engine") : NULL;
    if (m == NULL || !tls.BIO_meth_set_read(m, bio_read) || !tls.BIO_meth_set_write(m, bio_write) ||
        !tls.BIO_meth_set_ctrl(m, bio_ctrl)) {
        *why = "OpenSSL refused a BIO method";
        return -1; /* m (if any) is kept by OpenSSL's tables until exit: a one-off, never retried */
    }
    tls_bio_method = m;
    return 0;
}
