"""The compiled parts; everything else is declared in pyproject.toml.

- relay/native (the native data plane, README "Settings", RELAY_DATA_PLANE).
  Its TLS tunnels (relay/native/tls.c) call OpenSSL without its headers too.
- relay/tls/_openssl.c: what Python's ssl module cannot do for the TLS
  listeners (shared session ticket keys, key-exchange groups; README "TLS").
  Both need no OpenSSL headers (no libssl-dev): they find libssl's functions
  where Python's _ssl module loaded them, the one OpenSSL whose objects they
  are handed.

Both are optional: without a C compiler and Python's headers (Debian:
build-essential python3-dev) `pip install .` still installs the pure-Python
data plane, and TLS listeners with per-process ticket keys (a session resumes
only on the worker that issued it) and OpenSSL's default groups; the relay
says at startup why. WSRELAY_REQUIRE_NATIVE=1 (set by .ci/run) makes a failed
build of either an error, so CI never tests only the fallback without noticing.
"""

import os

from setuptools import Extension, setup

REQUIRED = os.environ.get("WSRELAY_REQUIRE_NATIVE", "") not in ("", "0")

setup(ext_modules=[
    Extension(
        "relay.native._engine",
        sources=["relay/native/_engine.c", "relay/native/_heads.c", "relay/native/engine.c",
                 "relay/native/handshake.c", "relay/native/http_head.c", "relay/native/ws_accept.c",
                 "relay/native/tls.c", "relay/native/fast_path.c", "relay/native/access_log.c"],
        depends=["relay/native/engine.h", "relay/native/handshake.h", "relay/native/http_head.h",
                 "relay/native/_heads.h", "relay/native/ws_accept.h", "relay/native/tls.h",
                 "relay/native/fast_path.h", "relay/native/access_log.h"],
        libraries=["dl"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                            "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
        optional=not REQUIRED,
    ),
    Extension("relay.tls._openssl", sources=["relay/tls/_openssl.c"], libraries=["dl"],
              extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
              optional=not REQUIRED),
])
