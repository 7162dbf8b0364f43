"""The deployment file (`--config relaybeat.toml`): validated once at start, errors name the key.

Precedence for every setting: command-line flag > RELAYBEAT_* environment variable > this file >
built-in default. Unknown keys are errors, so a typo never silently does nothing.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from monitor.detector import Policy
from relay.wire import DEFAULT_INTERVAL_S, DEFAULT_PREFIX, Topics, is_valid_id


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


Seconds = Annotated[float, Field(gt=0, le=86_400)]


class MissesOverride(_Strict):
    hosts: str = Field(min_length=1, description="host-id glob, e.g. 'db-*'")
    misses: int = Field(ge=1, le=1000)


class DetectorConfig(_Strict):
    misses: int = Field(default=3, ge=1, le=1000)
    default_interval_s: Seconds = DEFAULT_INTERVAL_S
    misses_override: list[MissesOverride] = Field(default_factory=list)
    adaptive: bool = False
    phi_threshold: float = Field(default=8.0, ge=0.5, le=30)
    flap_window_s: Seconds = 600.0
    flap_start: int = Field(default=6, ge=2)
    flap_stop: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _flap_hysteresis(self) -> DetectorConfig:
        if self.flap_stop >= self.flap_start:
            raise ValueError(f"flap_stop ({self.flap_stop}) must be below flap_start ({self.flap_start})")
        return self

    def policy(self) -> Policy:
        return Policy(
            misses=self.misses,
            default_interval_s=self.default_interval_s,
            misses_by_glob=tuple((o.hosts, o.misses) for o in self.misses_override),
            adaptive=self.adaptive,
            phi_threshold=self.phi_threshold,
            flap_window_s=self.flap_window_s,
            flap_start=self.flap_start,
            flap_stop=self.flap_stop,
        )


class MonitorConfig(_Strict):
    broker: str = "mqtt://127.0.0.1:1883"
    db: str = "sqlite:///relaybeat.db"
    listen: str = "127.0.0.1:8000"
    prefix: str = DEFAULT_PREFIX
    client_id: str = "relaybeat-monitor"
    accept_direct_beats: bool = True

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        Topics(value)
        return value

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, value: str) -> str:
        if not is_valid_id(value):
            raise ValueError("must match [A-Za-z0-9._-]{1,128}")
        return value


class DeploymentConfig(_Strict):
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)


def load_config(path: Path | None) -> DeploymentConfig:
    """The file's settings over the defaults; ConfigError naming the key when something is wrong."""
    if path is None:
        return DeploymentConfig()
    try:
        with path.open("rb") as file:
            document: dict[str, Any] = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    document.pop("broker", None)  # the [broker] table belongs to `relaybeat broker --config`
    try:
        return DeploymentConfig.model_validate(document)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"])
            problems.append(f"{path}: {key}: {error['msg']}")
        raise ConfigError("\n".join(problems)) from None
