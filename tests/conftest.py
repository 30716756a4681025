import pytest

from tests.support.relay import LoopThread, Relay
from tests.support.origins import AiohttpOrigin, SilentOrigin, WebsocketsOrigin


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
def relay(ws_origin):
    """A 2-worker relay in front of the websockets origin, shared by a module's tests."""
    with Relay(ws_origin.addr, workers=2) as r:
        yield r


@pytest.fixture(scope="module")
def aio_relay(aio_origin):
    with Relay(aio_origin.addr, workers=2) as r:
        yield r
