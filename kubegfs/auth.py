"""Who may call what: one bearer token per role, and which roles each route admits.

Roles:
  ``client``   people, the CLI and the operator: the file-system API on the master, and reading
               and writing chunk data on chunkservers (GFS clients move data to chunkservers
               directly);
  ``internal`` the master and the chunkservers among themselves: heartbeats, replication, copy-on-
               write clones, version bumps, snapshot records;
  ``metrics``  Prometheus: ``GET /metrics`` and nothing else, so a scrape credential cannot read or
               write data.
A token given for no role separately stands for the client token (one shared token still works).
Pure: the HTTP middleware in ``web.py`` applies it."""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

Role = Literal["client", "internal", "metrics"]
ROLES: tuple[Role, ...] = ("client", "internal", "metrics")
ANY: frozenset[Role] = frozenset(ROLES)
OPEN = frozenset({"/healthz", "/readyz"})

Policy = Callable[[str, str], frozenset[Role]]  # (method, path) -> roles admitted


@dataclass(frozen=True)
class Tokens:
    client: str
    internal: str = ""
    metrics: str = ""

    def __post_init__(self) -> None:
        if not self.client:
            raise ValueError("the client token must not be empty")

    def of(self, role: Role) -> str:
        """The token ``role`` is held with (an unset role falls back to the client token)."""
        return getattr(self, role) or self.client

    @cached_property
    def _encoded(self) -> tuple[tuple[Role, bytes], ...]:
        return tuple((r, self.of(r).encode()) for r in ROLES)

    def roles_of(self, presented: str) -> frozenset[Role]:
        """Every role whose token is ``presented`` (constant-time comparisons, all of them made)."""
        got = presented.encode()
        return frozenset([r for r, token in self._encoded if hmac.compare_digest(got, token)])

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Tokens:
        """``KUBEGFS_{,INTERNAL_,METRICS_}TOKEN`` or the files ``…_TOKEN_FILE`` name."""
        env = dict(os.environ) if env is None else env

        def read(prefix: str) -> str:
            if f := env.get(f"KUBEGFS_{prefix}TOKEN_FILE"):
                return Path(f).read_text().strip()
            return env.get(f"KUBEGFS_{prefix}TOKEN", "").strip()

        return cls(read(""), read("INTERNAL_"), read("METRICS_"))


def master_policy(method: str, path: str) -> frozenset[Role]:
    if path == "/metrics":
        return ANY
    if path.startswith("/internal/"):
        return frozenset({"internal"})
    return frozenset({"client"})


def chunkserver_policy(method: str, path: str) -> frozenset[Role]:
    if path == "/metrics":
        return ANY
    if method in ("GET", "PUT") and path.startswith("/internal/chunks/") and path.count("/") == 3:
        return frozenset({"client", "internal"})  # the data path: clients read and write chunks
    return frozenset({"internal"})


def metrics_only_policy(method: str, path: str) -> frozenset[Role]:
    """A server that only exposes /metrics (the operator): scrapers and admins."""
    return frozenset({"metrics", "client"})
