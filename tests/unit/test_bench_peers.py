"""`mtlora-bench engine`'s peer rows without vLLM: the 4 plain LoRA adapters it writes are PEFT LoRA directories
that peft's own PeftModel and our engine load to the same logits; the vLLM rows run the peer script with the
engine row's prompt seed and adapter dirs (a fake interpreter stands in for vLLM's venv) and say "not run: <why>"
when vLLM is missing or fails; `mtlora-bench profile` states the GEMM share of a decode step."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
import torch

from mtlora import peft_format
from mtlora.checkpoint import load_adapter
from mtlora.config import AdapterConfig
from mtlora.convert import detect_format
from mtlora.errors import ConfigError
from mtlora.reference import random_adapter_tensors
from mtlora_server import bench_engine, bench_peers, bench_profile
from mtlora_server.engine.core import EngineCore
from mtlora_server.engine.testing import run_to_completion, tiny_engine_args
from mtlora_server.engine.types import GenerationRequest, SamplingParams
from peft_helpers import peft_logits

IDS = torch.randint(3, 259, (21,), generator=torch.Generator().manual_seed(5)).tolist()
SMALL = ["--num-prompts", "4", "--input-len", "12", "--output-len", "3", "--dtype", "float32"]


@pytest.fixture(scope="module")
def hf_config(tiny_model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def lora4(tmp_path_factory, hf_config):
    return bench_peers.write_lora4(tmp_path_factory.mktemp("lora4"), hf_config, seed=0)


def test_lora4_dirs_are_peft_lora_r16_on_qkvo(lora4):
    assert list(lora4) == ["lora0", "lora1", "lora2", "lora3"]
    for path in lora4.values():
        assert detect_format(path) == "peft-lora"
        data = json.loads((Path(path) / "adapter_config.json").read_text())
        assert (data["peft_type"], data["r"], data["target_modules"]) == ("LORA", 16, ["q_proj", "k_proj", "v_proj",
                                                                                       "o_proj"])


def test_write_peft_lora_round_trips_the_native_tensors(tmp_path, hf_config):
    cfg = AdapterConfig(method="lora", rank=4, alpha=12.0, target_modules=["q_proj", "o_proj", "down_proj"])
    tensors = random_adapter_tensors(cfg, hf_config, seed=3)
    got_cfg, got = load_adapter(peft_format.write_peft_lora(tmp_path / "a", cfg, tensors), model_config=hf_config)
    assert (got_cfg.rank, got_cfg.alpha, got_cfg.target_modules) == (4, 12.0, cfg.target_modules)
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_write_peft_lora_refuses_other_methods(tmp_path, hf_config):
    cfg = AdapterConfig(method="hydralora", rank=4, num_experts=2, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="method"):
        peft_format.write_peft_lora(tmp_path / "h", cfg, random_adapter_tensors(cfg, hf_config))


def test_lora4_serves_peft_models_logits(lora4, tiny_model_dir):
    """Each adapter as our engine serves it == peft's PeftModel on the same directory (fp32, <= 1e-4)."""
    from mtlora.reference import ReferenceModel

    core = EngineCore(tiny_engine_args(tiny_model_dir, adapters=lora4, max_lora_rank=16))
    bare = ReferenceModel(tiny_model_dir).logits(IDS)
    for name, path in lora4.items():
        want = peft_logits(tiny_model_dir, path, IDS)
        req = GenerationRequest(name, IDS, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True,
                                                          prompt_logprobs=0), adapter=name)
        res = run_to_completion(core, [req])[name]
        lp = torch.log_softmax(want, -1)
        want_lp = torch.stack([lp[t - 1, IDS[t]] for t in range(1, len(IDS))])
        got_lp = torch.tensor([x.logprob for x in res.prompt_logprobs[1:]])
        torch.testing.assert_close(got_lp, want_lp, atol=1e-4, rtol=0)
        assert (bare - want).abs().max() > 1e-4                           # the adapter does change the output


@pytest.fixture
def scripts(tmp_path) -> list[str]:
    """--peer-scripts pointing at a stand-in vllm_multilora_bench.py (the fake interpreter never reads it)."""
    (tmp_path / "peers").mkdir()
    (tmp_path / "peers" / bench_peers.SCRIPT).write_text("# stand-in\n")
    return ["--peer-scripts", str(tmp_path / "peers")]


def _fake_python(path: Path, body: str) -> Path:
    """An executable standing in for vLLM's interpreter: answers the import probe, runs `body` for the script."""
    path.write_text(f"#!{sys.executable}\nimport json, sys\nif sys.argv[1] == '-c':\n    print('0.0-fake')\n"
                    f"    sys.exit(0)\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


FAKE_VLLM = """
args = sys.argv[2:]
opt = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith('--') and args[i] != '--eager'}
dirs = args[1:next(i for i, a in enumerate(args) if a.startswith('--'))]
with open(sys.argv[0] + '.calls', 'a') as f:
    peft = [json.load(open(d + '/adapter_config.json'))['peft_type'] for d in dirs]   # the dirs exist while it runs
    f.write(json.dumps({'dirs': dirs, 'peft': peft, 'opt': opt, 'eager': '--eager' in args}) + '\\n')
n = int(opt['--num-prompts']) * int(opt['--new-tokens'])
for r in range(int(opt['--rounds'])):
    s = 2.0 + r
    print('RESULT', json.dumps({'engine': 'vllm-cpu', 'round': r, 'seconds': s, 'gen_tok_s': round(n / s, 1)}))
print('RESULT', json.dumps({'engine': 'vllm-cpu', 'init_s': 1.0, 'median_gen_tok_s': 1.0}))
"""


def test_vllm_rows_run_the_peer_script_with_the_engine_rows_prompts_and_adapters(tmp_path, tiny_model_dir, capsys,
                                                                                 scripts):
    fake = _fake_python(tmp_path / "python", FAKE_VLLM)
    out = tmp_path / "bench.json"
    assert bench_engine.main(["--model", str(tiny_model_dir), *SMALL, "--repeats", "2", "--rows",
                              "engine_base,engine_lora4,vllm_base,vllm_base_eager,vllm_lora4",
                              "--vllm-python", str(fake), *scripts, "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    res = report["results"]
    assert [res[r]["output_tokens"] for r in ("engine_lora4", "vllm_base", "vllm_lora4")] == [12, 12, 12]
    assert res["vllm_lora4"]["runs_seconds"] == [2.0, 3.0] and res["vllm_lora4"]["tokens_per_s"] == 12 / 2.0
    assert {"engine_lora4/vllm_lora4", "engine_base/vllm_base", "engine_lora4/engine_base"} <= set(report["ratios"])
    calls = [json.loads(line) for line in Path(str(fake) + ".calls").read_text().splitlines()]
    assert [(len(c["dirs"]), c["eager"]) for c in calls] == [(0, False), (0, True), (4, False)]
    args = bench_engine.build_parser().parse_args(["--seed", "0"])
    assert [int(c["opt"]["--seed"]) for c in calls] == [bench_engine.prompt_seed(args, r) for r in
                                                        ("engine_base", "engine_base", "engine_lora4")]
    assert calls[2]["peft"] == ["LORA"] * 4 and [Path(d).name for d in calls[2]["dirs"]] == \
        [f"peft_lora{i}" for i in range(4)]                                  # the dirs engine_lora4 served
    assert calls[2]["opt"]["--dtype"] == "float32" and calls[2]["opt"]["--rounds"] == "2"
    assert "engine_lora4/vllm_lora4" in capsys.readouterr().out


def test_vllm_rows_say_not_run_without_vllm(tmp_path, tiny_model_dir, capsys, scripts):
    out = tmp_path / "bench.json"
    missing = tmp_path / "no-venv" / "bin" / "python"
    assert bench_engine.main(["--model", str(tiny_model_dir), *SMALL, "--rows", "engine_base,vllm_base,vllm_lora4",
                              "--vllm-python", str(missing), *scripts, "--output", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    for row in ("vllm_base", "vllm_lora4"):
        assert "no vLLM interpreter at" in res[row]["not_run"] and str(missing) in res[row]["not_run"]
    text = capsys.readouterr().out
    assert "vllm_lora4       not run: no vLLM interpreter" in text
    assert "engine_base/vllm_base" in text and "(vllm_base not run)" in text


def test_a_failing_vllm_is_not_run_with_its_last_error(tmp_path, tiny_model_dir, monkeypatch, scripts):
    fake = _fake_python(tmp_path / "python", "sys.stderr.write('ImportError: boom\\n'); sys.exit(3)")
    monkeypatch.setenv("MTLORA_VLLM_PYTHON", str(fake))                  # found through the environment
    out = tmp_path / "bench.json"
    assert bench_engine.main(["--model", str(tiny_model_dir), *SMALL, "--rows", "vllm_base", *scripts,
                              "--output", str(out)]) == 0
    reason = json.loads(out.read_text())["results"]["vllm_base"]["not_run"]
    assert "code 3" in reason and "ImportError: boom" in reason


def test_missing_peer_script_is_a_reason(tmp_path):
    setup = bench_peers.find_vllm(sys.executable, str(tmp_path))
    assert "vllm_multilora_bench.py" in setup.problem and "not found" in setup.problem


def test_parse_results_splits_rounds_and_summary():
    rounds, final = bench_peers.parse_results('noise\nRESULT {"round": 0, "seconds": 1.0, "gen_tok_s": 5.0}\n'
                                              'RESULT {"median_gen_tok_s": 5.0, "init_s": 2.0}\n')
    assert rounds == [{"round": 0, "seconds": 1.0, "gen_tok_s": 5.0}] and final["init_s"] == 2.0


@pytest.mark.parametrize("adapters", ["none", "lora4"])
def test_profile_states_the_gemm_share_of_a_decode_step(adapters, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "profile.json"
    assert bench_profile.main(["--model", str(tiny_model_dir), "--dtype", "float32", "--batch", "4",
                               "--prompt-len", "8", "--warmup", "1", "--timed", "1", "--adapters", adapters,
                               "--output", str(out)]) == 0
    p = json.loads(out.read_text())
    assert 0 < p["gemm_ms"] <= p["step_ms_profiled"] and 0 < p["gemm_ms"] <= p["step_ms_wall"]
    assert p["gemm_share"] == pytest.approx(p["gemm_ms"] / p["step_ms_wall"]) and 0 < p["gemm_share"] <= 1
    assert any(op["name"] in bench_profile.GEMM_OPS for op in p["top_ops"])
    assert p["gemm_by_op"] and set(p["gemm_by_op"]) <= set(bench_profile.GEMM_OPS)
    assert sum(p["gemm_by_op"].values()) == pytest.approx(p["gemm_ms"])
    printed = capsys.readouterr().out
    assert "GEMMs (aten::mm" in printed
    from mtlora_server.engine import cpu_adapters, cpu_attention, cpu_fused
    want = {"mtlora::paged_decode_attention"} if cpu_attention.kernel() else set()   # built kernels show up
    want |= {"mtlora::rms_norm", "mtlora::add_rms_norm", "mtlora::silu_mul", "mtlora::rope_"} if cpu_fused.kernel() \
        else set()
    want |= {"mtlora::adapter_rows"} if adapters != "none" and cpu_adapters.kernel() else set()
    assert set(p["kernel_ms"]) == want and all(v > 0 for v in p["kernel_ms"].values())
    assert ("engine C++ kernels" in printed) == bool(want)


def test_bench_cli_has_the_profile_subcommand(monkeypatch):
    from mtlora_clients import bench

    got = {}
    monkeypatch.setattr(bench_profile, "main", lambda argv: got.setdefault("argv", argv) and 0)
    assert bench.main(["profile", "--batch", "8"]) == 0 and got["argv"] == ["--batch", "8"]
    assert "profile" in bench.build_parser().format_help()


@pytest.mark.parametrize("extra", [[], ["--routing-stats"]])
def test_ops_bench_times_both_paths_and_restores_the_default(tiny_model_dir, tmp_path, capsys, extra):
    from mtlora_server import bench_ops
    from mtlora_server.engine import cpu_adapters, lora_ops

    default = lora_ops.STACK_MIN_SLOTS
    out = tmp_path / "ops.json"
    assert bench_ops.main(["--model", str(tiny_model_dir), "--dtype", "float32", "--slots", "8", "--rows", "20",
                           "--kinds", "mix",
                           "--zipf", "1.1", "--rounds", "1", "--iters", "1", "--output", str(out)] + extra) == 0
    r = json.loads(out.read_text())
    assert r["routing_stats"] == bool(extra)
    assert sum(r["rows_per_slot"]) == 20 and min(r["rows_per_slot"]) >= 1 and len(r["rows_per_slot"]) == 8
    kernel = cpu_adapters.kernel() is not None
    assert set(r["ms_per_step"]) == {"stacked", "per_slot"} | ({"kernel"} if kernel else set())
    assert r["stacked_over_per_slot"] > 0 and (r["kernel_over_stacked"] is not None) == kernel
    printed = capsys.readouterr().out
    assert lora_ops.STACK_MIN_SLOTS == default and "stacked / per_slot" in printed
    assert ("kernel / stacked" in printed) == kernel
    with pytest.raises(ValueError, match="--rows 3 is fewer than --slots 4"):
        bench_ops.rows_per_slot(3, 4, 0.0)


@pytest.mark.parametrize("hidden,group_size", [(576, 192), (64, 32), (96, 32), (35, None)])
def test_bench_adapter_specs_route_groups_that_divide_the_hidden_size(hidden, group_size):
    """The main mtlora adapter's routing groups divide any model width (hidden // 3 broke 64-wide test models)."""
    from mtlora.config import AdapterConfig
    from mtlora_server.bench_engine import adapter_specs

    spec = adapter_specs(hidden)["mt_ffn"]
    assert spec["routing_group_size"] == group_size
    assert AdapterConfig(**spec).groups_for(hidden) == (hidden // group_size if group_size else 1)


def test_interleaved_engine_rows_step_one_engine_per_row_in_turn(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """--interleave: each engine row on its own engine, the engines stepping in turn; every row's runs generate
    all their tokens and the ratios print as usual."""
    from mtlora_server.engine import core as core_module
    stepped, real = [], core_module.EngineCore.step

    def step(self):
        stepped.append(id(self))
        return real(self)

    monkeypatch.setattr(core_module.EngineCore, "step", step)
    out = tmp_path / "bench.json"
    assert bench_engine.main(["--model", str(tiny_model_dir), *SMALL, "--repeats", "2", "--interleave", "--rows",
                              "engine_base,engine_mix4,engine_lora4", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    res = report["results"]
    for row in ("engine_base", "engine_mix4", "engine_lora4"):
        assert res[row]["output_tokens"] == 4 * 3 and len(res[row]["runs_seconds"]) == 2, row
    assert len(set(stepped)) == 3 and sum(a != b for a, b in zip(stepped, stepped[1:])) >= len(stepped) // 2
    assert report["interleaved"] is True
    printed = capsys.readouterr().out
    assert "engine_mix4/engine_base" in printed and "engine rows: interleaved" in printed
