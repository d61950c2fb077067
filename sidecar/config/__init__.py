"""The config file: JSON5 -> settings (:mod:`.parser`), and the security warnings
``check-config`` prints (:mod:`.warnings`). See docs/configuration.md."""

from .parser import ConfigError, load, loads, parse_duration, parse_listen, parse_network
from .warnings import security_warnings

__all__ = [
    "ConfigError",
    "load",
    "loads",
    "parse_duration",
    "parse_listen",
    "parse_network",
    "security_warnings",
]
