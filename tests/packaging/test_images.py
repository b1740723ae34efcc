"""The container images, built and run for real (no Docker engine, no registry).

* `hack/images/base.sh` makes a Debian bookworm + python3 base with debootstrap (rootfs cached in
  ~/.cache/kubegfs/rootfs) and imports it into buildah;
* `hack/images/build.sh --tool buildah` builds master, chunkserver and operator on it with
  `buildah bud --isolation chroot` from the offline wheelhouse;
* each image is smoke-run with `buildah run --isolation chroot`: entrypoint `--help`, user 10001,
  no pip/compilers, labels/healthcheck metadata; then a master and a chunkserver from the images
  serve /healthz on loopback, the chunkserver registers, and both stop cleanly on SIGTERM.

Run alone: `pytest -p no:cacheprovider tests/packaging/test_images.py -q` (or `-m images`).
Needs root; installs buildah and debootstrap with apt-get when missing and FAILS (never skips)
when it cannot. Build timings go to .cache/images/test-timings.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from kubegfs_dev.util import free_port, wait_http

pytestmark = [pytest.mark.images, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "images"
LOGS = CACHE / "logs"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
COMPONENTS = ("master", "chunkserver", "operator")
UID = "10001"
ISOLATION = ["--isolation", "chroot"]


# ------------------------------------------------------------------------------------- helpers

def sh(cmd: list[str], *, log: str | None = None, timeout: float = 900, check: bool = True,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure the assertion shows its tail (and the full output is in LOGS)."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                       env={**os.environ, **(env or {})})
    if log:
        LOGS.mkdir(parents=True, exist_ok=True)
        (LOGS / log).write_text(f"$ {' '.join(cmd)}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    if check and p.returncode != 0:
        tail = "\n".join((p.stdout + "\n" + p.stderr).strip().splitlines()[-40:])
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{tail}")
    return p


def ensure_tools() -> None:
    """buildah and debootstrap must be there: install them, or fail loudly (never skip)."""
    assert os.geteuid() == 0, "the image tests need root (debootstrap, buildah --isolation chroot)"
    missing = [t for t in ("buildah", "debootstrap") if shutil.which(t) is None]
    if missing:
        assert shutil.which("apt-get"), f"{missing} missing and no apt-get to install them"
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        sh(["apt-get", "update", "-q"], log="apt-get-update.log", env=env)
        sh(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
           log="apt-get-install.log", env=env)
    for t in ("buildah", "debootstrap"):
        assert shutil.which(t), f"{t} could not be installed"


def inspect(image: str) -> dict[str, Any]:
    out = sh(["buildah", "inspect", "--type", "image", image]).stdout
    return json.loads(out)


@contextlib.contextmanager
def working_container(image: str) -> Iterator[str]:
    """A fresh buildah working container, always removed afterwards."""
    name = f"kubegfs-test-{uuid.uuid4().hex[:10]}"
    sh(["buildah", "from", "--pull=never", "--name", name, image])
    try:
        yield name
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True)


def run_in(ctr: str, *argv: str, volumes: tuple[str, ...] = (), env: dict[str, str] | None = None,
           user: str | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = ["buildah", "run", *ISOLATION]
    for v in volumes:
        cmd += ["-v", v]
    for k, val in (env or {}).items():
        cmd += ["--env", f"{k}={val}"]
    if user:
        cmd += ["--user", user]
    return sh([*cmd, ctr, "--", *argv], check=check, timeout=120)


def stdout_of(ctr: str, *argv: str) -> str:
    """stdout of a command that must print something. buildah run --isolation chroot relays the
    output through its own pipes; under load a short-lived process's output has (rarely) come
    back empty, so an empty answer is retried."""
    for _ in range(3):
        p = run_in(ctr, *argv)
        if p.stdout.strip():
            return p.stdout.strip()
    raise AssertionError(f"{argv}: no output ({p.returncode}): {p.stderr}")


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, comm) of every descendant of pid (only processes this test started)."""
    children: dict[int, list[int]] = {}
    comm: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces/parentheses, so split at the last ')'
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
        comm[int(d.name)] = name
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append((c, comm[c]))
            todo.append(c)
    return out


class Server:
    """`buildah run --isolation chroot CTR -- kubegfs …` in the background.

    Stopping sends SIGTERM to the kubegfs process inside (buildah itself would SIGKILL its child
    on SIGTERM), so the server shuts down the way a kubelet stops a container, and buildah run
    then exits with the server's own status."""

    def __init__(self, ctr: str, argv: list[str], volumes: tuple[str, ...], log: Path) -> None:
        cmd = ["buildah", "run", *ISOLATION]
        for v in volumes:
            cmd += ["-v", v]
        self.log = log
        self._out = log.open("wb")
        self.popen = subprocess.Popen([*cmd, ctr, "--", *argv], stdout=self._out,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_http(self, url: str, timeout: float = 60) -> Any:
        """The JSON body of the first 200 answer from ``url``."""

        def alive() -> None:
            assert self.popen.poll() is None, f"exited {self.popen.returncode}:\n{self.output()}"

        try:
            body = wait_http(url, timeout=timeout, ok=lambda status, _body: status == 200, alive=alive,
                             interval=0.3)
        except TimeoutError as e:
            raise AssertionError(f"{e}:\n{self.output()}") from None
        return json.loads(body)

    def server_pids(self) -> list[int]:
        return [p for p, name in descendants(self.popen.pid) if name == "kubegfs"]

    def stop(self, timeout: float = 30) -> int:
        if self.popen.poll() is None:
            pids = self.server_pids()
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGTERM)
            if not pids:
                self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                for p, _ in descendants(self.popen.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)
                self.popen.kill()
                self.popen.wait(10)
        self._out.close()
        return self.popen.returncode


# ------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def timings() -> Iterator[dict[str, Any]]:
    t: dict[str, Any] = {}
    yield t
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "test-timings.json").write_text(json.dumps(t, indent=2) + "\n")


@pytest.fixture(scope="module")
def base_image(timings: dict[str, Any]) -> str:
    ensure_tools()
    start = time.monotonic()
    out = sh(["bash", "hack/images/base.sh"], log="base.log").stdout.strip().splitlines()
    timings["base_seconds"] = round(time.monotonic() - start, 1)
    assert out, "base.sh printed no image name"
    return out[-1]


@pytest.fixture(scope="module")
def images(base_image: str, timings: dict[str, Any]) -> dict[str, str]:
    start = time.monotonic()
    p = sh(["bash", "hack/images/build.sh", "--tool", "buildah", "--base", base_image],
           log="build.log", env={"REGISTRY": "", "PUSH": "0"})
    timings["build_seconds"] = round(time.monotonic() - start, 1)
    built: dict[str, str] = {}
    for line in p.stdout.strip().splitlines():  # "TAG SIZE" per image, nothing else on stdout
        tag, _, size = line.partition(" ")
        component = tag.split("/")[-1].split(":")[0]
        # buildah stores registry-less names under localhost/
        built[component] = tag if "." in tag.split("/")[0] else f"localhost/{tag}"
        timings.setdefault("sizes", {})[component] = size
    assert set(built) == set(COMPONENTS), p.stdout
    for c, tag in built.items():
        assert tag == f"localhost/kubegfs/{c}:{VERSION}"
    return built


@pytest.fixture
def secrets() -> Iterator[tuple[Path, str]]:
    """A token file readable by the image's user only, in a folder mounted at /secrets."""
    d = Path(tempfile.mkdtemp(prefix="kubegfs-img-"))
    d.chmod(0o755)
    token = uuid.uuid4().hex
    f = d / "token"
    f.write_text(token + "\n")
    os.chown(f, int(UID), int(UID))
    f.chmod(0o400)
    yield d, token
    shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------- tests

def test_base_image_has_python311_and_venv(base_image: str) -> None:
    with working_container(base_image) as ctr:
        p = run_in(ctr, "python3", "-c", "import sys, venv, ensurepip; print(sys.executable, sys.version_info[:2])")
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == "/usr/bin/python3 (3, 11)"
        p = run_in(ctr, "sh", "-c", "python3 -m venv /tmp/v && /tmp/v/bin/python -m pip --version")
        assert p.returncode == 0 and "pip" in p.stdout, p.stderr


@pytest.mark.parametrize("component", COMPONENTS)
def test_image_metadata(images: dict[str, str], component: str) -> None:
    cfg = inspect(images[component])["Docker"]["config"]
    assert cfg["User"] == f"{UID}:{UID}"
    labels = cfg["Labels"]
    assert labels["org.opencontainers.image.title"] == f"kubegfs-{component}"
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.description"]
    assert labels["org.opencontainers.image.source"].strip()
    # the commit the image was built from (HEAD then; others may have committed since)
    rev = labels["org.opencontainers.image.revision"].removesuffix("-dirty")
    assert len(rev) == 40 and sh(["git", "cat-file", "-t", rev]).stdout.strip() == "commit", rev
    hc = cfg["Healthcheck"]["Test"]
    assert hc[:3] == ["CMD", "/opt/kubegfs/bin/python", "-c"] and "KUBEGFS_HEALTHCHECK_URL" in hc[3]
    url = dict(e.split("=", 1) for e in cfg["Env"])["KUBEGFS_HEALTHCHECK_URL"]
    port = {"master": 9400, "chunkserver": 9500, "operator": 8080}[component]
    assert url == f"http://127.0.0.1:{port}/healthz"
    assert f"{port}/tcp" in cfg["ExposedPorts"]
    if component == "operator":
        assert cfg["Entrypoint"] == ["/opt/kubegfs/bin/kubegfs-operator"]
        assert not cfg.get("Volumes")
    else:
        assert cfg["Entrypoint"] == ["/opt/kubegfs/bin/kubegfs", component]
        assert cfg["Volumes"] == {"/data": {}}
        assert cfg["WorkingDir"] == "/data"
        assert cfg["Cmd"] == ["--listen", f"0.0.0.0:{port}", "--data", "/data"]


@pytest.mark.parametrize("component", COMPONENTS)
def test_images_are_thin_layers_on_the_shared_runtime(images: dict[str, str], component: str) -> None:
    """Each image is the shared runtime (images/runtime/) plus metadata only: title, port,
    entrypoint. The master and the chunkserver share one runtime."""
    runtime = "runtime-operator" if component == "operator" else "runtime"
    base = inspect(f"localhost/kubegfs/{runtime}:{VERSION}")["Docker"]["rootfs"]["diff_ids"]
    assert base
    assert inspect(images[component])["Docker"]["rootfs"]["diff_ids"] == base


@pytest.mark.parametrize("component", COMPONENTS)
def test_image_smoke(images: dict[str, str], component: str) -> None:
    entrypoint = inspect(images[component])["Docker"]["config"]["Entrypoint"]
    with working_container(images[component]) as ctr:
        p = run_in(ctr, *entrypoint, "--help")
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("Usage: "), p.stdout
        assert "--master" in p.stdout if component == "chunkserver" else True
        assert "--liveness" in p.stdout if component == "operator" else True

        # The configured user (no --user given) is the numeric non-root one.
        assert stdout_of(ctr, "id", "-u") == UID
        assert stdout_of(ctr, "id", "-g") == UID

        # No installer and no compiler anywhere on PATH, none importable, none in the venv.
        p = run_in(ctr, "sh", "-c", "command -v pip pip3 pip3.11 gcc cc c++ g++ make || true")
        assert p.stdout.strip() == "", p.stdout
        for py in ("/opt/kubegfs/bin/python", "python3"):
            p = stdout_of(ctr, py, "-c", "import importlib.util as u; "
                          "print([m for m in ('pip', 'ensurepip', 'setuptools', 'wheel') if u.find_spec(m)])")
            assert p == "[]", (py, p)
            p = run_in(ctr, py, "-m", "pip", "--version")
            assert p.returncode != 0, (py, p.stdout)
        p = run_in(ctr, "sh", "-c", "ls /opt/kubegfs/lib/python3*/site-packages")
        assert p.returncode == 0
        site = p.stdout.split()
        assert not [d for d in site if d.split("-")[0].lower() in {"pip", "setuptools", "wheel"}], site

        # The venv's interpreter is the base's python 3.11, and the code imports.
        p = run_in(ctr, "/opt/kubegfs/bin/python", "-c",
                   "import sys, kubegfs; print(sys.version_info[:2], kubegfs.__file__)")
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("(3, 11) /opt/kubegfs/lib/python3.11/site-packages/kubegfs/"), p.stdout
        mod = "kubegfs_operator.main" if component == "operator" else f"kubegfs.{component}.server"
        p = run_in(ctr, "/opt/kubegfs/bin/python", "-c", f"import {mod}")
        assert p.returncode == 0, p.stderr
        p = run_in(ctr, "/opt/kubegfs/bin/kubegfs", "--version")
        assert p.returncode == 0 and VERSION in p.stdout, p.stdout + p.stderr
        if component == "operator":  # what the chart's CRD-upgrade hook Job runs
            p = run_in(ctr, "kubegfs-operator-crds", "--help")
            assert p.returncode == 0 and "CRDs" in p.stdout, p.stdout + p.stderr

        # /data (master, chunkserver) is the user's; the image's files are not.
        if component != "operator":
            p = run_in(ctr, "sh", "-c", "stat -c '%u:%g %a' /data && touch /data/x && ! touch /opt/kubegfs/x")
            assert p.returncode == 0, p.stdout + p.stderr
            assert p.stdout.splitlines()[0] == f"{UID}:{UID} 750"


def test_buildah_chroot_shares_the_host_network(base_image: str) -> None:
    """The servers below are reached from the host on 127.0.0.1: that relies on this."""
    host = os.readlink("/proc/self/ns/net")
    with working_container(base_image) as ctr:
        p = run_in(ctr, "readlink", "/proc/self/ns/net")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == host


def test_master_and_chunkserver_serve_on_loopback(images: dict[str, str], secrets: tuple[Path, str],
                                                   tmp_path: Path) -> None:
    sdir, token = secrets
    vol = (f"{sdir}:/secrets:ro",)
    mport, cport = free_port(), free_port()
    master_url = f"http://127.0.0.1:{mport}"
    auth = {"Authorization": f"Bearer {token}"}
    with contextlib.ExitStack() as stack:
        mctr = stack.enter_context(working_container(images["master"]))
        cctr = stack.enter_context(working_container(images["chunkserver"]))
        master = Server(mctr, ["/opt/kubegfs/bin/kubegfs", "master", "--listen", f"127.0.0.1:{mport}",
                               "--data", "/data", "--token-file", "/secrets/token", "--dead-after", "3"],
                        vol, tmp_path / "master.log")
        stack.callback(master.stop)
        assert master.wait_http(f"{master_url}/healthz")["ok"] is True
        assert requests.get(f"{master_url}/api/v1/chunkservers", timeout=5).status_code == 401
        assert requests.get(f"{master_url}/api/v1/chunkservers", headers=auth, timeout=5).json() == {
            "chunkservers": []}

        cs = Server(cctr, ["/opt/kubegfs/bin/kubegfs", "chunkserver", "--listen", f"127.0.0.1:{cport}",
                           "--master", master_url, "--advertise", f"http://127.0.0.1:{cport}",
                           "--data", "/data", "--token-file", "/secrets/token",
                           "--node", "node-a", "--zone", "zone-a", "--region", "region-a"],
                    vol, tmp_path / "chunkserver.log")
        stack.callback(cs.stop)
        assert cs.wait_http(f"http://127.0.0.1:{cport}/healthz")["ok"] is True

        deadline = time.monotonic() + 30
        listed: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            listed = requests.get(f"{master_url}/api/v1/chunkservers", headers=auth,
                                  timeout=5).json()["chunkservers"]
            if listed and listed[0]["alive"]:
                break
            time.sleep(0.3)
        assert len(listed) == 1 and listed[0]["alive"], (listed, cs.output())
        assert listed[0]["address"] == f"http://127.0.0.1:{cport}"
        assert listed[0]["location"]["zone"] == "zone-a"
        assert requests.get(f"http://127.0.0.1:{cport}/readyz", timeout=5).status_code == 200

        # The images' own HEALTHCHECK commands pass against the running servers (and fail
        # against a port with nothing on it).
        for component, port in (("master", mport), ("chunkserver", cport)):
            hc = inspect(images[component])["Docker"]["config"]["Healthcheck"]["Test"][1:]
            with working_container(images[component]) as hctr:
                ok = run_in(hctr, *hc, env={"KUBEGFS_HEALTHCHECK_URL": f"http://127.0.0.1:{port}/healthz"})
                assert ok.returncode == 0, ok.stderr
                bad = run_in(hctr, *hc, env={"KUBEGFS_HEALTHCHECK_URL": f"http://127.0.0.1:{free_port()}/healthz"})
                assert bad.returncode != 0

        # The servers run as the image's user, inside the container's root.
        for srv in (master, cs):
            (pid,) = srv.server_pids()
            assert os.stat(f"/proc/{pid}").st_uid == int(UID)
            assert os.readlink(f"/proc/{pid}/root") != "/"

        # Clean stop: SIGTERM to each server; buildah run reports the server's exit status 0.
        assert cs.stop() == 0, cs.output()
        assert master.stop() == 0, master.output()
    assert "master listening on" in master.output()
    for p in (mport, cport):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", p)) != 0, f"port {p} still open"
