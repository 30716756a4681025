/* TLS tunnels in the pump: the OpenSSL calls the engine makes, found in the
 * libssl of Python's _ssl module (tls.c says why), and the per-tunnel state.
 *
 * No OpenSSL header is used: the types are opaque here and the few
 * constants are OpenSSL's ABI (stable from 1.1.1 to 3.x).
 */
#ifndef WSRELAY_TLS_H
#define WSRELAY_TLS_H

#include <stddef.h>
#include <stdint.h>

typedef struct ssl_st SSL;
typedef struct bio_st BIO;
typedef struct bio_method_st BIO_METHOD;

#define TLS_ERROR_NONE 0
#define TLS_ERROR_SSL 1
#define TLS_ERROR_WANT_READ 2
#define TLS_ERROR_WANT_WRITE 3
#define TLS_ERROR_SYSCALL 5
#define TLS_ERROR_ZERO_RETURN 6
#define TLS_OP_NO_RENEGOTIATION 0x40000000UL

typedef struct tls_api {
    int (*SSL_read)(SSL *, void *, int);
    int (*SSL_write)(SSL *, const void *, int);
    int (*SSL_get_error)(const SSL *, int);
    int (*SSL_shutdown)(SSL *);
    int (*SSL_has_pending)(const SSL *);
    int (*SSL_pending)(const SSL *);
    uint64_t (*SSL_set_options)(SSL *, uint64_t);
    BIO *(*SSL_get_rbio)(const SSL *);
    BIO *(*SSL_get_wbio)(const SSL *);
    void (*SSL_set_bio)(SSL *, BIO *, BIO *);
    void *(*SSL_get_SSL_CTX)(const SSL *);
    int (*BIO_get_new_index)(void);
    BIO_METHOD *(*BIO_meth_new)(int, const char *);
    int (*BIO_meth_set_write)(BIO_METHOD *, int (*)(BIO *, const char *, int));
    int (*BIO_meth_set_read)(BIO_METHOD *, int (*)(BIO *, char *, int));
    int (*BIO_meth_set_ctrl)(BIO_METHOD *, long (*)(BIO *, int, long, void *));
    BIO *(*BIO_new)(const BIO_METHOD *);
    int (*BIO_free)(BIO *);
    void (*BIO_set_data)(BIO *, void *);
    void *(*BIO_get_data)(BIO *);
    void (*BIO_set_init)(BIO *, int);
    void (*BIO_set_flags)(BIO *, int);
    void (*BIO_clear_flags)(BIO *, int);
    int (*BIO_read)(BIO *, void *, int);
    long (*BIO_ctrl)(BIO *, int, long, void *);
    void (*ERR_clear_error)(void);
    /* the head phase's handshake (handshake.c "TLS") */
    int (*SSL_set_fd)(SSL *, int);
    void (*SSL_set_read_ahead)(SSL *, int);
    int (*SSL_do_handshake)(SSL *);
    int (*SSL_session_reused)(const SSL *);
    const char *(*SSL_get_version)(const SSL *);
    unsigned long (*ERR_peek_error)(void);
} tls_api;

extern tls_api tls;
extern BIO_METHOD *tls_bio_method; /* NULL until tls_load() succeeded */

struct engine;

/* A TLS tunnel's client side: its SSL (owned by Python's _ssl object, which
 * the owner keeps alive for the tunnel's life) and our BIO, both ways. */
typedef struct eng_tls {
    struct engine *e;
    SSL *ssl;
    BIO *bio;
    char *carry;             /* ciphertext read from the client, not yet taken by SSL_read */
    uint32_t carry_off, carry_len;
    uint32_t flags;          /* TLS_SENT_CLOSE_NOTIFY */
} eng_tls;

#define TLS_SENT_CLOSE_NOTIFY 0x01

/* Resolve every function in the libssl/libcrypto already loaded by the
 * shared object at ``path`` (Python's _ssl; NULL: the whole process).
 * 0, or -1 with *why set (a static string). */
int tls_load(const char *path, const char **why);

/* The plaintext SSL_write() turns ``n`` bytes into, at most (records of
 * 16 KiB; TLS 1.2 AES-GCM's 29 bytes of header, nonce and tag per record
 * is the largest of Mozilla's intermediate suites, rounded up). */
static inline size_t tls_sealed_max(size_t n) { return n + (n / 16384 + 1) * 64 + 4096; }

#endif
