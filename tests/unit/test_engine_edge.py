"""The engine's own defences against input that once killed its step loop (issue 13), behind the API's checks:
out-of-vocabulary stop ids are refused at admission, temperatures below MIN_TEMPERATURE sample greedily (no
inf/NaN probabilities), SamplingParams refuses non-finite or out-of-range values, and unloading an adapter in use
raises AdapterBusyError (the API's 409)."""

from __future__ import annotations

import math

import pytest
import torch

from mtlora.errors import AdapterBusyError, InvalidRequestError
from mtlora.testing import make_tiny_model_dir
from mtlora_server.engine.core import EngineCore
from mtlora_server.engine.sampling import sample
from mtlora_server.engine.testing import run_to_completion, tiny_engine_args, write_random_adapter
from mtlora_server.engine.types import MIN_TEMPERATURE, GenerationRequest, SamplingParams

PROMPT = [1] + [ord(c) + 3 for c in "Hello!"]


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-edge")
    model_dir = make_tiny_model_dir(root / "model", seed=3)
    core = EngineCore(tiny_engine_args(model_dir))
    path = write_random_adapter(root / "lora", core.hf_config, method="lora", rank=4, target_modules=["q_proj"])
    core.install_adapter("lora", *core.read_adapter(str(path)), str(path))
    return core


@pytest.mark.parametrize("temperature", [1e-40, 1e-50, 5e-324, MIN_TEMPERATURE / 2])
def test_tiny_temperatures_sample_greedily(temperature):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 30
    params = [SamplingParams(temperature=temperature, top_p=p, top_k=k) for p, k in
              [(1.0, 0), (0.5, 0), (1.0, 5), (0.3, 2)]]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    assert sample(logits, params, gens).tolist() == logits.argmax(-1).tolist()
    assert all(p.greedy for p in params)


def test_the_temperature_floor_itself_still_samples():
    logits = torch.zeros(1, 50)
    draws = {int(sample(logits, [SamplingParams(temperature=MIN_TEMPERATURE)],
                        [torch.Generator().manual_seed(s)])[0]) for s in range(10)}
    assert len(draws) > 1                          # flat logits: not argmax, and no NaN from the division


@pytest.mark.parametrize("field,value", [
    ("temperature", math.inf), ("temperature", math.nan), ("temperature", 101.0), ("temperature", -1e-9),
    ("top_p", math.nan), ("seed", 2**63), ("seed", -(2**63) - 1), ("stop_token_ids", [-1]),
    ("stop_token_ids", ["7"]), ("stop_token_ids", [1.5]),
])
def test_sampling_params_refuse_values_that_reach_tensors(field, value):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field


@pytest.mark.parametrize("stop_ids", [[260], [100_000], [5, 2**70]])
def test_out_of_vocabulary_stop_ids_are_refused_at_admission(core, stop_ids):
    """The issue's lethal request: min_tokens bans the stop ids, which used to index past the logits rows."""
    params = SamplingParams(max_tokens=8, min_tokens=4, stop_token_ids=stop_ids)
    with pytest.raises(InvalidRequestError) as err:
        core.add_request(GenerationRequest("bad", PROMPT, params))
    assert err.value.param == "stop_token_ids"
    assert not core.requests and not core.has_work()
    ok = run_to_completion(core, [GenerationRequest("ok", PROMPT, SamplingParams(
        max_tokens=8, min_tokens=4, stop_token_ids=[259], temperature=1e-40))])["ok"]
    assert ok.finished and len(ok.tokens[0]) >= 4


def test_unloading_an_adapter_in_use_is_busy_not_a_load_error(core):
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    state = core.add_request(GenerationRequest("busy", PROMPT, params, adapter="lora"))
    with pytest.raises(AdapterBusyError, match="in use by 1 running sequence"):
        core.remove_adapter("lora")
    run_to_completion(core, [])
    assert state.finished and "lora" in core.adapters
    core.remove_adapter("lora")
    assert "lora" not in core.adapters
