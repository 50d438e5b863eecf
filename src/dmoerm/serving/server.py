"""Running the reward server: :func:`serve` (any scorer) and :func:`serve_model` (``dmoerm serve``: a model
directory), with uvicorn and the request deadline of :mod:`dmoerm.serving.http`; :func:`build_model_app` loads
a model and builds its app without listening."""

from __future__ import annotations

import ipaddress
import logging
import time
from pathlib import Path

from fastapi import FastAPI

from dmoerm.data import Message
from dmoerm.outputs import Scorer
from dmoerm.serving.app import create_app
from dmoerm.serving.config import ServeConfig, ServeModelConfig

logger = logging.getLogger(__name__)

__all__ = ["build_model_app", "serve", "serve_model"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_bind(host: str, port: int, config: ServeConfig) -> None:
    if not isinstance(host, str) or not host.strip():
        raise ValueError("host: expected an interface address such as 127.0.0.1")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port: expected an integer in 0..65535, got {port!r}")
    if not _is_loopback(host) and config.token is None:
        logger.warning(
            "serving on %s without a token: anyone who can reach %s:%d can query the model", host, host, port
        )


def _run_uvicorn(app: FastAPI, host: str, port: int, config: ServeConfig) -> None:
    import uvicorn

    from dmoerm.serving.http import uvicorn_config

    uvicorn.Server(uvicorn_config(app, host, port, config)).run()


def serve(
    scorer: Scorer, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None
) -> None:
    """Serve ``scorer`` over HTTP until interrupted (blocking; uvicorn, one process).

    Binds the loopback interface by default; binding another interface without ``config.token`` logs a
    warning, since anyone who reaches the port can then use the model.
    """
    config = config or ServeConfig()
    _check_bind(host, port, config)
    if config.torch_threads is not None:
        import torch

        torch.set_num_threads(config.torch_threads)
    _run_uvicorn(create_app(scorer, config), host, port, config)


def build_model_app(config: ServeModelConfig) -> FastAPI:
    """Load ``config.model_dir`` and build its app (what :func:`serve_model` runs); does not listen."""
    from dmoerm.model import load_model

    if not isinstance(config, ServeModelConfig):
        raise TypeError(f"config: expected a ServeModelConfig, got {type(config).__name__}")
    config = config.resolved()
    folder = Path(config.model_dir)  # type: ignore[arg-type]
    if not folder.is_dir():
        raise ValueError(f"model_dir: {folder} is not a directory")
    if config.torch_threads is not None:
        import torch

        torch.set_num_threads(config.torch_threads)
    t0 = time.perf_counter()
    scorer = load_model(folder)
    logger.info(
        "loaded %s from %s in %.1f s (max_length %d)",
        type(scorer).__name__,
        folder,
        time.perf_counter() - t0,
        scorer.max_length,
    )
    if config.warmup:
        scorer.score([[Message("user", "Hello")]], ["Hello! How can I help?"], batch_size=1)
    return create_app(scorer, config)


def serve_model(config: ServeModelConfig) -> None:
    """``dmoerm serve``: load the model in ``config.model_dir`` and serve it until interrupted (blocking)."""
    config = config.resolved()
    _check_bind(config.host, config.port, config)
    app = build_model_app(config)
    logger.info("serving %s on http://%s:%d", config.model_dir, config.host, config.port)
    _run_uvicorn(app, config.host, config.port, config)
