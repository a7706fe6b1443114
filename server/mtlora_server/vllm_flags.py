"""vLLM's server flags accepted by `mtlora-serve`, so that a `vllm serve` launch line works unchanged.

Contract:
- `add_arguments(parser)` adds the "vLLM-compatible flags" group (names, forms and defaults as in vLLM's
  entrypoints/openai/cli_args.py, except `--allowed-origins`: no CORS unless asked, where vLLM allows every origin).
- `apply(parser, ns) -> dict[str, str]` folds them into mtlora's own settings and returns the adapters that
  `--lora-modules` names (NAME=PATH or vLLM's JSON form {"name": ..., "path": ..., "base_model_name": ...}):
  `--max-loras N` is `--max-adapters N`; `--dtype half` / `float` are float16 / float32; `--chat-template` (a file,
  else inline jinja with backslash escapes such as \\n decoded, as vLLM does) is read and compiled;
  `--allowed-origins` / `--allowed-methods` / `--allowed-headers` are JSON lists; the TLS files must exist
  (`--ssl-keyfile` needs `--ssl-certfile`). Any bad value ends the process with status 2 (`parser.error`) and a
  message naming the flag. `--enable-lora`, `--disable-log-requests` and `--disable-log-stats` are accepted and
  change nothing (adapters are always on; requests and periodic stats are not logged).
- `--gpu-memory-utilization F`: on CUDA the KV cache takes F of the GPU memory left free after the weights and
  adapter slots are loaded (vLLM's F counts the whole GPU, weights included, so the same F gives mtlora a somewhat
  larger cache); on CPU it has no effect and `--kv-cache-memory` sizes the cache (logged at startup).
  `--kv-cache-memory` wins over it when both are given.
- `api_key_from_env()` is MTLORA_API_KEY, else VLLM_API_KEY (so a vLLM deployment keeps its authentication).
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger("mtlora_server.cli")

DTYPE_ALIASES = {"half": "float16", "float": "float32", "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16", "half", "float"]
UVICORN_LOG_LEVELS = ["debug", "info", "warning", "error", "critical", "trace"]
_JINJA_CHARS = "{}\n"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("vLLM-compatible flags", "vLLM's names for the same settings, so a vLLM launch "
                                  "line works unchanged.")
    g.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH|JSON",
                   help="Adapters to serve, as vLLM spells them: NAME=PATH or '{\"name\": NAME, \"path\": PATH}'; "
                        "the same as --adapter NAME=PATH.")
    g.add_argument("--enable-lora", action="store_true",
                   help="Accepted for vLLM compatibility; adapters are always enabled.")
    g.add_argument("--max-loras", type=int, default=None, metavar="N",
                   help="The same as --max-adapters N (adapter slots; all of them may be in one batch).")
    g.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                   help="On CUDA: the fraction (0, 1] of the GPU memory left free after loading the weights that "
                        "the KV cache takes (default 0.85). On CPU: no effect; --kv-cache-memory sizes the cache.")
    g.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                   help="Jinja chat template replacing the tokenizer's: a file, or the template itself inline.")
    g.add_argument("--allowed-origins", type=_json_list("--allowed-origins"), default=[], metavar="JSON",
                   help="CORS: origins allowed to call the API from a browser, e.g. '[\"https://app.example\"]' or "
                        "'[\"*\"]'. Default: none (no CORS headers; vLLM's default is [\"*\"]).")
    g.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials (cookies, auth).")
    g.add_argument("--allowed-methods", type=_json_list("--allowed-methods"), default=["*"], metavar="JSON",
                   help="CORS: allowed methods (JSON list).")
    g.add_argument("--allowed-headers", type=_json_list("--allowed-headers"), default=["*"], metavar="JSON",
                   help="CORS: allowed request headers (JSON list).")
    g.add_argument("--uvicorn-log-level", default=None, choices=UVICORN_LOG_LEVELS,
                   help="uvicorn's log level (default: --log-level).")
    g.add_argument("--ssl-keyfile", default=None, metavar="FILE", help="TLS: private key file (PEM); serve HTTPS.")
    g.add_argument("--ssl-certfile", default=None, metavar="FILE", help="TLS: certificate chain file (PEM).")
    g.add_argument("--ssl-ca-certs", default=None, metavar="FILE",
                   help="TLS: CA certificates to verify client certificates with (see --ssl-cert-reqs).")
    g.add_argument("--ssl-cert-reqs", type=int, default=0, choices=[0, 1, 2], metavar="{0,1,2}",
                   help="TLS: client certificates: 0 not asked, 1 optional, 2 required (Python's ssl.CERT_*).")
    g.add_argument("--disable-log-requests", action="store_true",
                   help="Accepted for vLLM compatibility; request contents are never logged.")
    g.add_argument("--disable-log-stats", action="store_true",
                   help="Accepted for vLLM compatibility; there are no periodic stats logs (see /metrics).")
    return parser


def _json_list(flag: str):
    def parse(text: str) -> list[str]:
        try:
            value = json.loads(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a JSON list of strings, e.g. '[\"*\"]', got {text!r}") \
                from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
        return value
    parse.__name__ = flag           # argparse names the type in its error message
    return parse


def api_key_from_env() -> str | None:
    return os.environ.get("MTLORA_API_KEY") or os.environ.get("VLLM_API_KEY") or None


def lora_modules(specs: list[str]) -> dict[str, str]:
    """vLLM's --lora-modules values -> {name: path}; ValueError naming the value."""
    out: dict[str, str] = {}
    for spec in specs:
        if spec.lstrip().startswith("{"):
            try:
                item = json.loads(spec)
            except ValueError as exc:
                raise ValueError(f"--lora-modules {spec!r}: invalid JSON ({exc})") from None
            unknown = set(item) - {"name", "path", "base_model_name"}
            if unknown:
                raise ValueError(f"--lora-modules {spec!r}: unknown key(s) {sorted(unknown)}; expected name, path "
                                 "and optionally base_model_name")
            name, path = item.get("name"), item.get("path")
        else:
            name, sep, path = spec.partition("=")
            if not sep:
                raise ValueError(f"--lora-modules {spec!r}: expected NAME=PATH or a JSON object")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ValueError(f"--lora-modules {spec!r}: needs a non-empty name and path")
        add_adapter(out, "--lora-modules", spec, name, path)
    return out


def add_adapter(out: dict[str, str], flag: str, spec: str, name: str, path: str) -> None:
    """out[name] = path for an adapter flag, after checking the directory exists and the name is new (errors name
    the flag and its value). Shared by --adapter and --lora-modules."""
    if not Path(path).is_dir():
        raise ValueError(f"{flag} {spec!r}: {path} is not a directory")
    if name in out:
        raise ValueError(f"{flag} {spec!r}: the name {name!r} is used twice")
    out[name] = path


def load_chat_template(value: str) -> str:
    """A template file's text, else `value` itself as an inline template (backslash escapes decoded)."""
    try:
        return Path(value).read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        if not any(c in value for c in _JINJA_CHARS):
            raise ValueError(f"--chat-template {value!r} looks like a file path but cannot be read: {exc}") from None
    return codecs.decode(value.encode("latin-1", "backslashreplace"), "unicode_escape")


def check_chat_template(text: str) -> None:
    """Compile it the way transformers renders chat templates (sandboxed jinja); ValueError when it cannot."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"]).from_string(text)
    except TemplateError as exc:
        raise ValueError(f"--chat-template: not a valid jinja template: {exc}") from None


def apply(parser: argparse.ArgumentParser, ns: argparse.Namespace, default_max_adapters: int) -> dict[str, str]:
    """Fold the vLLM flags into mtlora's settings (see the module contract); returns --lora-modules' adapters."""
    ns.dtype = DTYPE_ALIASES.get(ns.dtype, ns.dtype)
    if ns.max_loras is not None:
        if ns.max_loras < 1:
            parser.error(f"--max-loras {ns.max_loras}: must be a positive integer")
        if ns.max_adapters not in (default_max_adapters, ns.max_loras):
            parser.error(f"--max-loras {ns.max_loras} and --max-adapters {ns.max_adapters} disagree; give one")
        ns.max_adapters = ns.max_loras
    if ns.gpu_memory_utilization is not None and not 0 < ns.gpu_memory_utilization <= 1:
        parser.error(f"--gpu-memory-utilization {ns.gpu_memory_utilization}: must be in (0, 1]")
    ns.chat_template_text = None
    if ns.chat_template is not None:
        try:
            ns.chat_template_text = load_chat_template(ns.chat_template)
            check_chat_template(ns.chat_template_text)
        except ValueError as exc:
            parser.error(str(exc))
    for flag in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        path = getattr(ns, flag)
        if path is not None and not Path(path).is_file():
            parser.error(f"--{flag.replace('_', '-')} {path}: no such file")
    if ns.ssl_keyfile and not ns.ssl_certfile:
        parser.error("--ssl-keyfile needs --ssl-certfile (the certificate that goes with the key)")
    if ns.ssl_cert_reqs and not ns.ssl_ca_certs:
        parser.error("--ssl-cert-reqs 1 or 2 needs --ssl-ca-certs (to verify client certificates with)")
    try:
        return lora_modules(ns.lora_modules)
    except ValueError as exc:
        parser.error(str(exc))


def log_notes(ns: argparse.Namespace, device_type: str) -> None:
    """Startup notes on vLLM flags whose effect differs here."""
    if ns.gpu_memory_utilization is None:
        return
    if ns.kv_cache_memory is not None:
        logger.warning("--gpu-memory-utilization %g is ignored: --kv-cache-memory sets the KV cache size",
                       ns.gpu_memory_utilization)
    elif device_type != "cuda":
        logger.info("--gpu-memory-utilization %g has no effect on %s: --kv-cache-memory sizes the KV cache "
                    "(default 1 GiB)", ns.gpu_memory_utilization, device_type)
