"""mtlora-serve's argument handling: sizes, --adapter forms, refusals before anything is loaded."""

from __future__ import annotations

import argparse

import pytest

from mtlora_server import cli


@pytest.mark.parametrize("text,expected", [("2GiB", 2 * 2**30), ("512MB", 512 * 10**6), ("1e9", 10**9),
                                           ("1024", 1024), ("3G", 3 * 2**30), ("1.5 KiB", 1536)])
def test_parse_size(text, expected):
    assert cli.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1", "2 parsecs", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_size(text)


def test_parse_adapters(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "x=y").mkdir()
    got = cli.parse_adapters([f"math={tmp_path / 'code'}", str(tmp_path / "code") + "/", str(tmp_path / "x=y")])
    assert got == {"math": str(tmp_path / "code"), "code": str(tmp_path / "code") + "/", "x=y": str(tmp_path / "x=y")}


@pytest.mark.parametrize("specs,message", [(["a=/does/not/exist"], "not a directory"),
                                           (["a={d}", "a={d}"], "used twice")])
def test_parse_adapters_rejects(tmp_path, specs, message):
    with pytest.raises(ValueError, match=message):
        cli.parse_adapters([s.format(d=tmp_path) for s in specs])


@pytest.mark.parametrize("argv,message", [
    (["--enable-adapter-loading"], "--adapter-root"),
    (["--adapter", "/does/not/exist"], "not a directory"),
    (["--kv-cache-memory", "lots"], "invalid size"),
    (["--max-num-seqs", "0"], "positive integer"),
    (["--dtype", "int3"], "invalid choice"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout: expected a finite number of seconds >= 0"),
    (["--shutdown-timeout", "soon"], "--shutdown-timeout: expected a number of seconds"),
])
def test_bad_flags_exit_2_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for action in cli.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in out
        assert action.help, f"{action.option_strings} has no help"


def test_api_key_comes_from_the_environment_but_not_into_help(monkeypatch, capsys):
    monkeypatch.setenv("MTLORA_API_KEY", "s3cret")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "s3cret" not in capsys.readouterr().out


def test_engine_vllm_dispatches_to_the_vllm_backend_which_refuses_non_mtlora(tmp_path, tiny_model_dir, caplog):
    """`--engine vllm` goes to the vLLM launcher (never the native engine), whose pre-checks name the field."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "integration"))
    from serve_helpers import write_adapter

    adapter = write_adapter(tmp_path / "hydra", tiny_model_dir, method="hydralora", rank=4, num_experts=2,
                            target_modules=["q_proj"])
    with caplog.at_level("ERROR"):
        code = cli.main(["--engine", "vllm", "--model", str(tiny_model_dir), "--adapter", f"h={adapter}"])
    assert code == 1
    assert "method" in caplog.text and "mtlora" in caplog.text
