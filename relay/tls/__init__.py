"""TLS termination (README, "TLS"), in small pieces:

- :mod:`relay.tls.server`: one ``ssl.SSLContext`` per certificate (Mozilla's
  "intermediate" profile, ALPN http/1.1), the SNI choice between them, the
  client certificate's subject;
- :mod:`relay.tls.names`: SNI against certificate names, wildcards included
  (sans-I/O);
- :mod:`relay.tls.certs`: certificate/key pairs read and checked;
- :mod:`relay.tls.tickets`: session ticket keys (key files, rotation, the
  store shared by the supervisor and its workers);
- :mod:`relay.tls.handshake`: TLS added to an accepted connection from the
  bytes it already read, and the outcome of a failed handshake;
- :mod:`relay.tls.openssl` and ``_openssl.c``: what Python's ssl module
  cannot do (ticket key callback, groups).
"""
