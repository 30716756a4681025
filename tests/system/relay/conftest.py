import pytest

from tests.support.origin_process import OriginProcess


@pytest.fixture
def origins():
    """Three origin processes, named a, b and c (each says its name in its first message)."""
    started = [OriginProcess(name).start() for name in ("a", "b", "c")]
    yield started
    for o in started:
        o.stop()
