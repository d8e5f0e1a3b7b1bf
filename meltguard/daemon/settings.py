"""Daemon settings: one frozen value built from flags and MELTGUARD_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from meltguard.daemon.logs import LogFormat


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str | None = None  # None: the built-in default policy
    model: str = "tiny"
    telemetry: str = "auto"
    store: str = "memory"  # the CLI defaults to sqlite under the XDG state dir
    log_format: LogFormat = "json"
    max_batch: int = 4
    sim_speed: float = 1.0
    replay_loop: bool = False
    admin_remote: bool = False  # admin routes answer loopback peers only unless this is set
    log_prompts: bool = False
    drain_timeout: float = 30.0
    idle_timeout: float = 75.0  # closes a connection idle, or mid-headers, this long
    body_timeout: float = 10.0  # a body that never finishes arriving gets 408 after this
    max_body_bytes: int = 1 << 20
    url_ttl: float = 3600.0  # response_format=url images are served this long
    public_url: str | None = None  # base for response_format=url; default http://host:port
    policy_poll: float = 1.0  # seconds between policy-file change checks; 0 disables
    gpus: tuple[int, ...] | None = None
    strategy: str = "meltguard"  # benchmark baselines: none | token-bucket | fixed-concurrency
    loop: str = "auto"  # auto (uvloop where installed) | uvloop | asyncio

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")
