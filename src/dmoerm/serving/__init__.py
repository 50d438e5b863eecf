"""The reward server: any :class:`~dmoerm.outputs.Scorer` over HTTP, with dynamic batching, for RL loops.

* :mod:`~dmoerm.serving.config`: :class:`ServeConfig`, :class:`ServeModelConfig` (the settings).
* :mod:`~dmoerm.serving.schemas`: request and response bodies as pydantic models (FastAPI validates them).
* :mod:`~dmoerm.serving.validation`: the body under its byte limit, its JSON, the count and text checks.
* :mod:`~dmoerm.serving.formats`: the wire formats of OpenRLHF and vLLM (verl).
* :mod:`~dmoerm.serving.batcher`: the micro-batcher merging concurrent requests into one scorer call.
* :mod:`~dmoerm.serving.app`: :func:`create_app`, the routes and error answers.
* :mod:`~dmoerm.serving.http`: uvicorn settings and the deadline on each request's headers and body.
* :mod:`~dmoerm.serving.server`: :func:`serve`, :func:`serve_model`, :func:`build_model_app`.
"""

from dmoerm.outputs import InputTooLongError
from dmoerm.serving.app import create_app
from dmoerm.serving.config import ServeConfig, ServeModelConfig
from dmoerm.serving.formats import (
    breakdown_keys,
    classification_response,
    extra_logs,
    pooling_response,
    score_texts_outputs,
    sigmoid,
    use_activation,
)
from dmoerm.serving.schemas import parse_classify, parse_get_reward, parse_score
from dmoerm.serving.server import build_model_app, serve, serve_model
from dmoerm.serving.validation import RequestError, parse_json, request_error

_LAZY = {"DeadlineH11Protocol", "deadline_protocol", "uvicorn_config"}
"""Names of :mod:`dmoerm.serving.http`, imported on first use: importing the package loads no uvicorn."""


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from dmoerm.serving import http

        return getattr(http, name)
    raise AttributeError(f"module 'dmoerm.serving' has no attribute {name!r}")


__all__ = [
    "DeadlineH11Protocol",
    "InputTooLongError",
    "RequestError",
    "ServeConfig",
    "ServeModelConfig",
    "breakdown_keys",
    "build_model_app",
    "classification_response",
    "create_app",
    "deadline_protocol",
    "extra_logs",
    "parse_classify",
    "parse_get_reward",
    "parse_json",
    "parse_score",
    "pooling_response",
    "request_error",
    "score_texts_outputs",
    "serve",
    "serve_model",
    "sigmoid",
    "use_activation",
    "uvicorn_config",
]
