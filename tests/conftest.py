import os

import pytest

from relay import native
from tests.support.relay import LoopThread, Relay
from tests.support.origins import AiohttpOrigin, SilentOrigin, WebsocketsOrigin

#: Modules whose tests run once per data plane (README "Settings", RELAY_DATA_PLANE):
#: every relay they start serves its tunnels natively, then in Python
#: (test_tunnel.py combines the planes with its RELAY_MODE parameter itself).
#: On the native plane the head phase runs in C (relay/native/front.py) with
#: Python deciding each upgrade (WSRELAY_NATIVE_FAST_PATH=0), on the Python
#: plane in relay/client.py: the refusal, access-log, hostile-client and
#: proxy-safety suites hold both to the same answers.
BOTH_PLANES = {"test_tunnel_endings", "test_faults", "test_exhaustion", "test_lifecycle", "test_metrics",
               "test_refusals", "test_access_log", "test_hostile", "test_proxy_safety", "test_tls_tunnel"}
#: ...and these once more with the native engine on epoll instead of io_uring
EPOLL_TOO = {"test_tunnel_endings", "test_faults", "test_tls_tunnel"}
#: ...and these once more as the native plane runs by default: plain upgrades
#: decided by the fast path in C (relay/native/fast_path.py), whose tunnels
#: have no Python object and whose access-log lines C writes
#: (every module not listed here that starts a relay runs it that way)
FAST_TOO = {"test_tunnel_endings", "test_faults", "test_exhaustion", "test_lifecycle", "test_access_log",
            "test_hostile"}


def pytest_generate_tests(metafunc):
    module = metafunc.module.__name__.rpartition(".")[2]
    if "data_plane" in metafunc.fixturenames and module in BOTH_PLANES:
        planes = ["native", "python"] + (["native-epoll"] if module in EPOLL_TOO else []) \
            + (["native-fast"] if module in FAST_TOO else [])
        metafunc.parametrize("data_plane", planes, scope="module", indirect=True)


@pytest.fixture(scope="module", autouse=True)
def data_plane(request):
    """The RELAY_DATA_PLANE every Relay of the module gets (auto elsewhere).
    Module-scoped relay fixtures take it as an argument, so each plane gets its own."""
    plane = getattr(request, "param", "auto")
    if plane.startswith("native") and not native.AVAILABLE:
        if os.environ.get("WSRELAY_REQUIRE_NATIVE", "") not in ("", "0"):
            pytest.fail("WSRELAY_REQUIRE_NATIVE is set but the native data plane is unavailable: " + native.WHY_NOT)
        pytest.skip("native data plane unavailable: " + native.WHY_NOT)
    Relay.data_plane, _, variant = plane.partition("-")
    Relay.native_backend = variant if variant == "epoll" else ""
    Relay.fast_path = None if plane in ("auto", "python") else variant == "fast"
    yield plane
    Relay.data_plane = "auto"
    Relay.native_backend = ""
    Relay.fast_path = None


@pytest.fixture(params=["native", "python"], scope="module")
def tls_head(request):
    """Which head phase serves a TLS listener: the C one (the default) or
    relay/client.py (WSRELAY_NATIVE_TLS_HANDSHAKE=0, the reference); pass
    tests.support.tls.head_env(tls_head) to the relay."""
    return request.param


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA in a temp dir and a certificate from it for localhost and
    127.0.0.1: (dir, ca, pair), tests/support/tls.py's shapes."""
    from tests.support.tls import issue, make_ca

    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    return d, ca, issue(ca, d, "localhost", "localhost", "127.0.0.1")


@pytest.fixture(scope="session")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture(scope="session")
def ws_origin(loop_thread):
    o = WebsocketsOrigin(loop_thread).start()
    yield o
    o.stop()


@pytest.fixture(scope="session")
def aio_origin(loop_thread):
    o = AiohttpOrigin(loop_thread).start()
    yield o
    o.stop()


@pytest.fixture
def silent_origin(loop_thread):
    o = SilentOrigin(loop_thread).start()
    yield o
    o.stop()


@pytest.fixture(scope="module")
def relay(ws_origin, data_plane):
    """A 2-worker relay in front of the websockets origin, shared by a module's tests."""
    with Relay(ws_origin.addr, workers=2) as r:
        yield r


@pytest.fixture(scope="module")
def aio_relay(aio_origin, data_plane):
    with Relay(aio_origin.addr, workers=2) as r:
        yield r
