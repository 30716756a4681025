"""TLS across reloads and hosts (README, "TLS"): new certificates with no
refused connection, a bad pair refused with the running generation still
serving, and session tickets shared through RELAY_TLS_TICKET_KEYS by two
relay processes, rotated HAProxy's way."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import threading

from tests.support.relay import Relay, wait_for
from tests.support.scrape import metric
from tests.support.tls import client_context, issue, make_ca, names_for, s_client, tls_relay, wss_echo


def test_reload_serves_the_new_certificate_and_refuses_no_wss_connection(ws_origin, tmp_path):
    ca = make_ca(tmp_path)
    live = issue(ca, tmp_path, "live", "localhost", "old.example")
    renewed = issue(ca, tmp_path, "renewed", "localhost", "new.example")
    with tls_relay(ws_origin.addr, live, workers=2, RELAY_DRAIN_TIMEOUT="20") as r:
        ctx = client_context(tmp_path)
        url = f"wss://localhost:{r.tls_port}/"
        failures, done, held, stop = [], [0], [], threading.Event()

        async def clients():
            from websockets.asyncio.client import connect

            async with connect(url, ssl=ctx, open_timeout=10) as old:  # an open tunnel on generation 0
                await old.send("before")
                held.append(await asyncio.wait_for(old.recv(), 10))

                async def stream():
                    while not stop.is_set():
                        try:
                            async with connect(url, ssl=ctx, open_timeout=10) as ws:
                                await ws.send("x")
                                assert await asyncio.wait_for(ws.recv(), 10) == "x"
                            done[0] += 1
                        except Exception as e:  # noqa: BLE001 - every failure is the finding
                            failures.append(repr(e))

                await asyncio.gather(*(stream() for _ in range(3)))
                await old.send("after")  # the old generation's tunnel lives on
                held.append(await asyncio.wait_for(old.recv(), 10))

        thread = threading.Thread(target=asyncio.run, args=(clients(),))
        thread.start()
        try:
            wait_for(lambda: done[0] >= 10, 30, what="a stream of wss connections")
            assert "old.example" in names_for(r, "localhost")
            # certbot's way: the files named in the settings get new contents
            live.cert.write_bytes(renewed.cert.read_bytes())
            live.key.write_bytes(renewed.key.read_bytes())
            r.signal(signal.SIGHUP)
            r.wait_log("reload: generation 1 accepting", timeout=30)
            at_reload = done[0]
            wait_for(lambda: done[0] >= at_reload + 10, 30, what="connections after the reload")
        finally:
            stop.set()
            thread.join(60)
        assert failures == []
        assert held == ["before", "after"]
        assert "new.example" in names_for(r, "localhost")


def test_a_bad_certificate_or_a_key_that_does_not_match_is_refused_and_nothing_changes(ws_origin, tmp_path):
    ca = make_ca(tmp_path)
    live = issue(ca, tmp_path, "live", "localhost")
    other = issue(ca, tmp_path, "other", "localhost")
    good_key = live.key.read_bytes()
    with tls_relay(ws_origin.addr, live, workers=1) as r:
        live.key.write_bytes(other.key.read_bytes())  # a key for another certificate
        r.signal(signal.SIGHUP)
        r.wait_log("reload refused")
        line = next(x for x in r.log if "reload refused" in x)
        assert f"RELAY_TLS_KEY: {live.key} does not match the certificate in {live.cert}" in line
        live.key.write_bytes(good_key)
        live.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        r.signal(signal.SIGHUP)
        r.wait_log("reload refused", count=2)
        assert f"RELAY_TLS_CERT: {live.cert}: no PEM certificate in it" in r.text()
        assert wss_echo(f"wss://localhost:{r.tls_port}/", client_context(tmp_path), "still serving") == \
            ["still serving"]
        assert "generation 1" not in r.text() and "Traceback" not in r.text()


def _resumed(port: int, session) -> bool:
    out = s_client(port, "-sess_in", str(session), "-sess_out", str(session))
    assert "TLSv1.3" in out, out
    return "Reused, TLSv1.3" in out


def test_ticket_keys_file_two_relays_resume_each_others_sessions_and_rotate(ws_origin, tmp_path):
    ca = make_ca(tmp_path)
    pair = issue(ca, tmp_path, "localhost", "localhost")
    keys = tmp_path / "ticket.keys"
    k = [base64.b64encode(os.urandom(80)).decode() for _ in range(4)]
    keys.write_text(k[0] + "\n")
    env = {"RELAY_TLS_TICKET_KEYS": str(keys), "RELAY_LISTEN": ""}
    with tls_relay(ws_origin.addr, pair, workers=2, **env) as a, tls_relay(ws_origin.addr, pair, workers=2, **env) as b:
        session = tmp_path / "session"
        assert "New, TLSv1.3" in s_client(a.tls_port, "-sess_out", str(session))
        assert _resumed(b.tls_port, session)  # host B decrypts host A's ticket
        original = tmp_path / "original"
        original.write_bytes(session.read_bytes())
        # Rotation, fleet-wide: append a key everywhere, reload everywhere. With
        # k0..k2, k1 encrypts and k0 still decrypts: the first ticket resumes.
        keys.write_text("\n".join(k[:3]) + "\n")
        for relay, n in ((a, 1), (b, 1)):
            relay.signal(signal.SIGHUP)
            relay.wait_log(f"reload: generation {n} accepting", timeout=30)
        wait_for(lambda: _resumed(a.tls_port, tmp_path / "original"), 10, what="k0 still decrypting")
        original.write_bytes(session.read_bytes())
        fresh = tmp_path / "fresh"
        assert "New, TLSv1.3" in s_client(b.tls_port, "-sess_out", str(fresh))
        assert _resumed(a.tls_port, fresh)  # encrypted with k1 on B, decrypted on A
        # one more: k1..k3, k0 is gone: a ticket under k0 is a full handshake, no failure
        old = tmp_path / "under-k0"
        old.write_bytes(session.read_bytes())
        keys.write_text("\n".join(k) + "\n")
        a.signal(signal.SIGHUP)
        a.wait_log("reload: generation 2 accepting", timeout=30)
        assert _resumed(a.tls_port, fresh)  # k1 decrypts still
        assert not _resumed(a.tls_port, old)
        assert metric(a, "wsrelay_tls_handshakes_total", outcome="failed_other") == 0


def test_a_bad_ticket_key_file_is_refused_with_its_line(ws_origin, tmp_path):
    ca = make_ca(tmp_path)
    pair = issue(ca, tmp_path, "localhost", "localhost")
    keys = tmp_path / "ticket.keys"
    keys.write_text(base64.b64encode(os.urandom(80)).decode() + "\n" + base64.b64encode(os.urandom(30)).decode() + "\n")
    r = tls_relay(ws_origin.addr, pair, workers=1, RELAY_TLS_TICKET_KEYS=str(keys))
    r.start(wait_ready=False)
    assert r.proc.wait(20) == 2
    wait_for(lambda: f"RELAY_TLS_TICKET_KEYS: {keys}:2: a key is 80 bytes (or 48), this one is 30" in r.text(), 5,
             what="the line at fault")
