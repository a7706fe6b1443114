"""The reference oracle: KV-cached decoding equals full recompute, logprobs agree with logits, routing weights are
per-token softmaxes of the right shape, and a model directory and an in-memory model give the same answers."""

from __future__ import annotations

import pytest
import torch

from mtlora.checkpoint import save_adapter
from mtlora.config import AdapterConfig
from mtlora.errors import IncompatibleAdapterError, InvalidRequestError
from mtlora.reference import ReferenceModel, random_adapter_tensors
from mtlora.testing import tiny_llama_config, tiny_llama_model

MCFG = tiny_llama_config()
ADAPTERS = {
    "mtlora-both-fgr": AdapterConfig(method="mtlora", placement="both", rank=4, num_experts=3, routing_group_size=16),
    "hydralora": AdapterConfig(method="hydralora", target_modules=["q_proj", "k_proj", "up_proj"], rank=4,
                               num_experts=2, routing_group_size=8),
    "lora": AdapterConfig(method="lora", target_modules=["o_proj", "down_proj"], rank=4),
}
PROMPT = [1, 72, 101, 108, 108, 111, 32, 119]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_adapter(root / name, cfg, random_adapter_tensors(cfg, MCFG, seed=7, scale=0.5))
            for name, cfg in ADAPTERS.items()}


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_cached_greedy_equals_full_recompute(adapter_dirs, adapter):
    ref = ReferenceModel(tiny_llama_model(seed=2), adapter=adapter_dirs[adapter] if adapter else None)
    full = ref.greedy(PROMPT, max_new_tokens=12)
    assert len(full) == 12
    assert ref.greedy_cached(PROMPT, max_new_tokens=12) == full
    # Stopping at an eos that greedy decoding produces: the eos is returned and nothing after it.
    eos = full[4]
    first = full.index(eos)
    assert ref.greedy(PROMPT, 12, eos_token_id=eos) == full[: first + 1]
    assert ref.greedy_cached(PROMPT, 12, eos_token_id=[999, eos]) == full[: first + 1]
    assert ref.greedy(PROMPT, 0) == [] and ref.greedy_cached(PROMPT, 0) == []


def test_adapter_changes_greedy_output_or_logits(adapter_dirs):
    model = tiny_llama_model(seed=2)
    bare = ReferenceModel(model)
    for name, path in adapter_dirs.items():
        adapted = ReferenceModel(model, adapter=path)
        assert not torch.allclose(adapted.logits(PROMPT), bare.logits(PROMPT), atol=1e-3), name
    # The caller's model is not modified by building references with adapters.
    assert not hasattr(model, "_mtlora_config") or model._mtlora_config is None


def test_prompt_logprobs_match_log_softmax(adapter_dirs):
    ref = ReferenceModel(tiny_llama_model(), adapter=adapter_dirs["hydralora"])
    lps = ref.prompt_logprobs(PROMPT)
    assert lps[0] is None and len(lps) == len(PROMPT)
    logits = ref.logits(PROMPT).double()                                          # [T, V]
    for t in range(1, len(PROMPT)):
        want = logits[t - 1, PROMPT[t]] - torch.logsumexp(logits[t - 1], dim=-1)
        assert lps[t] == pytest.approx(want.item(), abs=1e-5)
        assert lps[t] < 0


def test_logits_are_causal(adapter_dirs):
    ref = ReferenceModel(tiny_llama_model(), adapter=adapter_dirs["mtlora-both-fgr"])
    full = ref.logits(PROMPT)
    assert full.shape == (len(PROMPT), MCFG.vocab_size) and full.dtype == torch.float32
    torch.testing.assert_close(ref.logits(PROMPT[:5]), full[:5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_routing_weights(adapter_dirs, name):
    config = ADAPTERS[name]
    ref = ReferenceModel(tiny_llama_model(), adapter=adapter_dirs[name])
    routing = ref.routing(PROMPT)
    assert sorted(routing) == sorted(f"layers.{i}.{s}" for i in range(2) for s in config.sites())
    for site, w in routing.items():
        d_out = ref.adapters[site].out_features
        assert w.shape == (len(PROMPT), config.groups_for(d_out), config.num_experts), site
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]))
        if config.num_experts > 1:   # a random router gives different tokens different weights
            assert not torch.allclose(w[0], w[-1])
    assert all(a.last_routing is None and not a.record_routing for a in ref.adapters.values())


def test_model_dir_and_model_agree(tiny_model_dir, adapter_dirs):
    from_dir = ReferenceModel(tiny_model_dir, adapter=adapter_dirs["lora"])
    from_model = ReferenceModel(tiny_llama_model(), adapter=adapter_dirs["lora"])   # same seed as the dir
    torch.testing.assert_close(from_dir.logits(PROMPT), from_model.logits(PROMPT), rtol=1e-5, atol=1e-5)
    bf16 = ReferenceModel(tiny_model_dir, adapter=adapter_dirs["lora"], dtype=torch.bfloat16)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.logits(PROMPT).dtype == torch.float32


def test_bad_inputs(adapter_dirs):
    ref = ReferenceModel(tiny_llama_model())
    for bad in ([], [1, MCFG.vocab_size], [-1]):
        with pytest.raises(InvalidRequestError) as err:
            ref.logits(bad)
        assert err.value.param == "token_ids"
    with pytest.raises(IncompatibleAdapterError, match="adapter_model.safetensors"):
        ReferenceModel(tiny_llama_model(num_hidden_layers=3), adapter=adapter_dirs["lora"])
