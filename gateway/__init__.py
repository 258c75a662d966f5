"""The HTTP side of mlflow-model-gateway: config, app, proxy and CLI."""

from .app import Gateway, build_app
from .config import ConfigError, GatewayConfig, load_config, parse_config

__all__ = ["ConfigError", "Gateway", "GatewayConfig", "build_app", "load_config", "parse_config"]
