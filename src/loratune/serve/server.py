"""Run the app with uvicorn, and read the API key without putting it on the command line."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from loratune.config import ConfigError

logger = logging.getLogger("loratune.serve")

API_KEY_ENV = "LORATUNE_API_KEY"


def read_api_key(key_file: str | None) -> str | None:
    """Return the API key from ``key_file`` (first line), else ``$LORATUNE_API_KEY``, else None."""
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise FileNotFoundError(f"--api-key-file {path} not found")
        lines = path.read_text(encoding="utf-8").splitlines()
        key = lines[0].strip() if lines else ""
        if not key:
            raise ConfigError(f"--api-key-file {path}: the first line is empty; write the key there")
        return key
    return os.environ.get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_server(app: FastAPI, host: str, port: int, shutdown_timeout_s: float) -> uvicorn.Server:
    """Configure uvicorn to log through loratune's logging; its own access log is off because
    the request guard logs every request with its id."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=shutdown_timeout_s,
    )
    return uvicorn.Server(config)


def run_server(app: FastAPI, host: str, port: int, shutdown_timeout_s: float, has_api_key: bool) -> None:
    """Serve until SIGINT or SIGTERM, then finish requests in flight (up to the timeout) and stop."""
    if not is_loopback(host) and not has_api_key:
        logger.warning(
            "Listening on %s without an API key: anyone who can reach this address can use the "
            "model. Set %s or --api-key-file.", host, API_KEY_ENV,
        )
    build_server(app, host, port, shutdown_timeout_s).run()
