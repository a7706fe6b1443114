"""The OpenAI-compatible HTTP API of mtlora-serve: `build_app(engine, args)`, see `api.app`."""

from mtlora_server.api.app import build_app
from mtlora_server.api.serving import ServerArgs

__all__ = ["build_app", "ServerArgs"]
