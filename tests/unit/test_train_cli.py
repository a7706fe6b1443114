"""mtlora-train command line: official flags unchanged, YAML configs, meta-device parameter counts, errors."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from mtlora.errors import ConfigError
from mtlora_train.cli import build_parser, main, parse_config
from mtlora_train.config import TrainConfig
from mtlora_train.params import breakdown, count_trainable_params

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"

README_BBH = """--method mtlora --model_name_or_path ./data/llama-2-7b --dataset_dir ./data/flan_v2_subset
    --output_dir ./output/custom_bbh --lora_rank 16 --lora_nums 16 --enable_blc
    --enable_block_adapter --block_adapter_type ffn --enable_spectral_reg --spectral_reg_lambda 1.0
    --spectral_reg_frequency 1 --enable_fine_grained_routing --routing_group_size 2048 --bf16 --num_train_epochs 1"""


def test_official_readme_command_parses_unchanged():
    cfg = parse_config(shlex.split(README_BBH))
    assert (cfg.method, cfg.lora_rank, cfg.lora_nums, cfg.bf16, cfg.num_train_epochs) == ("mtlora", 16, 16, True, 1)
    assert cfg.enable_blc and cfg.blc_weight == 0.01 and cfg.uses_balance
    assert cfg.uses_spectral and cfg.spectral_reg_lambda == 1.0 and cfg.spectral_reg_variant == "paper"
    ac = cfg.adapter_config()
    assert (ac.method, ac.placement, ac.num_experts, ac.rank, ac.routing_group_size) == ("mtlora", "ffn", 16, 16,
                                                                                          2048)


def test_official_script_flags_and_aliases():
    # Flags from the official exp/*.sh scripts: HF Trainer options are accepted, --trainable/--blc_alpha alias.
    argv = shlex.split("--method hydralora --dataset_dir d --do_train --seed 42 --logging_strategy steps "
                       "--logging_steps 10 --save_strategy epoch --save_total_limit 1 --lora_alpha 64 "
                       "--trainable q_proj,v_proj,o_proj --lora_dropout 0.05 --load_in_kbits 16 "
                       "--ddp_find_unused_parameters False --gradient_checkpointing --overwrite_output_dir "
                       "--logging_first_step True --enable_blc --blc_alpha 0.02 --block_adapter_style lowrank "
                       "--spectral_reg_steps 500 --learning_rate 0.0002 --per_device_train_batch_size 16")
    cfg = parse_config(argv)
    assert cfg.target_modules == ["q_proj", "v_proj", "o_proj"] and cfg.blc_weight == 0.02
    assert cfg.save_strategy == "epoch" and cfg.gradient_checkpointing and cfg.spectral_reg_steps == 500
    ac = cfg.adapter_config()
    assert ac.method == "hydralora" and ac.routing_group_size is None and ac.alpha == 64.0


@pytest.mark.parametrize("flags,method,extra", [
    ("--method mtlora", "hydralora", {"target_modules": ["q_proj", "v_proj"]}),   # no block flag: component
    ("--method mtlora --enable_block_adapter", "mtlora", {"placement": "attention"}),
    ("--method lora --lora_nums 4", "lora", {"num_experts": 1}),
    ("--method hydralora --enable_fine_grained_routing --routing_group_size 64", "hydralora",
     {"routing_group_size": 64}),
])
def test_flags_select_the_adapter_structure(flags, method, extra):
    ac = parse_config(shlex.split(flags)).adapter_config()
    assert ac.method == method
    for k, v in extra.items():
        assert getattr(ac, k) == v


@pytest.mark.parametrize("flags,message", [
    ("--deepspeed ds.json", "--deepspeed is not supported"),
    ("--load_in_kbits 4", "only 16"),
    ("--lora_rank zero", "invalid int value"),
])
def test_refused_flags_exit_with_usage_error(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(shlex.split(flags))
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags,field", [
    ("--block_adapter_style adaptformer", "block_adapter_style"),
    ("--method lora --enable_block_adapter", "method"),
    ("--trainable q_proj,wq", "target_modules"),
    ("--spectral_reg_variant other", "spectral_reg_variant"),
    ("--block_adapter_rank 4 --lora_rank 8", "block_adapter_rank"),
    # a negative limit used to delete every checkpoint, the one just written included
    ("--save_total_limit -1", "save_total_limit"),
    ("--dataloader_num_workers -2", "dataloader_num_workers"),
    ("--warmup_ratio 1.5", "warmup_ratio"),
    ("--warmup_ratio -0.1", "warmup_ratio"),
])
def test_invalid_values_name_the_field(flags, field):
    with pytest.raises(ConfigError) as exc:
        parse_config(shlex.split(flags))
    assert exc.value.field == field


def test_help_explains_every_flag():
    text = build_parser().format_help()
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
    for name in ("--spectral_reg_variant", "--count_params_only", "--resume_from_checkpoint", "--trainable"):
        assert name in text


def test_yaml_config_with_cli_override(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("# mtlora-train --config exp.yaml\nmethod: mtlora\nenable_block_adapter: true\n"
                 "block_adapter_type: both\nlora_rank: 4\ntarget_modules: q_proj,k_proj\n")
    cfg = parse_config(["--config", str(f), "--lora_rank", "8"])
    assert cfg.lora_rank == 8 and cfg.block_adapter_type == "both" and cfg.target_modules == ["q_proj", "k_proj"]
    for bad, needle in ((b"lora_rank: 4\n# caf\xe9\n", "cannot read"), (None, "cannot read")):
        if bad is None:
            f.unlink()
            f.mkdir()                                   # a folder where the YAML file should be
        else:
            f.write_bytes(bad)
        with pytest.raises(ConfigError, match=needle) as err:
            parse_config(["--config", str(f)])
        assert str(f) in str(err.value)
        if bad is None:
            f.rmdir()
    f.write_text("lora_rnak: 4\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: unknown option\(s\) \['lora_rnak'\]"):
        parse_config(["--config", str(f)])


def test_shipped_configs_start_with_their_command_and_parse():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert files, "training/configs/*.yaml missing"
    for f in files:
        first = f.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# mtlora-train ") and f"--config training/configs/{f.name}" in first, f
        argv = shlex.split(first[2:])[1:]
        argv[argv.index("--config") + 1] = str(f)
        if argv[0] == "study":                     # a study YAML (mtlora_train.study), not a TrainConfig
            from mtlora_train.study import load_study

            assert load_study(argv[argv.index("--config") + 1]).runs, f
            continue
        cfg = parse_config(argv)
        assert cfg.dataset_dir, f


# -- parameter counts on the meta device ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama2_7b():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000)


@pytest.mark.parametrize("flags,expected", [
    ("--method mtlora --enable_block_adapter --block_adapter_type ffn", 37_748_736),
    ("--method mtlora --enable_block_adapter --block_adapter_type ffn --enable_fine_grained_routing "
     "--routing_group_size 2048", 39_845_888),
    ("--method hydralora --target_modules q_proj,v_proj", 75_497_472),
])
def test_llama2_7b_trainable_parameter_counts(llama2_7b, flags, expected):
    cfg = parse_config(shlex.split(flags + " --lora_rank 16 --lora_nums 16"))
    assert count_trainable_params(llama2_7b, cfg.adapter_config()) == expected
    assert sum(breakdown(llama2_7b, cfg.adapter_config()).values()) == expected   # shapes agree with modules


def test_count_params_only_cli(tiny_model_dir, capsys):
    rc = main(["--count_params_only", "--model_name_or_path", str(tiny_model_dir), "--method", "mtlora",
               "--enable_block_adapter", "--block_adapter_type", "ffn", "--lora_rank", "4", "--lora_nums", "2"])
    # tiny model: 2 layers, hidden 64: (A 4*64 + B 2*64*4 + router 2*64) * 2 layers = 1,792
    assert rc == 0 and "1,792 trainable parameters (mtlora)" in capsys.readouterr().out


def test_cli_trains_and_reports_bad_data(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"instruction": "say", "input": str(i), "output": "ok", "task_type": "t"} for i in range(6)]
    (data / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"instruction": 1}\n')
    common = ["--model_name_or_path", str(tiny_model_dir), "--dataset_dir", str(data), "--output_dir",
              str(tmp_path / "out"), "--method", "lora", "--max_steps", "2", "--per_device_train_batch_size", "2",
              "--data_cache_dir", str(tmp_path / "cache"), "--save_steps", "0"]
    assert main(common) == 2
    assert f"{data / 'a.jsonl'}:line 7" in capsys.readouterr().err
    assert main(common + ["--skip_bad_records"]) == 0
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert len((tmp_path / "out" / "log_history.jsonl").read_text().splitlines()) == 2


def test_trainconfig_defaults_follow_official_train_py():
    cfg = TrainConfig()
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_nums) == (8, 32.0, 0.1, 2)
    assert (cfg.blc_weight, cfg.spectral_reg_lambda, cfg.block_adapter_type) == (0.01, 0.25, "attention")
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.max_seq_length == 1024


def test_tensorboard_without_package_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    from mtlora_train.recipe import MtloraRecipe

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
    cfg = TrainConfig(dataset_dir=str(tmp_path), output_dir=str(tmp_path / "out"), report_to="tensorboard")
    with pytest.raises(ConfigError, match="needs the tensorboard package") as exc:
        MtloraRecipe(cfg).setup()
    assert exc.value.field == "report_to"
