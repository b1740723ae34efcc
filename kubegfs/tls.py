"""TLS for every kubegfs connection: servers present a certificate, clients verify it.

Environment (every process reads the same names; the CLI also takes flags):
  KUBEGFS_TLS_CERT, KUBEGFS_TLS_KEY   a server's certificate chain and key (PEM): serve HTTPS
  KUBEGFS_CACERT                      the CA bundle clients verify https:// servers against
                                      (default: the system's)
  KUBEGFS_TLS_SERVER_NAME             the name clients verify instead of the URL's host. Pods are
                                      reached by IP (chunkservers advertise their pod IP, the
                                      operator finds the master pod), which no certificate made
                                      before the pod existed can name; every kubegfs certificate
                                      of a cluster carries this one name instead (Prometheus's
                                      ``tls_config.server_name`` does the same).
Verification is never turned off: there is no "insecure" switch."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class _NamedContext(ssl.SSLContext):
    """A client context that verifies ``server_name`` (when set) whatever host was dialled: both
    http.client (wrap_socket) and asyncio/aiohttp (wrap_bio) go through these two methods."""

    server_name: str | None = None

    def wrap_socket(self, sock: Any, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: Any = None, session: Any = None) -> Any:
        return super().wrap_socket(sock, server_side, do_handshake_on_connect, suppress_ragged_eofs,
                                   self.server_name or server_hostname, session)

    def wrap_bio(self, incoming: Any, outgoing: Any, server_side: bool = False, server_hostname: Any = None,
                 session: Any = None) -> Any:
        return super().wrap_bio(incoming, outgoing, server_side, self.server_name or server_hostname, session)


@dataclass(frozen=True)
class ClientTLS:
    cafile: str | None = None
    server_name: str | None = None

    @classmethod
    def from_env(cls, cafile: str | None = None) -> ClientTLS:
        return cls(cafile or os.environ.get("KUBEGFS_CACERT") or None,
                   os.environ.get("KUBEGFS_TLS_SERVER_NAME") or None)

    def context(self) -> ssl.SSLContext:
        """Verifies the chain against ``cafile`` (or the system's CAs) and the name, always."""
        ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cafile:
            ctx.load_verify_locations(self.cafile)
        else:
            ctx.load_default_certs()
        ctx.server_name = self.server_name
        return ctx


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def server_context_from_env(cert: str | None = None, key: str | None = None) -> ssl.SSLContext | None:
    """The server's context from flags or KUBEGFS_TLS_CERT/KEY; None = plain HTTP."""
    cert = cert or os.environ.get("KUBEGFS_TLS_CERT") or None
    key = key or os.environ.get("KUBEGFS_TLS_KEY") or None
    if bool(cert) != bool(key):
        raise ValueError("TLS needs both a certificate and its key (KUBEGFS_TLS_CERT and KUBEGFS_TLS_KEY)")
    return server_context(cert, key) if cert and key else None


def make_local_pki(directory: Path, ips: list[str], names: list[str]) -> tuple[Path, Path, Path]:
    """A CA and one server certificate (for ``ips`` and DNS ``names``) made with the openssl CLI, for
    ``kubegfs local up --tls`` and the tests: (ca.crt, server.crt, server.key). Made once per
    directory and reused while it names the same addresses."""
    exe = shutil.which("openssl")
    if exe is None:
        raise RuntimeError("TLS for the local cluster needs the `openssl` command")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca, crt, key = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    sans = ",".join([*(f"IP:{ip}" for ip in sorted(set(ips))), *(f"DNS:{n}" for n in sorted(set(names)))])
    stamp = directory / "sans"
    if crt.exists() and stamp.exists() and stamp.read_text() == sans:
        return ca, crt, key

    def run(*args: str) -> None:
        r = subprocess.run([exe, *args], cwd=directory, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {r.stderr.strip()}")

    if not ca.exists():
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650", "-subj", "/CN=kubegfs-local-ca",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (directory / "server.ext").write_text("basicConstraints=critical,CA:FALSE\n"
                                          "keyUsage=critical,digitalSignature,keyEncipherment\n"
                                          f"extendedKeyUsage=serverAuth\nsubjectAltName={sans}\n")
    run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=kubegfs")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "3650", "-extfile", "server.ext", "-out", "server.crt")
    stamp.write_text(sans)
    return ca, crt, key
