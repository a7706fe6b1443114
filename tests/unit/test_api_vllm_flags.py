"""vLLM launch lines (issue 14 item 5): vLLM's flag names parse with the same meaning, or exit 2 naming the flag."""

from __future__ import annotations

import json
import logging

import pytest

from mtlora_server import cli, vllm_flags
from mtlora_server.vllm_backend import launch


def parse(*argv):
    return cli.parse_args(list(argv))


def exit_2(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_lora_modules_both_forms_join_adapter(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    ns, adapters = parse("--adapter", f"a={tmp_path / 'a'}", "--lora-modules", f"b={tmp_path / 'b'}",
                         json.dumps({"name": "org/c", "path": str(tmp_path / "c"), "base_model_name": "m"}))
    assert adapters == {"a": str(tmp_path / "a"), "b": str(tmp_path / "b"), "org/c": str(tmp_path / "c")}
    assert cli.engine_args_from(ns, adapters).adapters == adapters


@pytest.mark.parametrize("spec,message", [
    ("b", "expected NAME=PATH or a JSON object"), ("b=/does/not/exist", "not a directory"),
    ('{"name": "b"', "invalid JSON"), ('{"name": "b", "path": "{d}", "rank": 8}', "unknown key"),
    ('{"path": "{d}"}', "non-empty name and path"), ("a={d}", "also given by --adapter"),
])
def test_lora_modules_refusals_name_the_flag(tmp_path, capsys, spec, message):
    (tmp_path / "a").mkdir()
    err = exit_2(capsys, "--adapter", f"a={tmp_path / 'a'}", "--lora-modules",
                 spec.replace("{d}", str(tmp_path / "a")))
    assert "--lora-modules" in err and message in err


def test_enable_lora_and_log_flags_are_accepted_no_ops():
    ns, _ = parse("--enable-lora", "--disable-log-requests", "--disable-log-stats")
    assert ns.enable_lora and ns.disable_log_requests and ns.disable_log_stats


def test_max_loras_is_max_adapters(capsys):
    ns, adapters = parse("--max-loras", "3")
    assert cli.engine_args_from(ns, adapters).max_adapters == 3
    assert parse("--max-loras", "5", "--max-adapters", "5")[0].max_adapters == 5
    assert "disagree" in exit_2(capsys, "--max-loras", "3", "--max-adapters", "5")
    assert "--max-loras 0" in exit_2(capsys, "--max-loras", "0")


@pytest.mark.parametrize("given,dtype", [("half", "float16"), ("float16", "float16"), ("bfloat16", "bfloat16"),
                                         ("float", "float32"), ("float32", "float32"), ("auto", "auto")])
def test_dtype_spellings_of_vllm(given, dtype):
    ns, adapters = parse("--dtype", given)
    assert cli.engine_args_from(ns, adapters).dtype == dtype


def test_gpu_memory_utilization_reaches_the_engine_and_is_bounded(capsys):
    ns, adapters = parse("--gpu-memory-utilization", "0.5")
    assert cli.engine_args_from(ns, adapters).gpu_memory_utilization == 0.5
    assert cli.engine_args_from(*parse()).gpu_memory_utilization is None
    for bad in ("0", "1.5", "-0.2"):
        assert "--gpu-memory-utilization" in exit_2(capsys, "--gpu-memory-utilization", bad)


def test_gpu_memory_utilization_on_cpu_says_what_sizes_the_cache(caplog):
    ns, _ = parse("--gpu-memory-utilization", "0.9")
    with caplog.at_level(logging.INFO, logger="mtlora_server.cli"):
        vllm_flags.log_notes(ns, "cpu")
    assert "no effect on cpu" in caplog.text and "--kv-cache-memory" in caplog.text
    caplog.clear()
    ns, _ = parse("--gpu-memory-utilization", "0.9", "--kv-cache-memory", "1GiB")
    with caplog.at_level(logging.INFO, logger="mtlora_server.cli"):
        vllm_flags.log_notes(ns, "cuda")
    assert "ignored" in caplog.text


def test_chat_template_from_a_file_or_inline(tmp_path, capsys):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert parse("--chat-template", str(path))[0].chat_template_text == path.read_text()
    inline = parse("--chat-template", "{% for m in messages %}{{ m['content'] }}\\n{% endfor %}")[0]
    assert inline.chat_template_text == "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert "looks like a file path" in exit_2(capsys, "--chat-template", str(tmp_path / "missing.jinja"))
    assert "not a valid jinja template" in exit_2(capsys, "--chat-template", "{% for m in %}")


def test_cors_flags_parse_json_lists(capsys):
    ns, _ = parse("--allowed-origins", '["https://app.example"]', "--allow-credentials",
                  "--allowed-methods", '["GET", "POST"]', "--allowed-headers", '["Authorization"]')
    assert (ns.allowed_origins, ns.allow_credentials, ns.allowed_methods, ns.allowed_headers) == \
        (["https://app.example"], True, ["GET", "POST"], ["Authorization"])
    assert parse()[0].allowed_origins == []                  # no CORS unless asked
    assert "--allowed-origins" in exit_2(capsys, "--allowed-origins", "*")
    assert "--allowed-headers" in exit_2(capsys, "--allowed-headers", '{"a": 1}')


def test_uvicorn_log_level(capsys):
    assert parse("--uvicorn-log-level", "trace")[0].uvicorn_log_level == "trace"
    assert "--uvicorn-log-level" in exit_2(capsys, "--uvicorn-log-level", "loud")


def test_tls_files_are_checked(tmp_path, capsys):
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    key.write_text("k")
    cert.write_text("c")
    ns, _ = parse("--ssl-keyfile", str(key), "--ssl-certfile", str(cert))
    assert (ns.ssl_keyfile, ns.ssl_certfile, ns.ssl_cert_reqs) == (str(key), str(cert), 0)
    assert "--ssl-keyfile" in exit_2(capsys, "--ssl-keyfile", str(tmp_path / "nope.pem"), "--ssl-certfile", str(cert))
    assert "needs --ssl-certfile" in exit_2(capsys, "--ssl-keyfile", str(key))
    assert "needs --ssl-ca-certs" in exit_2(capsys, "--ssl-certfile", str(cert), "--ssl-cert-reqs", "2")


def test_api_key_from_vllm_env_when_mtlora_env_is_unset(monkeypatch):
    monkeypatch.delenv("MTLORA_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert parse()[0].api_key is None
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert parse()[0].api_key == "from-vllm"
    monkeypatch.setenv("MTLORA_API_KEY", "from-mtlora")
    assert parse()[0].api_key == "from-mtlora"
    assert parse("--api-key", "flag")[0].api_key == "flag"


def test_engine_vllm_passes_the_vllm_flags_on(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("c")
    ns, _ = parse("--gpu-memory-utilization", "0.7", "--chat-template", "{{ messages }}", "--ssl-certfile",
                  str(cert), "--uvicorn-log-level", "warning", "--allowed-origins", '["https://a.example"]')
    cmd = launch.build_command(ns, "/models/tiny", str(tmp_path / "ad"), "ad")
    for flag, value in [("--gpu-memory-utilization", "0.7"), ("--chat-template", "{{ messages }}"),
                        ("--ssl-certfile", str(cert)), ("--uvicorn-log-level", "warning"),
                        ("--allowed-origins", '["https://a.example"]')]:
        assert cmd[cmd.index(flag) + 1] == value
    cmd = launch.build_command(parse()[0], "/models/tiny", str(tmp_path / "ad"), "ad")
    assert cmd[cmd.index("--allowed-origins") + 1] == "[]"       # vLLM's own default would allow every origin
