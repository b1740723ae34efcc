import pytest

from kubegfs.local import LocalCluster

CHUNK = 256 * 1024  # small chunks so files span several


@pytest.fixture
def cluster(tmp_path):
    cl = LocalCluster(tmp_path / "kgfs", 3, chunk_size=CHUNK, heartbeat=0.2, dead_after=1.5)
    cl.start()
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    cl = LocalCluster(tmp_path_factory.mktemp("kgfs"), 3, chunk_size=CHUNK, heartbeat=0.2, dead_after=1.5)
    cl.start()
    yield cl
    cl.stop()


@pytest.fixture
def client(shared_cluster):
    c = shared_cluster.client()
    yield c
    c.close()


def pytest_collection_modifyitems(items):
    for it in items:
        if "/integration/" in str(it.fspath):
            it.add_marker(pytest.mark.integration)
