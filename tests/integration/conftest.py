import pytest

from kubegfs.local import LocalCluster

CHUNK = 256 * 1024  # small chunks so files span several


@pytest.fixture
def make_cluster(tmp_path):
    """Start a cluster of ``n`` chunkservers (small chunks, fast heartbeats); stopped at teardown."""
    started = []

    def make(n=3, dead_after=1.5, chunk_size=CHUNK):
        cl = LocalCluster(tmp_path / f"kgfs{len(started)}", n, chunk_size=chunk_size, heartbeat=0.2,
                          dead_after=dead_after)
        started.append(cl)
        cl.start()
        return cl

    yield make
    for cl in started:
        cl.stop()


@pytest.fixture
def cluster(make_cluster):
    return make_cluster()


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
