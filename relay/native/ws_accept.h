/* Sec-WebSocket-Accept (RFC 6455 §4.2.2 step 5.4): base64(SHA-1(key + GUID)),
 * computed in C so the head phase checks the common 101 without a Python call
 * (relay/handshake.py's accept_key is the reference; tests/unit/
 * test_native_accept.py holds this to it). SHA-1 here is RFC 3174's, used
 * only for this handshake value, never for anything that needs a secure hash.
 */
#ifndef WSRELAY_WS_ACCEPT_H
#define WSRELAY_WS_ACCEPT_H

#include <stddef.h>

#define WS_ACCEPT_LEN 28 /* base64 of 20 bytes */

/* out: WS_ACCEPT_LEN bytes, not NUL-terminated. key: the Sec-WebSocket-Key
 * value as received (any length; the relay has checked it is 24 characters). */
void ws_accept(const char *key, size_t n, char *out);

#endif
