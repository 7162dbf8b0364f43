"""The shipped broker configurations (`mosquitto.conf`, `acl`, `amqtt.toml`), installed as data with
relaybeat so `relaybeat broker` and the docs find them in a wheel as well as in a checkout."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
