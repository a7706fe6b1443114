"""Domain exceptions shared by the core, engine, server and trainer.

Every message names the file and/or the field at fault, so a user can fix the input without reading code.
The server maps these to OpenAI-shaped error JSON (see mtlora_server.api.errors).
"""

from __future__ import annotations


class MtloraError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(MtloraError, ValueError):
    """An invalid configuration value. `field` names the offending field."""

    def __init__(self, message: str, field: str | None = None, path: str | None = None):
        prefix = f"{path}: " if path else ""
        super().__init__(prefix + message)
        self.field = field
        self.path = path


class CheckpointError(MtloraError):
    """A checkpoint that cannot be loaded: missing file, corrupt tensors, unknown keys, NaN/Inf, ..."""

    def __init__(self, message: str, path: str | None = None, field: str | None = None):
        prefix = f"{path}: " if path else ""
        super().__init__(prefix + message)
        self.path = path
        self.field = field


class IncompatibleAdapterError(CheckpointError):
    """The adapter was trained for another base model (shape or fingerprint mismatch)."""


class ModelResolutionError(MtloraError):
    """No route could produce the requested base model; the message lists every route tried."""


# -- serving-time errors (mapped to HTTP status codes by the server's single error handler) ----------------------
class InvalidRequestError(MtloraError, ValueError):
    """A request field has an invalid value (HTTP 400). `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """Prompt + max_tokens exceed the model's context (HTTP 400)."""


class AdapterNotFoundError(MtloraError, LookupError):
    """The requested model/adapter name is not served (HTTP 404)."""

    def __init__(self, name: str):
        super().__init__(f"The model `{name}` does not exist.")
        self.name = name


class AdapterLoadError(MtloraError):
    """An adapter could not be loaded or unloaded (HTTP 400); the server keeps serving what it had."""


class AdapterBusyError(AdapterLoadError):
    """The adapter cannot be unloaded while requests use it (HTTP 409); retrying after they finish can succeed."""


class EngineOverloadedError(MtloraError):
    """The waiting queue is full (HTTP 429/503 with Retry-After)."""

    def __init__(self, message: str = "server is overloaded, retry later", retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadError(MtloraError):
    """The engine loop died (HTTP 503); mtlora-serve then exits non-zero so that its supervisor restarts it."""


class EngineDrainingError(EngineDeadError):
    """The server is shutting down and admits no new requests (HTTP 503, like a dead engine: retry elsewhere)."""


class RequestFailedError(MtloraError):
    """The engine failed while serving this one request (HTTP 500); the other requests and the server carry on."""
