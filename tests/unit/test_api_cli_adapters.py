"""mtlora-serve's many-adapter flags: --adapter-dir registers every adapter subfolder, --adapter-cache-size."""

from __future__ import annotations

import pytest

from mtlora_server import cli


def _adapter_dirs(root, names):
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "adapter_config.json").write_text("{}")
    return root


def test_adapter_dir_registers_every_adapter_subfolder(tmp_path):
    many = _adapter_dirs(tmp_path / "many", ["t2", "t1"])
    (many / "notes").mkdir()                                    # no adapter_config.json: not an adapter
    (tmp_path / "solo").mkdir()
    parser = cli.build_parser()
    ns = parser.parse_args(["--adapter", f"solo={tmp_path / 'solo'}", "--adapter-dir", str(many),
                            "--adapter-cache-size", "0", "--max-adapters", "2"])
    adapters = cli._check_args(parser, ns)
    assert adapters == {"solo": str(tmp_path / "solo"), "t1": str(many / "t1"), "t2": str(many / "t2")}
    args = cli.engine_args_from(ns, adapters)
    assert args.adapter_cache_size == 0 and args.max_adapters == 2 and list(args.adapters) == ["solo", "t1", "t2"]
    assert cli.engine_args_from(cli.build_parser().parse_args([]), {}).adapter_cache_size == 2 << 30
    assert cli.build_parser().parse_args(["--adapter-cache-size", "512MiB"]).adapter_cache_size == 512 << 20


@pytest.mark.parametrize("extra,message", [
    (["--adapter-dir", "{root}/missing"], "not a directory"),
    (["--adapter-dir", "{root}/many", "--adapter", "t1={root}/many/t1"], "used twice"),
    (["--adapter-cache-size", "-3"], "invalid size"),
])
def test_adapter_dir_errors_exit_2(tmp_path, capsys, extra, message):
    _adapter_dirs(tmp_path / "many", ["t1"])
    with pytest.raises(SystemExit) as exc:
        cli.main([a.format(root=tmp_path) for a in extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
