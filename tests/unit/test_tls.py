"""TLS pieces without processes (README, "TLS"): SNI matching, ticket key
files and the key store, the ticket callback of relay/tls/_openssl.c driven by
real OpenSSL handshakes in memory, certificate checks, outcomes."""

from __future__ import annotations

import base64
import os
import ssl
import time

import pytest
import trustme

from relay.errors import ConfigError
from relay.tls import handshake, openssl, tickets
from relay.tls.certs import check_pair
from relay.tls.names import Chooser, matches
from relay.tls.server import context, subject
from tests.support.tls import ECDSA, issue, make_ca


def test_names_exact_and_one_label_wildcards():
    assert matches("example.com", "EXAMPLE.com.")
    assert matches("*.example.com", "a.example.com")
    assert not matches("*.example.com", "example.com")
    assert not matches("*.example.com", "a.b.example.com")
    assert not matches("*.example.com", ".example.com")
    c = Chooser([["default.test"], ["*.b.test"], ["a.b.test"]])
    assert c.choose("a.b.test") == 2  # exact beats wildcard
    assert c.choose("x.b.test") == 1
    assert c.choose("nothing.test") is None and c.choose(None) is None and c.choose("") is None


def test_ticket_key_files_haproxy_and_nginx_forms():
    k = [os.urandom(80) for _ in range(4)]
    one = tickets.parse_key_file(base64.b64encode(k[0]) + b"\n")
    assert one.keys == (k[0],) and one.encrypt_with == 0
    three = tickets.parse_key_file(b"# comment\n" + b"\n".join(base64.b64encode(x) for x in k) + b"\n")
    assert three.keys == tuple(k[1:]) and three.encrypt_with == 1  # the last three; the second to last encrypts
    raw = tickets.parse_key_file(k[0])  # nginx: openssl rand 80 > file
    assert raw.keys == (k[0],)
    aes128 = tickets.parse_key_file(base64.b64encode(os.urandom(48)))
    assert len(aes128.keys[0]) == 48
    for bad, why in ((b"", "no key"), (b"!!!\n", ":1: not base64"), (base64.b64encode(b"x" * 30), "this one is 30")):
        with pytest.raises(ConfigError) as e:
            tickets.parse_key_file(bad, "/k")
        assert why in e.value.lines[0]


def test_key_store_carries_a_set_and_its_changes():
    store = tickets.KeyStore.create()
    worker = tickets.KeyStore.attach(os.dup(store.fd))
    assert worker.changed() is None  # nothing published yet
    ks = tickets.generated()
    store.publish(ks)
    assert worker.changed() == ks and worker.changed() is None
    nxt = tickets.rotated(ks)
    assert nxt.keys[:2] == ks.keys[1:] and nxt.encrypt_with == 1  # current -> previous, next -> current
    store.publish(nxt)
    assert worker.changed() == nxt
    worker.close()
    store.close()


def _pair(tmp_path):
    ca = make_ca(tmp_path)
    p = issue(ca, tmp_path, "localhost", "localhost")
    pem = tmp_path / "both.pem"
    pem.write_bytes(p.cert.read_bytes() + p.key.read_bytes())
    return ca, pem


def _handshake(server_ctx, client_ctx, session=None):
    """A real TLS 1.3 handshake between two in-memory OpenSSL endpoints; the
    client's session (with the ticket the server sent) and whether it resumed."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    for _ in range(10):
        for obj in (client, server):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    client.write(b"x")
    s_in.write(c_out.read())
    server.read(1)
    server.write(b"y")
    c_in.write(s_out.read())
    client.read(1)  # takes in the NewSessionTicket
    return client.session, client.session_reused


@pytest.mark.skipif(openssl.HELPER is None, reason=openssl.WHY_NOT)
def test_the_ticket_callback_rotates_without_losing_the_previous_key(tmp_path):
    ca, pem = _pair(tmp_path)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    a = context(str(pem), "1.2")
    b = context(str(pem), "1.2")  # "another worker": same keys, its own context
    ks = tickets.generated()
    openssl.set_keys(list(ks.keys), ks.encrypt_with)
    session, reused = _handshake(a, client_ctx)
    assert not reused
    _, reused = _handshake(b, client_ctx, session)
    assert reused
    openssl.set_keys(list(tickets.rotated(ks).keys), 1)  # 12 h later: the old current still decrypts
    _, reused = _handshake(b, client_ctx, session)
    assert reused
    ks2 = tickets.rotated(tickets.rotated(ks))  # 24 h later: gone, a full handshake (not a failure)
    openssl.set_keys(list(ks2.keys), 1)
    _, reused = _handshake(a, client_ctx, session)
    assert not reused
    issued, decrypted, unknown = openssl.HELPER.stats()
    assert issued >= 3 and decrypted >= 2 and unknown >= 1


def test_certificate_checks_name_each_problem(tmp_path):
    ca = make_ca(tmp_path)
    p = issue(ca, tmp_path, "a", "a.test", "*.a.test")
    c = check_pair(str(p.cert), str(p.key))
    assert c.names == ("a.test", "*.a.test") and c.key_type == "ECDSA P-256"
    other = issue(ca, tmp_path, "b", "b.test")
    with pytest.raises(ConfigError) as e:
        check_pair(str(p.cert), str(other.key))
    assert "does not match the certificate" in e.value.lines[0]
    with pytest.raises(ConfigError) as e:
        check_pair(str(p.cert), str(p.key), now=c.not_after + 1)
    assert "expired on" in e.value.lines[0]
    inter = ca.create_child_ca(key_type=ECDSA)
    leaf = inter.issue_cert("c.test", key_type=ECDSA)
    chain = leaf.cert_chain_pems  # leaf, intermediate
    (tmp_path / "rev.crt").write_bytes(chain[1].bytes() + chain[0].bytes())
    (tmp_path / "c.key").write_bytes(leaf.private_key_pem.bytes())
    (tmp_path / "ok.crt").write_bytes(chain[0].bytes() + chain[1].bytes())
    assert check_pair(str(tmp_path / "ok.crt"), str(tmp_path / "c.key")).names == ("c.test",)
    with pytest.raises(ConfigError) as e:
        check_pair(str(tmp_path / "rev.crt"), str(tmp_path / "c.key"))
    assert any("in order" in line for line in e.value.lines) or "does not match" in e.value.lines[0]
    with pytest.raises(ConfigError) as e:
        check_pair(str(tmp_path / "missing.crt"), str(p.key))
    assert "cannot read: No such file or directory" in e.value.lines[0]


def test_client_subject_is_rfc4514():
    cert = {"subject": ((("countryName", "DE"),), (("organizationName", "A, B+C"),), (("commonName", " x"),))}
    assert subject(cert) == "CN=\\ x,O=A\\, B\\+C,C=DE"
    assert subject(None) == "" and subject({}) == ""


def test_outcomes_and_the_first_byte():
    assert handshake.looks_like_tls(b"\x16\x03\x01") and handshake.looks_like_tls(b"\x80\x2e")
    assert not handshake.looks_like_tls(b"GET / HTTP/1.1") and not handshake.looks_like_tls(b"")
    err = ssl.SSLError(1, "x")
    err.reason = "UNSUPPORTED_PROTOCOL"
    assert handshake.outcome(err) == "failed_protocol"
    err.reason = "NO_SHARED_CIPHER"
    assert handshake.outcome(err) == "failed_cipher"
    err.reason = "CALLBACK_FAILED"
    assert handshake.outcome(err) == "failed_sni"
    err.reason = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert handshake.outcome(err) == "failed_client_certificate"
    assert handshake.outcome(ConnectionAbortedError()) == "timeout"
    assert handshake.outcome(ConnectionResetError()) == "client_abort"
    assert handshake.outcome(None) == "client_abort"
