"""wsrelay's data plane: configuration, HTTP head parsing, handshake validation,
admission against the shared client limit, and the relay pump."""

__version__ = "0.1.0"
