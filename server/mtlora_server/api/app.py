"""FastAPI app factory: `build_app(engine, args) -> FastAPI` — thin routes over an `EngineClient`.

Contract:
- Routes only parse (pydantic, at the edge), call the serving functions and return; every failure goes through the
  one error schema of `api.errors` (client mistakes are 4xx, never 500).
- With `args.api_key`, every `/v1/*` route and /tokenize, /detokenize need `Authorization: Bearer <key>` (compared
  in constant time; the tokenizer routes take a `model` and so would tell which adapters exist); /health, /metrics
  and /tokenizer_info stay open.
- Completions and chat check `stop_token_ids` against the model's vocabulary before the engine sees them.
- Adapter loading (`--enable-adapter-loading --adapter-root DIR`): `lora_path` and every file the loader opens in it
  (adapter_config.json, adapter_model.safetensors / .bin) must resolve inside the root, so a symlink out of it is a
  400 naming the file; messages to the client show paths relative to the root (the absolute ones are logged).
  Unloading an adapter that requests still use is a 409. Loading registers the adapter (read and validated first);
  it is resident at once if a device slot is free, else it is brought in when a request needs it: a load never
  fails for lack of a slot. /v1/models lists every registered adapter, resident or not.
- A request body over `args.max_request_body_size` bytes gets 413 before any route reads it (api.limits).
- Tokenizer work of the routes (/tokenize, /detokenize included) runs off the event loop once an input is more
  than small (api.tokenization), so one huge request does not hold up /health or anyone else.
- The engine is started/shut down by the app's lifespan when `manage_engine` is true (the CLI); in-process tests
  that drive the app without a lifespan start the engine themselves.
- Every HTTP response carries `X-Request-Id`: the client's own (printable ASCII, at most 128 characters) or a
  fresh one. It names the request in logs (`request_id_var`, shown by mtlora-serve's log format) and in the
  response `id` (`cmpl-<id>`, `chatcmpl-<id>`, as vLLM); engine request ids start with it.
- CORS (`args.allowed_origins` non-empty): Starlette's CORSMiddleware outside the API-key check, so preflight
  requests need no key and error responses carry the CORS headers too. /version is open: {"version": ...}.
- /health answers 200 while the engine serves, else 503 in the error schema with the engine's reason (draining
  for shutdown, or dead). New generation requests during a drain get 503 from the engine (EngineDrainingError).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import uuid
from contextlib import asynccontextmanager
from contextvars import ContextVar
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware.cors import CORSMiddleware

import mtlora

from mtlora.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from mtlora.errors import AdapterLoadError, AdapterNotFoundError, InvalidRequestError, MtloraError
from mtlora_server.api.chat import create_chat_completion, render_chat
from mtlora_server.api.completions import create_completion
from mtlora_server.api.errors import ApiError, error_body, install_error_handlers
from mtlora_server.api.limits import BodySizeLimit
from mtlora_server.api.metrics import Metrics
from mtlora_server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    UnloadLoraAdapterRequest,
)
from mtlora_server.api.serving import ServerArgs, ServingContext
from mtlora_server.api.streams import ClientDisconnected

logger = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}$")
# Every file mtlora.checkpoint.load_adapter may open in an adapter directory (native, PEFT LoRA or official format).
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin")
# Routes outside /v1 that need the API key when one is set: they resolve `model`, i.e. reveal adapter names.
KEYED_PATHS = ("/tokenize", "/detokenize")


# Printable ASCII without spaces: safe in a log line and a response header.
_CLIENT_REQUEST_ID = re.compile(rb"^[\x21-\x7e]{1,128}$")
request_id_var: ContextVar[str | None] = ContextVar("mtlora_request_id", default=None)


class _RequestId:
    """Pure ASGI middleware: the request's id (client's X-Request-Id or a fresh one) in scope["state"]
    ("request_id", "request_id_given"), in `request_id_var` for logs, and echoed as X-Request-Id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope.get("headers") or [] if k == b"x-request-id"), None)
        ok = given is not None and _CLIENT_REQUEST_ID.match(given) is not None
        rid = given.decode("ascii") if ok else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["request_id_given"] = rid, ok
        token = request_id_var.set(rid)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers") or [] if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode("ascii"))]}
            await send(message)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class RequestIdLogFilter(logging.Filter):
    """Adds `request_tag` ("[<id>] " inside a request, else "") to log records, for a format such as
    "%(name)s: %(request_tag)s%(message)s"."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id_var.get()
        record.request_tag = f"[{rid}] " if rid else ""
        return True


class _AuthAndErrorCount:
    """Pure ASGI middleware (keeps streaming and disconnect propagation intact): API key on /v1, error counter."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        keyed = path.startswith("/v1") or path.rstrip("/") in KEYED_PATHS
        if self.key is not None and keyed and not self._authorized(scope):
            self.metrics.errors.labels("401").inc()
            body = json.dumps(error_body("invalid or missing API key (send 'Authorization: Bearer <key>')",
                                         "AuthenticationError", 401)).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": body})
            return

        async def counting_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.errors.labels(str(message["status"])).inc()
            await send(message)
        await self.app(scope, receive, counting_send)

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


def build_app(engine, args: ServerArgs | None = None, manage_engine: bool = False) -> FastAPI:
    args = args or ServerArgs()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            await engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await engine.shutdown()

    app = FastAPI(title="mtlora-serve", summary="OpenAI-compatible server for mtLoRA adapters", lifespan=lifespan)
    ctx = ServingContext(engine=engine, args=args, metrics=Metrics(engine))
    app.state.ctx = ctx
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected):
        return Response(status_code=499)   # nobody reads it; nginx's "client closed request"

    _add_openai_routes(app, ctx)
    _add_tokenizer_routes(app, ctx)
    _add_adapter_routes(app, ctx)
    _add_ops_routes(app, ctx)
    app.add_middleware(BodySizeLimit, max_bytes=args.max_request_body_size)   # inside: its 413s are counted
    app.add_middleware(_AuthAndErrorCount, api_key=args.api_key, metrics=ctx.metrics)
    if args.allowed_origins:                     # outside the key check: preflights carry no Authorization
        app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins,
                           allow_credentials=args.allow_credentials, allow_methods=args.allowed_methods,
                           allow_headers=args.allowed_headers, expose_headers=["X-Request-Id"])
    app.add_middleware(_RequestId)               # outermost: every response (401, 413, CORS) gets the id
    return app


def _add_openai_routes(app: FastAPI, ctx: ServingContext) -> None:
    @app.get("/v1/models")
    async def list_models() -> ModelList:
        base = ctx.served_name
        cards = [ModelCard(id=base, root=base, max_model_len=ctx.engine.max_model_len, created=ctx.created)]
        for info in ctx.engine.list_adapters():
            cards.append(ModelCard(id=info.name, root=info.path, parent=base, created=ctx.created))
        return ModelList(data=cards)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        ctx.check_token_ids(body.stop_token_ids or [], "stop_token_ids")
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        ctx.check_token_ids(body.stop_token_ids or [], "stop_token_ids")
        return await create_chat_completion(ctx, body, request)


def _add_tokenizer_routes(app: FastAPI, ctx: ServingContext) -> None:
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        ctx.resolve_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            text = await render_chat(ctx, body.messages, body.add_generation_prompt)
            content = await ctx.tokenize_json(text, False, "messages", bool(body.return_token_strs))
        else:
            content = await ctx.tokenize_json(body.prompt, body.add_special_tokens, "prompt",
                                              bool(body.return_token_strs))
        return Response(content, media_type="application/json")     # rendered off the loop when big

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        ctx.resolve_model(body.model)
        await ctx.tokens.run_ids(body.tokens, ctx.check_token_ids, body.tokens, "tokens")
        return {"prompt": await ctx.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = ctx.engine.tokenizer
        info = {"tokenizer_class": type(tok).__name__, "model_max_length": ctx.engine.max_model_len,
                "vocab_size": ctx.vocab_size, "chat_template": getattr(tok, "chat_template", None)}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = getattr(tok, name, None)
            info[name] = None if value is None else str(value)
        info["eos_token_id"] = getattr(tok, "eos_token_id", None)
        return info


class _AdapterRoot:
    """--adapter-root: resolves client paths inside it and keeps its absolute location out of client messages."""

    def __init__(self, root: str):
        self.raw = str(Path(root).absolute())
        self.path = Path(root).resolve()

    def relative(self, path: Path) -> str:
        return path.relative_to(self.path).as_posix() if path != self.path else "."

    def scrub(self, text: str) -> str:
        """`text` with the root's absolute location replaced by paths relative to it ("/srv/ad/x" -> "x")."""
        for root in sorted({str(self.path), self.raw} - {"/"}, key=len, reverse=True):
            text = re.sub(re.escape(root) + r"(/|(?![\w-]|\.\w))", lambda m: "" if m.group(1) else ".", text)
        return text

    def adapter_dir(self, raw: str) -> Path:
        """Resolve `raw` (absolute, or relative to the root); it and every adapter file in it must stay inside."""
        try:
            path = (self.path / raw).resolve()
        except (OSError, RuntimeError, ValueError):     # a symlink loop, a NUL byte, ...
            raise InvalidRequestError(f"cannot resolve lora_path {self.scrub(raw[:200])!r}",
                                      param="lora_path") from None
        if not path.is_relative_to(self.path):
            raise InvalidRequestError("lora_path must be inside the adapter root (--adapter-root)", param="lora_path")
        try:
            is_dir = path.is_dir()
        except OSError:                     # e.g. a name too long for the file system
            is_dir = False
        if not is_dir:
            raise InvalidRequestError(f"lora_path {self.scrub(raw[:200])!r} is not an adapter directory",
                                      param="lora_path")
        for name in ADAPTER_FILES:
            shown = f"{self.relative(path)}/{name}"
            try:
                target = (path / name).resolve()
            except (OSError, RuntimeError):             # a symlink loop
                raise InvalidRequestError(f"{shown} cannot be resolved", param="lora_path") from None
            if not target.is_relative_to(self.path):
                raise InvalidRequestError(f"{shown} links outside the adapter root (--adapter-root); copy the file "
                                          "into the adapter directory instead", param="lora_path")
        return path


def _add_adapter_routes(app: FastAPI, ctx: ServingContext) -> None:
    def require_enabled() -> _AdapterRoot:
        if not (ctx.args.enable_adapter_loading and ctx.args.adapter_root):
            raise ApiError(404, "adapter loading is disabled; start mtlora-serve with --enable-adapter-loading "
                           "--adapter-root DIR", "NotFoundError")
        return _AdapterRoot(ctx.args.adapter_root)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest):
        root = require_enabled()
        name = body.lora_name
        if not ADAPTER_NAME.match(name) or name in ctx.base_names():
            raise InvalidRequestError(f"invalid adapter name {name!r}", param="lora_name")
        if name in ctx.adapter_names():
            raise InvalidRequestError(f"an adapter named {name!r} is already loaded", param="lora_name")
        path = root.adapter_dir(body.lora_path)
        try:
            info = await ctx.engine.load_adapter(name, str(path))
        except (InvalidRequestError, AdapterNotFoundError):
            raise
        except Exception as exc:  # the engine must keep serving whatever went wrong with this one adapter
            detail = str(exc) if isinstance(exc, MtloraError) else f"{type(exc).__name__}: {exc}"
            logger.warning("loading adapter %s from %s failed: %s", name, path, detail,
                           exc_info=not isinstance(exc, MtloraError))
            raise AdapterLoadError(f"could not load adapter {name!r} from {root.relative(path)}: "
                                   f"{root.scrub(detail)}") from None
        logger.info("loaded adapter %s (%s, %d parameters) from %s", info.name, info.method,
                    info.num_parameters, info.path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest):
        require_enabled()
        if body.lora_name not in ctx.adapter_names():
            raise ApiError(404, str(AdapterNotFoundError(body.lora_name)), "NotFoundError", param="lora_name")
        await ctx.engine.unload_adapter(body.lora_name)     # AdapterBusyError (409) while requests use it
        logger.info("unloaded adapter %s", body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _add_ops_routes(app: FastAPI, ctx: ServingContext) -> None:
    @app.get("/health")
    async def health():
        """200 while serving; 503 with the reason while draining for shutdown or once the engine died."""
        if ctx.engine.is_healthy():
            return Response(status_code=200)
        problem = getattr(ctx.engine, "health_problem", lambda: None)() or "engine is not healthy"
        return JSONResponse(error_body(problem, "ServiceUnavailableError", 503), status_code=503)

    @app.get("/version")
    async def version():
        return {"version": mtlora.__version__}

    @app.get("/metrics")
    async def metrics():
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
