"""Hostile requests against the API edge, shared by the in-process suite (fake engine) and the one that drives a
real `mtlora-serve` process (tests/integration/test_hostile_inputs.py).

Contract: `CASES` lists `Case`s that must each be answered with a 4xx (`status`) in OpenAI's error schema
`{"error": {"message", "type", "param", "code"}}`, `param` naming the field (a `Case.param` of "x" accepts "x" and
"x.<index or subfield>"); `adapter_cases(root, outside)` builds the adapter-loading cases on disk under an
`--adapter-root`; `SURVIVABLE` are requests that once killed the engine and must now be served (200).
`check_error(response, case)` returns what is wrong with a response (empty when it is right), so a suite can list
every failing case at once. Bodies are raw bytes where JSON cannot express them through `json.dumps` (NaN,
Infinity, integers beyond Python's digit limit, invalid UTF-8, deep nesting).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ANY = object()                 # param not checked (e.g. a body the server could not parse at all)
HUGE = 2**70                   # beyond int64: once an OverflowError in torch.tensor
OOV = 100_000                  # beyond the tiny models' vocabularies (259 / 260 ids)

CMPL = {"prompt": "hi", "max_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: Any                  # a JSON-able value, or raw bytes sent as application/json
    param: Any = ANY
    status: tuple[int, ...] = (400,)

    def content(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()


def _tag(path: str) -> str:
    """"/v1/chat/completions" -> "chat.completions" (case ids)."""
    return path.removeprefix("/v1").strip("/").replace("/", ".")


def _raw(base: dict, field: str, literal: str) -> bytes:
    """`base` with `field` set to a JSON literal json.dumps cannot write (NaN, a 5000-digit integer, ...)."""
    text = json.dumps({**base, field: "@@"})
    return text.replace('"@@"', literal).encode()


# (path, base body, field, kind, too small, too large); kind "int" also tries floats, booleans and numeric strings
NUMBERS = [
    ("/v1/completions", CMPL, "n", "int", 0, 17),
    ("/v1/completions", CMPL, "max_tokens", "int", -1, 2**31),
    ("/v1/completions", CMPL, "min_tokens", "int", -1, 2**31),
    ("/v1/completions", CMPL, "temperature", "float", -0.5, 100.5),
    ("/v1/completions", CMPL, "top_p", "float", 0.0, 1.5),
    ("/v1/completions", CMPL, "top_k", "int", -2, 1_000_001),
    ("/v1/completions", CMPL, "seed", "int", -(2**63) - 1, 2**63),
    ("/v1/completions", CMPL, "logprobs", "int", -1, 21),
    ("/v1/completions", CMPL, "best_of", "int", 0, 17),
    ("/v1/chat/completions", CHAT, "n", "int", 0, 17),
    ("/v1/chat/completions", CHAT, "max_tokens", "int", 0, 2**31),
    ("/v1/chat/completions", CHAT, "max_completion_tokens", "int", 0, 2**31),
    ("/v1/chat/completions", CHAT, "min_tokens", "int", -1, 2**31),
    ("/v1/chat/completions", CHAT, "temperature", "float", -0.5, 100.5),
    ("/v1/chat/completions", CHAT, "top_p", "float", 0.0, 1.5),
    ("/v1/chat/completions", CHAT, "top_k", "int", -2, 1_000_001),
    ("/v1/chat/completions", CHAT, "seed", "int", -(2**63) - 1, 2**63),
    ("/v1/chat/completions", {**CHAT, "logprobs": True}, "top_logprobs", "int", -1, 21),
]

# (path, base body, field): JSON booleans only
BOOLS = [
    ("/v1/completions", CMPL, "stream"),
    ("/v1/completions", CMPL, "echo"),
    ("/v1/completions", CMPL, "ignore_eos"),
    ("/v1/completions", CMPL, "include_stop_str_in_output"),
    ("/v1/completions", CMPL, "skip_special_tokens"),
    ("/v1/chat/completions", CHAT, "stream"),
    ("/v1/chat/completions", CHAT, "logprobs"),
    ("/v1/chat/completions", CHAT, "add_generation_prompt"),
    ("/tokenize", {"prompt": "hi"}, "add_special_tokens"),
    ("/tokenize", {"prompt": "hi"}, "return_token_strs"),
    ("/tokenize", {"messages": CHAT["messages"]}, "add_generation_prompt"),
]

# (path, base body, field): lists of token ids; the vocabulary bounds them
ID_LISTS = [
    ("/v1/completions", CMPL, "stop_token_ids"),
    ("/v1/chat/completions", CHAT, "stop_token_ids"),
    ("/v1/completions", CMPL, "prompt"),
    ("/detokenize", {}, "tokens"),
]


def _number_cases() -> list[Case]:
    cases = []
    for path, base, field, kind, low, high in NUMBERS:
        tag = f"{_tag(path)}.{field}"
        values = {"too_small": low, "too_large": high, "huge_int": HUGE, "negative_huge": -HUGE, "string": "abc",
                  "list": [1], "object": {"a": 1}}
        if kind == "int":
            values.update({"float": 1.5, "bool": True, "numeric_string": "5"})
        else:
            values.update({"bool": True, "numeric_string": "0.5"})
        cases += [Case(f"{tag}={name}", path, {**base, field: v}, field) for name, v in values.items()]
        for literal in ("NaN", "Infinity", "-Infinity", "1e400"):
            cases.append(Case(f"{tag}={literal}", path, _raw(base, field, literal), field))
        cases.append(Case(f"{tag}=5000_digits", path, _raw(base, field, "9" * 5000), None))
    return cases


def _bool_cases() -> list[Case]:
    cases = []
    for path, base, field in BOOLS:
        tag = f"{_tag(path)}.{field}"
        for name, v in {"yes": "yes", "string_true": "true", "one": 1, "zero": 0, "list": [True]}.items():
            cases.append(Case(f"{tag}={name}", path, {**base, field: v}, field))
    cases.append(Case("completions.stream_options.include_usage=yes", "/v1/completions",
                      {**CMPL, "stream": True, "stream_options": {"include_usage": "yes"}},
                      "stream_options.include_usage"))
    return cases


def _id_list_cases() -> list[Case]:
    cases = []
    for path, base, field in ID_LISTS:
        tag = f"{_tag(path)}.{field}"
        values = {"negative": [5, -1], "out_of_vocab": [5, OOV], "huge_int": [5, HUGE], "float": [5, 1.5],
                  "bool": [5, True], "string_item": [5, "a"], "nested_bad": [[5], [HUGE]], "object": {"a": 5}}
        if field != "prompt":            # a prompt may be a string
            values["string"] = "abc"
        for name, v in values.items():
            cases.append(Case(f"{tag}={name}", path, {**base, field: v}, field))
        cases.append(Case(f"{tag}=NaN", path, _raw(base, field, "[5, NaN]"), field))
        cases.append(Case(f"{tag}=5000_digits", path, _raw(base, field, "[" + "9" * 5000 + "]"), None))
    cases.append(Case("completions.stop_token_ids=too_many", "/v1/completions",
                      {**CMPL, "stop_token_ids": [5] * 17}, "stop_token_ids"))
    # the request of issue 13 that killed the engine: an out-of-vocabulary stop id while min_tokens bans it
    for path, base in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": CHAT["messages"]})):
        for sid in (OOV, 1180591620717411303424):
            cases.append(Case(f"{_tag(path)}.lethal_stop_id={sid}", path,
                              {**base, "max_tokens": 8, "min_tokens": 4, "stop_token_ids": [sid]}, "stop_token_ids"))
    return cases


def _unicode_cases() -> list[Case]:
    lone = "x\ud800"
    cases = [Case(f"{_tag(p)}.model=surrogate", p, {**b, "model": lone}, "model", (404,))
             for p, b in (("/v1/completions", CMPL), ("/v1/chat/completions", CHAT), ("/tokenize", {"prompt": "a"}),
                          ("/detokenize", {"tokens": [5]}))]
    cases += [
        Case("completions.model=1MB", "/v1/completions", {**CMPL, "model": "m" * 1_000_000}, "model", (404, 413)),
        Case("completions.model=int", "/v1/completions", {**CMPL, "model": 5}, "model"),
        Case("completions.prompt=surrogate", "/v1/completions", {**CMPL, "prompt": lone}, "prompt"),
        Case("completions.prompt=surrogate_in_batch", "/v1/completions", {**CMPL, "prompt": ["ok", lone]},
             "prompt.1"),
        Case("chat.completions.content=surrogate", "/v1/chat/completions",
             {**CHAT, "messages": [{"role": "user", "content": lone}]}, "messages"),
        Case("chat.completions.content_part=surrogate", "/v1/chat/completions",
             {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": lone}]}]}, "messages"),
        Case("tokenize.prompt=surrogate", "/tokenize", {"prompt": lone}, "prompt"),
        Case("tokenize.messages=surrogate", "/tokenize", {"messages": [{"role": "user", "content": lone}]},
             "messages"),
        Case("body=invalid_utf8", "/v1/completions", b'{"prompt": "\xff\xfe"}', None),
        Case("body=not_json", "/v1/completions", b"{prompt: hi}", None),
        Case("body=empty", "/v1/completions", b"", ANY),
        Case("body=null", "/v1/completions", b"null", ANY),
        Case("body=list", "/v1/completions", b"[1, 2]", ANY),
        Case("body=string", "/v1/chat/completions", b'"hi"', ANY),
        Case("chat.completions.role=unknown", "/v1/chat/completions",
             {**CHAT, "messages": [{"role": "x", "content": "a"}]}, "messages.0.role"),
        Case("chat.completions.content=int", "/v1/chat/completions",
             {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        Case("chat.completions.content_part=image", "/v1/chat/completions",
             {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
             "messages.0.content"),
    ]
    return cases


def _deep(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


def _size_cases() -> list[Case]:
    """Huge and deep bodies: a 400 (or 413 where a body-size limit applies), never a 500 or a stalled server."""
    deep_obj = '{"a":' * 100_000 + "1" + "}" * 100_000
    return [
        Case("completions.prompt=1MB", "/v1/completions", {**CMPL, "prompt": "ab" * 500_000}, ANY, (400, 413)),
        Case("completions.prompt=1M_ids", "/v1/completions", {**CMPL, "prompt": [5] * 1_000_000}, ANY, (400, 413)),
        Case("completions.stop=100k", "/v1/completions", {**CMPL, "stop": ["a"] * 100_000}, ANY, (400, 413)),
        Case("completions.n=1e6", "/v1/completions", {**CMPL, "n": 1_000_000}, "n"),
        Case("completions.prompt=1025_prompts", "/v1/completions", {**CMPL, "prompt": ["a"] * 1025}, "prompt"),
        Case("chat.completions.messages=20k", "/v1/chat/completions",
             {**CHAT, "messages": [{"role": "user", "content": "a"}] * 20_000}, ANY, (400, 413)),
        Case("detokenize.tokens=1M_oov", "/detokenize", {"tokens": [OOV] * 1_000_000}, ANY, (400, 413)),
        Case("completions.prompt=deep_array", "/v1/completions",
             f'{{"prompt": {_deep(100_000)}}}'.encode(), ANY, (400, 413)),
        Case("chat.completions.messages=deep_array", "/v1/chat/completions",
             f'{{"messages": {_deep(100_000)}}}'.encode(), ANY, (400, 413)),
        Case("completions.extra_field=deep_object", "/v1/completions",
             f'{{"prompt": "hi", "logit_bias": {deep_obj}}}'.encode(), ANY, (400, 413)),
        Case("tokenize.body=deep_array", "/tokenize", _deep(100_000).encode(), ANY, (400, 413)),
        Case("completions.prompt=deep_990", "/v1/completions",
             f'{{"prompt": {_deep(990)}}}'.encode(), ANY),
        # JSON text inside a string field, nested past json's recursion limit (was a RecursionError -> 500)
        Case("completions.guided_json=deep_string", "/v1/completions",
             {**CMPL, "guided_json": _deep(100_000)}, "guided_json"),
        Case("completions.structured_outputs.json=deep_string", "/v1/completions",
             {**CMPL, "structured_outputs": {"json": _deep(100_000)}}, "structured_outputs.json"),
    ]


CASES: list[Case] = _number_cases() + _bool_cases() + _id_list_cases() + _unicode_cases() + _size_cases()


def adapter_cases(root: Path, outside: Path, adapter_src: Path | None = None) -> list[Case]:
    """Adapter (un)loading cases; lays out under `root` (the server's --adapter-root) the links they need, each
    pointing at `outside` (a valid adapter directory when `adapter_src` is given: the server would load it)."""
    outside.mkdir(parents=True, exist_ok=True)
    if adapter_src is not None:
        for f in adapter_src.iterdir():
            (outside / f.name).write_bytes(f.read_bytes())
    else:
        (outside / "adapter_config.json").write_text("{}")
        (outside / "adapter_model.safetensors").write_bytes(b"")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        d = root / f"link-{name.split('.')[0]}"
        d.mkdir(parents=True, exist_ok=True)
        for f in outside.iterdir():
            if f.name != name:
                (d / f.name).write_bytes(f.read_bytes())
        (d / name).symlink_to(outside / name)
    bin_link = root / "link-bin"
    bin_link.mkdir(exist_ok=True)
    (bin_link / "adapter_config.json").write_text("{}")
    (bin_link / "adapter_model.bin").symlink_to(outside / "adapter_model.safetensors")
    (root / "link-dir").symlink_to(outside, target_is_directory=True)
    loop = root / "loop"
    loop.mkdir(exist_ok=True)
    (loop / "adapter_config.json").symlink_to(loop / "adapter_config.json")
    garbage = root / "garbage"
    garbage.mkdir(exist_ok=True)
    (garbage / "adapter_config.json").write_text("{not json")
    load, unload = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
    ok = {"lora_name": "x1"}
    return [
        Case("load.lora_name=int", load, {"lora_name": 5, "lora_path": "garbage"}, "lora_name"),
        Case("load.lora_name=empty", load, {"lora_name": "", "lora_path": "garbage"}, "lora_name"),
        Case("load.lora_name=surrogate", load, {"lora_name": "x\ud800", "lora_path": "garbage"}, "lora_name"),
        Case("load.lora_name=dotdot", load, {"lora_name": "../x", "lora_path": "garbage"}, "lora_name"),
        Case("load.lora_name=300_chars", load, {"lora_name": "a" * 300, "lora_path": "garbage"}, "lora_name"),
        Case("load.lora_path=int", load, {**ok, "lora_path": 5}, "lora_path"),
        Case("load.lora_path=empty", load, {**ok, "lora_path": ""}, "lora_path"),
        Case("load.lora_path=dotdot", load, {**ok, "lora_path": "../../../etc"}, "lora_path"),
        Case("load.lora_path=absolute_outside", load, {**ok, "lora_path": str(outside)}, "lora_path"),
        Case("load.lora_path=nul", load, {**ok, "lora_path": "a\x00b"}, "lora_path"),
        Case("load.lora_path=surrogate", load, {**ok, "lora_path": "a\ud800"}, "lora_path"),
        Case("load.lora_path=5000_chars", load, {**ok, "lora_path": "a" * 5000}, "lora_path"),
        Case("load.lora_path=missing", load, {**ok, "lora_path": "nope"}, "lora_path"),
        Case("load.lora_path=dir_symlink_out", load, {**ok, "lora_path": "link-dir"}, "lora_path"),
        Case("load.config_symlink_out", load, {**ok, "lora_path": "link-adapter_config"}, "lora_path"),
        Case("load.weights_symlink_out", load, {**ok, "lora_path": "link-adapter_model"}, "lora_path"),
        Case("load.bin_symlink_out", load, {**ok, "lora_path": "link-bin"}, "lora_path"),
        Case("load.symlink_loop", load, {**ok, "lora_path": "loop"}, "lora_path"),
        Case("load.garbage_config", load, {**ok, "lora_path": "garbage"}, ANY),
        Case("unload.lora_name=int", unload, {"lora_name": 5}, "lora_name"),
        Case("unload.lora_name=empty", unload, {"lora_name": ""}, "lora_name"),
        Case("unload.unknown", unload, {"lora_name": "nope"}, "lora_name", (404,)),
        Case("unload.surrogate", unload, {"lora_name": "x\ud800"}, "lora_name"),
    ]


# Requests that once killed the engine (issue 13): they must be served, and the server must stay healthy.
SURVIVABLE = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 8, "temperature": 1e-40}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 8, "temperature": 1e-50, "top_p": 0.5, "top_k": 5}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 8, "temperature": 5e-324, "seed": 3, "n": 2}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 8, "temperature": 9.9e-6, "logprobs": 3}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 8, "temperature": 100, "top_p": 1e-9}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 8, "seed": 2**63 - 1, "n": 16, "temperature": 1.0}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 8, "seed": -(2**63), "temperature": 1.0}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 8, "min_tokens": 8, "stop_token_ids": [0, 1, 2, 258],
                         "top_k": 1_000_000}),
    ("/v1/chat/completions", {**CHAT, "temperature": 1e-40, "logprobs": True, "top_logprobs": 20}),
    ("/v1/completions", {"prompt": "hi", "stream": None, "n": None, "echo": None, "max_tokens": 4}),
    # a tool call in the history whose arguments nest past json's limit: kept as text (was a RecursionError -> 500)
    ("/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[" * 100_000}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}),
    ("/tokenize", {"messages": [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[" * 100_000}}]}]}),
]


def check_error(status: int, headers, text: str, case: Case) -> list[str]:
    """What is wrong with an error response to `case` (empty when it is right)."""
    problems = []
    if status not in case.status:
        problems.append(f"status {status}, expected {case.status}")
    if status == 413 and 413 in case.status and not text:
        return problems                  # a body-size limit may answer before any route
    try:
        body = json.loads(text)
        err = body["error"]
        keys_ok = set(err) == {"message", "type", "param", "code"}
    except (ValueError, KeyError, TypeError):
        return problems + [f"not the OpenAI error schema: {text[:200]!r}"]
    if not keys_ok:
        problems.append(f"error keys {sorted(err)}")
    if err.get("code") != status or not err.get("message"):
        problems.append(f"code/message {err.get('code')!r}/{str(err.get('message'))[:80]!r}")
    param = err.get("param")
    if case.param is None and param is not None:
        problems.append(f"param {param!r}, expected none")
    elif isinstance(case.param, str) and not (param == case.param or str(param).startswith(case.param + ".")):
        problems.append(f"param {param!r}, expected {case.param!r}")
    if len(str(err.get("message"))) > 5000:
        problems.append(f"message of {len(str(err.get('message')))} characters")
    return problems


def leaked_paths(text: str, *paths: Path) -> list[str]:
    """The absolute paths among `paths` (and their resolved forms) that `text` shows."""
    found = []
    for p in paths:
        for form in {str(p), os.path.realpath(p)}:
            if form in text:
                found.append(form)
    return found
