"""Standard PEFT LoRA adapters, written by the `peft` library itself: they serve with the logits of peft's own
PeftModel (reference oracle and EngineCore, fp32, <= 1e-4), every LoraConfig field is honoured or refused by name,
they mix with mtlora and hydralora adapters in one batch, and `mtlora-convert` writes them as native adapters."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from mtlora import peft_format
from mtlora.checkpoint import load_adapter
from mtlora.convert import detect_format
from mtlora.convert import main as convert_main
from mtlora.errors import AdapterLoadError, CheckpointError, ConfigError
from mtlora.reference import ReferenceModel
from mtlora_server.engine.core import EngineCore
from mtlora_server.engine.testing import TINY_ADAPTERS, run_to_completion, tiny_engine_args, write_random_adapter
from mtlora_server.engine.types import GenerationRequest, SamplingParams
from peft_helpers import PEFT_CASES, peft_logits, write_peft_adapter

IDS = torch.randint(3, 259, (29,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("peft")
    return {name: write_peft_adapter(root / name, tiny_model_dir, seed=i, **kw)
            for i, (name, kw) in enumerate(PEFT_CASES.items())}


@pytest.fixture(scope="module")
def want_logits(peft_dirs, tiny_model_dir):
    return {name: peft_logits(tiny_model_dir, path, IDS) for name, path in peft_dirs.items()}


@pytest.fixture(scope="module")
def core(peft_dirs, tiny_model_dir, tmp_path_factory):
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("native")
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    native = {name: str(write_random_adapter(root / name, cfg, seed=7 + i, **TINY_ADAPTERS[name]))
              for i, name in enumerate(("mt_both", "hydra"))}
    adapters = {**{name: str(p) for name, p in peft_dirs.items()}, **native}
    return EngineCore(tiny_engine_args(tiny_model_dir, adapters=adapters, max_adapters=len(adapters)))


def _req(rid, adapter, ids=IDS, max_tokens=1, **kw):
    return GenerationRequest(rid, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw),
                             adapter=adapter)


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_reference_matches_peft_model(case, peft_dirs, want_logits, tiny_model_dir):
    ref = ReferenceModel(tiny_model_dir, peft_dirs[case])
    got = ref.logits(IDS)
    torch.testing.assert_close(got, want_logits[case], atol=1e-4, rtol=0)
    bare = ReferenceModel(tiny_model_dir).logits(IDS)
    assert (bare - want_logits[case]).abs().max() > 1e-2        # the adapter does change the output


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_engine_matches_peft_model(case, core, want_logits):
    res = run_to_completion(core, [_req("a", case, prompt_logprobs=0)])["a"]
    want = torch.log_softmax(want_logits[case], -1)
    want = torch.stack([want[t - 1, IDS[t]] for t in range(1, len(IDS))])
    got = torch.tensor([x.logprob for x in res.prompt_logprobs[1:]])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert res.tokens[0] == [int(want_logits[case][-1].argmax())]


def test_converted_config_folds_only_when_scalings_differ(peft_dirs, tiny_model_dir):
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(tiny_model_dir)
    plain, tensors = load_adapter(peft_dirs["qv"], model_config=mcfg)
    assert (plain.method, plain.rank, plain.alpha, plain.target_modules) == ("lora", 4, 8.0, ["q_proj", "v_proj"])
    from safetensors.torch import load_file

    raw = load_file(peft_dirs["qv"] / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert torch.equal(tensors["layers.1.self_attn.v_proj.lora_B"][0], raw[key])      # copied, not rescaled
    mixed, tensors = load_adapter(peft_dirs["rank-alpha-pattern"], model_config=mcfg)
    assert (mixed.rank, mixed.alpha) == (8, 8.0)                                          # scaling 1, folded
    assert not tensors["layers.0.self_attn.v_proj.lora_A"][2:].any()                     # rank 2 padded to 8
    layers, _ = load_adapter(peft_dirs["layers-to-transform"], model_config=mcfg)
    assert layers.target_modules == ["q_proj", "o_proj", "gate_proj"]
    _, tensors = load_adapter(peft_dirs["layers-to-transform"], model_config=mcfg)
    assert not tensors["layers.0.self_attn.q_proj.lora_B"].any() and tensors["layers.1.self_attn.q_proj.lora_B"].any()


def test_peft_mtlora_and_hydralora_in_one_batch(core):
    prompts = {name: torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for name, n in (("qv", 17), ("mt_both", 23), ("hydra", 11), ("rank-alpha-pattern", 19))}
    alone = {name: run_to_completion(core, [_req(name, name, ids, max_tokens=6)])[name].tokens[0]
             for name, ids in prompts.items()}
    mixed = run_to_completion(core, [_req(name, name, ids, max_tokens=6) for name, ids in prompts.items()])
    assert {name: r.tokens[0] for name, r in mixed.items()} == alone


def test_every_lora_config_field_is_classified():
    from peft import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig)} | set(LoraConfig(target_modules=["q_proj"]).to_dict())
    known = set(peft_format.HONOURED_FIELDS) | set(peft_format.IGNORED_FIELDS) | set(peft_format.REFUSED_FIELDS)
    assert fields - known == set()
    overlap = set(peft_format.HONOURED_FIELDS) & set(peft_format.REFUSED_FIELDS) | \
        set(peft_format.IGNORED_FIELDS) & (set(peft_format.HONOURED_FIELDS) | set(peft_format.REFUSED_FIELDS))
    assert overlap == set()


REFUSED = [  # (config overrides, field the error must name)
    (dict(use_dora=True), "use_dora"), (dict(lora_bias=True), "lora_bias"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"), (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(layer_replication=[[0, 2]]), "layer_replication"), (dict(target_parameters=["w"]), "target_parameters"),
    (dict(trainable_token_indices=[5]), "trainable_token_indices"),
    (dict(megatron_config={"tensor_model_parallel_size": 2}), "megatron_config"),
    (dict(loftq_config={"loftq_bits": 4}), "loftq_config"), (dict(corda_config={"a": 1}), "corda_config"),
    (dict(lora_ga_config={"a": 1}), "lora_ga_config"), (dict(kasa_config={"a": 1}), "kasa_config"),
    (dict(velora_config={"a": 1}), "velora_config"), (dict(monteclora_config={"a": 1}), "monteclora_config"),
    (dict(alora_invocation_tokens=[1, 2]), "alora_invocation_tokens"), (dict(use_qalora=True), "use_qalora"),
    (dict(use_bdlora={"a": 1}), "use_bdlora"), (dict(arrow_config={"top_k": 2}), "arrow_config"),
    (dict(bias="all"), "bias"), (dict(bias="lora_only"), "bias"),
    (dict(init_lora_weights="pissa"), "init_lora_weights"), (dict(init_lora_weights="olora"), "init_lora_weights"),
    (dict(peft_type="LOHA"), "peft_type"),
    (dict(future_field=1), "future_field"), (dict(target_modules=["q_proj", "lm_head"]), "target_modules"),
    (dict(target_modules=["embed_tokens"]), "target_modules"), (dict(target_modules=r".*\.mlp"), "target_modules"),
    (dict(target_modules=["nothing_here"]), "target_modules"), (dict(r=0), "r"), (dict(lora_alpha=-1), "lora_alpha"),
    (dict(exclude_modules=3), "exclude_modules"), (dict(layers_to_transform="1"), "layers_to_transform"),
    (dict(rank_pattern={"v_proj": 0}), "rank_pattern"), (dict(alpha_pattern={"(": 2}), "alpha_pattern"),
]


@pytest.mark.parametrize("overrides,field", REFUSED, ids=[f"{i}-{f}" for i, (_, f) in enumerate(REFUSED)])
def test_refused_fields_are_named(overrides, field, peft_dirs, tmp_path, tiny_model_dir):
    from transformers import AutoConfig

    bad = tmp_path / "bad"
    shutil.copytree(peft_dirs["qv"], bad)
    data = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**data, **overrides}))
    with pytest.raises(ConfigError) as exc:
        load_adapter(bad, model_config=AutoConfig.from_pretrained(tiny_model_dir))
    assert exc.value.field == field and field in str(exc.value) and "adapter_config.json" in str(exc.value)
    if field == "target_modules" and "lm_head" in str(overrides):
        assert "'lm_head'" in str(exc.value)


def test_refused_through_the_engine_keeps_it_serving(core, peft_dirs, tmp_path):
    bad = tmp_path / "dora"
    shutil.copytree(peft_dirs["qv"], bad)
    data = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**data, "use_dora": True}))
    with pytest.raises(AdapterLoadError, match="use_dora"):
        core.read_adapter(str(bad))
    assert run_to_completion(core, [_req("ok", "qv")])["ok"].finished


def test_key_mismatches_are_named(peft_dirs, tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(tiny_model_dir)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    for name, edit in (("missing", lambda s: s.pop(key)),
                       ("extra", lambda s: s.__setitem__("base_model.model.lm_head.lora_A.weight", s[key].clone())),
                       ("shape", lambda s: s.__setitem__(key, s[key][:, :10].clone()))):
        bad = tmp_path / name
        shutil.copytree(peft_dirs["qv"], bad)
        state = load_file(bad / "adapter_model.safetensors")
        edit(state)
        save_file(state, bad / "adapter_model.safetensors")
        with pytest.raises(CheckpointError) as exc:
            load_adapter(bad, model_config=mcfg)
        want = "lm_head" if name == "extra" else key
        assert want in str(exc.value) and "adapter_model.safetensors" in str(exc.value)


def test_bin_weights_and_detection(tmp_path, tiny_model_dir, want_logits):
    path = write_peft_adapter(tmp_path / "bin", tiny_model_dir, seed=0, safe=False, **PEFT_CASES["qv"])
    assert (path / "adapter_model.bin").is_file() and not (path / "adapter_model.safetensors").exists()
    torch.testing.assert_close(ReferenceModel(tiny_model_dir, path).logits(IDS), want_logits["qv"], atol=1e-4,
                               rtol=0)
    assert detect_format(path) == "peft-lora"
    assert not peft_format.is_peft_config({"peft_type": "LORA", "lora_nums": 1, "r": 4})   # official fork


def test_convert_round_trip(peft_dirs, tiny_model_dir, tmp_path, want_logits, capsys):
    for case in ("rank-alpha-pattern", "layers-to-transform"):
        dst = tmp_path / case
        assert convert_main([str(peft_dirs[case]), str(dst), "--base-model", str(tiny_model_dir)]) == 0
        assert detect_format(dst) == "native"
        cfg = json.loads((dst / "adapter_config.json").read_text())
        assert cfg["method"] == "lora" and cfg["base_fingerprint"]
        torch.testing.assert_close(ReferenceModel(tiny_model_dir, dst).logits(IDS), want_logits[case], atol=1e-4,
                                   rtol=0)
    assert "converted peft-lora adapter" in capsys.readouterr().out
    # Without the base, an adapter that skips layers cannot know the layer count: a clear error, nothing written.
    assert convert_main([str(peft_dirs["layers-to-transform"]), str(tmp_path / "nobase")]) == 1
    assert "--base-model" in capsys.readouterr().err and not (tmp_path / "nobase").exists()
    assert convert_main([str(peft_dirs["qv"]), str(tmp_path / "qv"), "--dtype", "bfloat16"]) == 0
    _, tensors = load_adapter(tmp_path / "qv")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_convert_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        convert_main(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())         # argparse wraps lines
    for text in ("PEFT LoRA", "official mtLoRA", "--base-model", "--dtype", "layers_to_transform"):
        assert text in out


def test_adapter_for_another_base_is_incompatible(tmp_path, tiny_model_dir):
    from transformers import AutoConfig

    from mtlora.errors import IncompatibleAdapterError
    from mtlora.testing import make_tiny_model_dir

    wider = make_tiny_model_dir(tmp_path / "wider", hidden_size=96, intermediate_size=160)
    path = write_peft_adapter(tmp_path / "a", wider, **PEFT_CASES["qv"])
    with pytest.raises(IncompatibleAdapterError, match="another base") as exc:
        load_adapter(path, model_config=AutoConfig.from_pretrained(tiny_model_dir))
    assert exc.value.field.endswith("lora_A.weight")
