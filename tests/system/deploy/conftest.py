import pytest

from tests.system.deploy.support import NotifySocket


@pytest.fixture
def notify():
    n = NotifySocket()
    yield n
    n.close()
