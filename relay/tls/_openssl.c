/* relay.tls._openssl: the three things Python's ssl module cannot do that
 * wsrelay's TLS listeners need (README, "TLS"):
 *
 *  - session ticket keys we choose, so every worker of every generation, and
 *    every host sharing RELAY_TLS_TICKET_KEYS, encrypts tickets with the same
 *    key and decrypts with the previous and next ones too (rotation without a
 *    failed resumption). Python's ssl has no ticket-key API at all, and the
 *    only one OpenSSL offers for several keys is a callback run inside
 *    SSL_do_handshake, i.e. with the GIL released: it must be C.
 *  - the key-exchange groups (X25519, P-256, P-384: Mozilla's "intermediate");
 *    Python 3.11 sets a single curve only.
 *  - turning off OpenSSL's per-process session-ID cache: it cannot be shared
 *    across workers, and costs memory for sessions nobody resumes there.
 *
 * Why not link libssl, and why not ctypes: the SSL_CTX we configure belongs to
 * the libssl that Python's _ssl module loaded. A second copy (another build,
 * another version) would be handed a pointer from the first and crash. So no
 * OpenSSL header or library is used at build time: every function is looked up
 * with dlsym() in _ssl's own dependency tree (its path is passed to load()),
 * which is by construction the libssl/libcrypto that made the SSL_CTX.
 * ctypes could make those calls too, but the ticket callback would then be a
 * Python function re-taking the GIL inside every handshake.
 *
 * The SSL_CTX pointer is the first field after PyObject_HEAD of _ssl's
 * PySSLContext (CPython 3.7 to 3.13); relay/tls/openssl.py checks it by
 * comparing SSL_CTX_get_options() with SSLContext.options before using it.
 *
 * Ticket format and key layout are OpenSSL's, as nginx and HAProxy use them:
 * a key is 80 bytes (16 name, 32 HMAC-SHA256 secret, 32 AES-256 key) or 48
 * (16 name, 16 HMAC secret, 16 AES-128 key); the name picks the key.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <string.h>

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_md_st EVP_MD;
typedef struct hmac_ctx_st HMAC_CTX;
typedef struct engine_st ENGINE;

#define SSL_CTRL_SET_SESS_CACHE_MODE 44
#define SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB 72
#define SSL_CTRL_SET_GROUPS_LIST 92

static long (*p_SSL_CTX_ctrl)(SSL_CTX *, int, long, void *);
static long (*p_SSL_CTX_callback_ctrl)(SSL_CTX *, int, void (*)(void));
static uint64_t (*p_SSL_CTX_get_options)(const SSL_CTX *);
static int (*p_RAND_bytes)(unsigned char *, int);
static const EVP_CIPHER *(*p_EVP_aes_128_cbc)(void);
static const EVP_CIPHER *(*p_EVP_aes_256_cbc)(void);
static const EVP_MD *(*p_EVP_sha256)(void);
static int (*p_EVP_EncryptInit_ex)(EVP_CIPHER_CTX *, const EVP_CIPHER *, ENGINE *, const unsigned char *,
                                   const unsigned char *);
static int (*p_EVP_DecryptInit_ex)(EVP_CIPHER_CTX *, const EVP_CIPHER *, ENGINE *, const unsigned char *,
                                   const unsigned char *);
static int (*p_HMAC_Init_ex)(HMAC_CTX *, const void *, int, const EVP_MD *, ENGINE *);

typedef struct {
    unsigned char name[16];
    unsigned char hmac[32];
    unsigned char aes[32];
    int size; /* 48 or 80 */
} ticket_key;

#define MAX_KEYS 8
static ticket_key keys[MAX_KEYS];
static int nkeys;
static int encrypt_with = -1; /* index into keys; -1: no keys, OpenSSL's own */
static unsigned long long issued, decrypted, unknown;

static int ready;

/* OpenSSL's SSL_CTX_set_tlsext_ticket_key_cb contract: enc=1 fill name, iv
 * and init both contexts, return 1; enc=0 find the key by name: 0 = unknown
 * (full handshake, new ticket), 1 = fine, 2 = fine but issue a fresh ticket
 * (it was not encrypted with the current key). */
static int ticket_cb(SSL *s, unsigned char key_name[16], unsigned char *iv, EVP_CIPHER_CTX *cctx,
                     HMAC_CTX *hctx, int enc) {
    (void)s;
    if (enc) {
        if (encrypt_with < 0)
            return -1;
        const ticket_key *k = &keys[encrypt_with];
        if (p_RAND_bytes(iv, 16) <= 0)
            return -1;
        memcpy(key_name, k->name, 16);
        int big = k->size == 80;
        if (!p_EVP_EncryptInit_ex(cctx, big ? p_EVP_aes_256_cbc() : p_EVP_aes_128_cbc(), NULL, k->aes, iv))
            return -1;
        if (!p_HMAC_Init_ex(hctx, k->hmac, big ? 32 : 16, p_EVP_sha256(), NULL))
            return -1;
        issued++;
        return 1;
    }
    for (int i = 0; i < nkeys; i++) {
        const ticket_key *k = &keys[i];
        if (memcmp(key_name, k->name, 16) != 0)
            continue;
        int big = k->size == 80;
        if (!p_HMAC_Init_ex(hctx, k->hmac, big ? 32 : 16, p_EVP_sha256(), NULL))
            return -1;
        if (!p_EVP_DecryptInit_ex(cctx, big ? p_EVP_aes_256_cbc() : p_EVP_aes_128_cbc(), NULL, k->aes, iv))
            return -1;
        decrypted++;
        return i == encrypt_with ? 1 : 2;
    }
    unknown++;
    return 0;
}

#define LOOKUP(name)                                                                          \
    do {                                                                                      \
        *(void **)(&p_##name) = dlsym(h, #name);                                              \
        if (p_##name == NULL) {                                                               \
            PyErr_Format(PyExc_OSError, "%s not found in the libssl of Python's ssl module", #name); \
            return NULL;                                                                      \
        }                                                                                     \
    } while (0)

/* load(path_of__ssl_or_None): resolve every function in _ssl's libssl. */
static PyObject *load(PyObject *self, PyObject *arg) {
    const char *path = NULL;
    if (arg != Py_None) {
        path = PyUnicode_AsUTF8(arg);
        if (path == NULL)
            return NULL;
    }
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (h == NULL) {
        PyErr_Format(PyExc_OSError, "cannot find Python's _ssl module in this process: %s", dlerror());
        return NULL;
    }
    LOOKUP(SSL_CTX_ctrl);
    LOOKUP(SSL_CTX_callback_ctrl);
    LOOKUP(SSL_CTX_get_options);
    LOOKUP(RAND_bytes);
    LOOKUP(EVP_aes_128_cbc);
    LOOKUP(EVP_aes_256_cbc);
    LOOKUP(EVP_sha256);
    LOOKUP(EVP_EncryptInit_ex);
    LOOKUP(EVP_DecryptInit_ex);
    LOOKUP(HMAC_Init_ex);
    ready = 1;
    Py_RETURN_NONE;
}

typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
} ssl_context_head;

static SSL_CTX *ctx_of(PyObject *obj) {
    if (!ready) {
        PyErr_SetString(PyExc_RuntimeError, "relay.tls._openssl.load() was not called");
        return NULL;
    }
    SSL_CTX *ctx = ((ssl_context_head *)obj)->ctx;
    if (ctx == NULL)
        PyErr_SetString(PyExc_ValueError, "not an SSL context");
    return ctx;
}

/* options(sslcontext) -> SSL_CTX_get_options(): checks where ctx_of() looks. */
static PyObject *options(PyObject *self, PyObject *obj) {
    SSL_CTX *ctx = ctx_of(obj);
    if (ctx == NULL)
        return NULL;
    return PyLong_FromUnsignedLongLong(p_SSL_CTX_get_options(ctx));
}

/* configure(sslcontext, groups: bytes, tickets: bool): groups list, no
 * session-ID cache, and our ticket callback when ``tickets``. */
static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *obj;
    const char *groups;
    int tickets;
    if (!PyArg_ParseTuple(args, "Oyp", &obj, &groups, &tickets))
        return NULL;
    SSL_CTX *ctx = ctx_of(obj);
    if (ctx == NULL)
        return NULL;
    if (p_SSL_CTX_ctrl(ctx, SSL_CTRL_SET_GROUPS_LIST, 0, (void *)groups) != 1) {
        PyErr_Format(PyExc_ValueError, "OpenSSL refused the groups %s", groups);
        return NULL;
    }
    p_SSL_CTX_ctrl(ctx, SSL_CTRL_SET_SESS_CACHE_MODE, 0 /* SSL_SESS_CACHE_OFF */, NULL);
    if (tickets &&
        p_SSL_CTX_callback_ctrl(ctx, SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB, (void (*)(void))ticket_cb) != 1) {
        PyErr_SetString(PyExc_ValueError, "OpenSSL refused the ticket key callback");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* set_keys(keys: sequence of 48- or 80-byte bytes, encrypt_with: int): the
 * process's ticket keys, for every context configured with tickets. */
static PyObject *set_keys(PyObject *self, PyObject *args) {
    PyObject *seq;
    int enc;
    if (!PyArg_ParseTuple(args, "Oi", &seq, &enc))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "keys must be a sequence");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n < 1 || n > MAX_KEYS || enc < 0 || enc >= n) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "expected 1 to %d keys and an index among them", MAX_KEYS);
        return NULL;
    }
    ticket_key fresh[MAX_KEYS];
    for (Py_ssize_t i = 0; i < n; i++) {
        char *buf;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(PySequence_Fast_GET_ITEM(fast, i), &buf, &len) < 0) {
            Py_DECREF(fast);
            return NULL;
        }
        if (len != 48 && len != 80) {
            Py_DECREF(fast);
            PyErr_Format(PyExc_ValueError, "a ticket key is 48 or 80 bytes, not %zd", len);
            return NULL;
        }
        int half = len == 80 ? 32 : 16;
        memset(&fresh[i], 0, sizeof fresh[i]);
        memcpy(fresh[i].name, buf, 16);
        memcpy(fresh[i].hmac, buf + 16, half);
        memcpy(fresh[i].aes, buf + 16 + half, half);
        fresh[i].size = (int)len;
    }
    Py_DECREF(fast);
    /* One thread (the worker's loop) calls this and runs every handshake, so
     * no callback can see the table half-written. */
    memcpy(keys, fresh, sizeof(ticket_key) * n);
    memset(keys + n, 0, sizeof(ticket_key) * (MAX_KEYS - n));
    nkeys = (int)n;
    encrypt_with = enc;
    Py_RETURN_NONE;
}

/* stats() -> (tickets issued, tickets decrypted, tickets with an unknown key) */
static PyObject *stats(PyObject *self, PyObject *unused) {
    return Py_BuildValue("(KKK)", issued, decrypted, unknown);
}

static PyMethodDef methods[] = {
    {"load", load, METH_O, "load(path of _ssl or None): find libssl's functions where _ssl found them"},
    {"options", options, METH_O, "SSL_CTX_get_options of an ssl.SSLContext"},
    {"configure", configure, METH_VARARGS, "configure(ctx, groups, tickets)"},
    {"set_keys", set_keys, METH_VARARGS, "set_keys(keys, encrypt_with)"},
    {"stats", stats, METH_NOARGS, "(issued, decrypted, unknown) ticket counts of this process"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "relay.tls._openssl", NULL, -1, methods};

PyMODINIT_FUNC PyInit__openssl(void) { return PyModule_Create(&module); }
