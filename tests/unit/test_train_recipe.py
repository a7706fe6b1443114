"""End-to-end training on a tiny random LLaMA: loss falls, exact resume, checkpoint reproduces logits, methods."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mtlora import inject
from mtlora.base import config_fingerprint, load_base_model
from mtlora.checkpoint import load_adapter
from mtlora.errors import CheckpointError
from mtlora.testing import make_tiny_model_dir
from mtlora_train.config import TrainConfig
from mtlora_train.data import Collator
from mtlora_train.recipe import MtloraRecipe

TASKS = {
    "upper": ("Write the word in capitals", str.upper),
    "reverse": ("Write the word backwards", lambda w: w[::-1]),
    "first": ("Give the first letter of the word", lambda w: w[0]),
    "double": ("Write the word twice", lambda w: w + w),
}


def _mixture(path, n_per_task: int, seed: int = 0):
    """A synthetic 4-task mixture in the training schema, tasks interleaved."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_per_task):
        for task, (instruction, fn) in TASKS.items():
            word = "".join(rng.choice("abcdefgh") for _ in range(4))
            rows.append({"instruction": instruction, "input": word, "output": fn(word), "task_type": task})
    path.mkdir(parents=True, exist_ok=True)
    (path / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    return _mixture(tmp_path_factory.mktemp("mix"), n_per_task=5)


def _cfg(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(method="mtlora", model_name_or_path=str(model_dir), dataset_dir=str(data), output_dir=str(out),
                lora_rank=4, lora_nums=4, enable_block_adapter=True, block_adapter_type="ffn",
                per_device_train_batch_size=4, learning_rate=1e-2, lora_dropout=0.0, save_steps=0,
                data_cache_dir=str(out.parent / "cache"), logging_steps=1000, max_seq_length=64)
    base.update(kw)
    return TrainConfig(**base)


def _dataset_ce(recipe: MtloraRecipe) -> float:
    """Cross-entropy of the whole training set in eval mode (no dropout): a noise-free before/after measure."""
    model = recipe.accelerator.unwrap_model(recipe.model).eval()
    batch = Collator(0)([recipe.dataset[i] for i in range(len(recipe.dataset))])
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train()
    return loss


def test_loss_falls_on_four_task_mixture(tmp_path):
    # A wider initialisation than the default tiny model, so a frozen random lm_head can express peaked outputs.
    model_dir = make_tiny_model_dir(tmp_path / "model", initializer_range=0.2)
    data = _mixture(tmp_path / "data", n_per_task=8)
    cfg = _cfg(model_dir, data, tmp_path / "out", max_steps=30, enable_blc=True,
               enable_spectral_reg=True, spectral_reg_lambda=1.0, enable_fine_grained_routing=True,
               routing_group_size=32)
    recipe = MtloraRecipe(cfg).setup()
    before = _dataset_ce(recipe)
    hist = recipe.train()
    after = _dataset_ce(recipe)
    assert after < 0.7 * before, (before, after)
    assert len(hist) == 30 and sum(h["ce"] for h in hist[-5:]) < sum(h["ce"] for h in hist[:5])
    assert all({"loss", "ce", "balance", "spectral"} <= set(h) for h in hist)
    assert hist[-1]["spectral"] > 0 and hist[-1]["balance"] > 0


def test_resumed_run_matches_uninterrupted_run_exactly(tiny_model_dir, mixture, tmp_path, caplog):
    # 20 examples, batch 2, accumulation 2: 5 updates per epoch, so the run crosses an epoch boundary;
    # dropout, balance, spectral and checkpointing are on so that every piece of saved state matters.
    kw = dict(max_steps=7, save_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
              lora_dropout=0.1, enable_blc=True, enable_spectral_reg=True, spectral_reg_steps=2,
              enable_fine_grained_routing=True, routing_group_size=32, gradient_checkpointing=True,
              learning_rate=5e-3)
    full = MtloraRecipe(_cfg(tiny_model_dir, mixture, tmp_path / "full", **kw)).setup()
    full_hist = full.train()
    assert [h["epoch"] for h in full_hist] == [0, 0, 0, 0, 0, 1, 1]

    class Crash(Exception):
        pass

    class CrashingRecipe(MtloraRecipe):
        def _after_update(self, sums, bar):
            super()._after_update(sums, bar)
            if self.global_step == 4:                # one update past the last checkpoint
                raise Crash

    resumed_dir = tmp_path / "resumed"
    with pytest.raises(Crash):
        CrashingRecipe(_cfg(tiny_model_dir, mixture, resumed_dir, **kw)).setup().train()
    assert sorted(p.name for p in resumed_dir.iterdir()) == ["checkpoint-3"]
    torch.manual_seed(12345)                         # the checkpoint's RNG state must win over whatever is set
    resumed = MtloraRecipe(_cfg(tiny_model_dir, mixture, resumed_dir, resume_from_checkpoint="last", **kw)).setup()
    assert resumed.global_step == 3 and "changed options" not in caplog.text
    resumed_hist = resumed.train()
    assert resumed_hist == full_hist                 # every loss term, lr and epoch, bit for bit
    a, b = full.adapter_tensors(), resumed.adapter_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_saved_adapter_reproduces_training_time_logits_in_core_and_engine(tiny_model_dir, mixture, tmp_path):
    out = tmp_path / "out"
    recipe = MtloraRecipe(_cfg(tiny_model_dir, mixture, out, max_steps=4, lora_dropout=0.1,
                               enable_fine_grained_routing=True, routing_group_size=16)).setup()
    recipe.train()
    trained = recipe.accelerator.unwrap_model(recipe.model).eval()
    ids = torch.randint(3, 250, (2, 12))
    with torch.no_grad():
        want = trained(input_ids=ids).logits

    base = load_base_model(tiny_model_dir, torch.float32)
    config, tensors = load_adapter(out / "adapter", base.config)
    assert config.base_model == str(tiny_model_dir)
    assert config.base_fingerprint == config_fingerprint(base.config)
    assert config.routing_group_size == 16 and config.placement == "ffn"
    with torch.no_grad():
        bare = base(input_ids=ids).logits
    inject.attach(base, config)
    inject.load_adapter_state(base, tensors)
    with torch.no_grad():
        got = base.eval()(input_ids=ids).logits
    assert not torch.allclose(bare, want, atol=1e-4)   # training changed the model
    torch.testing.assert_close(got, want)

    # ... and in the serving engine: its prompt logprobs are the training-time model's
    from mtlora_server.engine.core import EngineCore
    from mtlora_server.engine.testing import run_to_completion, tiny_engine_args
    from mtlora_server.engine.types import GenerationRequest, SamplingParams

    core = EngineCore(tiny_engine_args(tiny_model_dir, adapters={"trained": str(out / "adapter")}))
    prompt = ids[0].tolist()
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    res = run_to_completion(core, [GenerationRequest("r", prompt, params, adapter="trained")])["r"]
    served = torch.tensor([lp.logprob for lp in res.prompt_logprobs[1:]])
    trained_lp = torch.log_softmax(want[0], -1)[torch.arange(len(prompt) - 1), ids[0, 1:]]
    torch.testing.assert_close(served, trained_lp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["mtlora", "lora"])
def test_answer_ce_equals_transformers_labels_loss_on_padded_batches(tiny_model_dir, mixture, tmp_path, method):
    """loss_step runs the LM head on labelled positions only; it must equal the model's own `labels=` loss (and its
    gradients) on right-padded batches of several lengths, pad positions and prompts included."""
    recipe = MtloraRecipe(_cfg(tiny_model_dir, mixture, tmp_path / "out", method=method,
                               enable_block_adapter=method == "mtlora")).setup()
    torch.manual_seed(0)
    with torch.no_grad():                                  # B != 0 so every adapter tensor gets a gradient
        for a in recipe.adapters.values():
            a.lora_B.normal_(0, 0.2)
    params = {n: p for n, p in recipe.model.named_parameters() if p.requires_grad}
    padded = 0
    for batch in list(recipe.loader)[:3]:
        padded += int((~batch["attention_mask"].bool()).sum())
        ours = recipe.loss_step(batch)["ce"]
        ours.backward()
        got = {n: p.grad.clone() for n, p in params.items()}
        recipe.optimizer.zero_grad(set_to_none=True)
        ref = recipe.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss.float()
        ref.backward()
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        for n, p in params.items():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{n}: {m}")
        recipe.optimizer.zero_grad(set_to_none=True)
    assert padded > 0, "the batches must contain padding for this test to mean anything"


@pytest.mark.parametrize("method,extra,expect", [
    ("lora", {}, {"method": "lora", "num_experts": 1, "target_modules": ["q_proj", "v_proj"]}),
    ("hydralora", {"enable_blc": True}, {"method": "hydralora", "num_experts": 4}),
    ("mtlora", {"enable_block_adapter": False}, {"method": "hydralora", "placement": None}),
    ("mtlora", {"block_adapter_type": "both"}, {"method": "mtlora", "placement": "both"}),
])
def test_methods_train_and_save(tiny_model_dir, mixture, tmp_path, method, extra, expect):
    kw = {"enable_block_adapter": method == "mtlora", **extra}
    recipe = MtloraRecipe(_cfg(tiny_model_dir, mixture, tmp_path / "out", method=method, max_steps=2, **kw))
    hist = recipe.setup().train()
    assert len(hist) == 2 and all(h["loss"] == h["loss"] for h in hist)   # finite, not NaN
    config, tensors = load_adapter(tmp_path / "out" / "adapter")
    for key, value in expect.items():
        assert getattr(config, key) == value
    assert any(t.abs().sum() > 0 for n, t in tensors.items() if n.endswith("lora_B"))


def test_checkpoints_are_complete_pruned_and_refuse_changed_data(tiny_model_dir, tmp_path):
    data = _mixture(tmp_path / "data", n_per_task=2)
    out = tmp_path / "out"
    MtloraRecipe(_cfg(tiny_model_dir, data, out, max_steps=4, per_device_train_batch_size=2, save_steps=1,
                      save_total_limit=2)).setup().train()
    names = sorted(p.name for p in out.iterdir() if not p.name.endswith(".png"))
    assert names == ["adapter", "checkpoint-3", "checkpoint-4", "log_history.jsonl",
                     "train_config.json"]   # no temporary debris
    files = sorted(p.name for p in (out / "checkpoint-4").iterdir())
    assert files == ["adapter", "extra.pt", "optimizer.pt", "rng_0.pt", "scheduler.pt", "trainer_state.json"]
    _mixture(data, n_per_task=2, seed=1)                                  # same file name, new content
    with pytest.raises(CheckpointError, match="training data changed"):
        MtloraRecipe(_cfg(tiny_model_dir, data, out, max_steps=6, per_device_train_batch_size=2,
                          resume_from_checkpoint=str(out / "checkpoint-4"))).setup()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 autocast and placement on device)")
def test_bf16_autocast_with_checkpointing_on_cuda(tiny_model_dir, mixture, tmp_path):
    recipe = MtloraRecipe(_cfg(tiny_model_dir, mixture, tmp_path / "out", max_steps=6, bf16=True,
                               gradient_checkpointing=True, enable_blc=True, enable_spectral_reg=True,
                               enable_fine_grained_routing=True, routing_group_size=32)).setup()
    model = recipe.accelerator.unwrap_model(recipe.model)
    assert model.lm_head.weight.device.type == "cuda" and model.lm_head.weight.dtype == torch.bfloat16
    hist = recipe.train()
    assert all(a.lora_A.dtype == torch.float32 for a in recipe.adapters.values())   # fp32 master weights
    assert all(torch.isfinite(torch.tensor([h["loss"], h["balance"], h["spectral"]])).all() for h in hist)
    assert all(a.router.grad is None or a.router.grad.dtype == torch.float32 for a in recipe.adapters.values())
    assert {p.name for p in (tmp_path / "out").glob("*.png")} >= {"loss.png", "spectrum.png"}  # plots from CUDA tensors


@pytest.mark.parametrize("content,needle", [
    ("{not json", "invalid JSON at line 1"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"global_step": 3, "epoch": 0}), "batch_in_epoch"),
])
def test_damaged_trainer_state_names_file_and_field(tmp_path, content, needle):
    from mtlora_train import state

    ck = tmp_path / "checkpoint-3"
    ck.mkdir()
    (ck / state.STATE_FILE).write_text(content, encoding="utf-8")
    with pytest.raises(CheckpointError, match=needle) as err:
        state.read_state(ck)
    assert str(ck) in str(err.value)


class _Payload:
    """An object a weights-only load must refuse (unpickling it would call arbitrary code)."""

    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize("content", [{"evil": _Payload()}, b"not a zip"])
def test_checkpoint_files_load_weights_only(tmp_path, content, capsys):
    from mtlora_train import state

    ck = tmp_path / "checkpoint-1"
    ck.mkdir()
    if isinstance(content, bytes):
        (ck / "optimizer.pt").write_bytes(content)
    else:
        torch.save(content, ck / "optimizer.pt")
    with pytest.raises(CheckpointError, match="weights_only") as err:
        state.load_torch(ck, "optimizer.pt")
    assert "optimizer.pt" in str(err.value) and "unpickled!" not in capsys.readouterr().out
    import numpy as np

    torch.save(state.rng_state(), ck / "rng_0.pt")          # our own RNG states pass the weights-only load
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    state.set_rng_state(state.load_torch(ck, "rng_0.pt"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws


@torch.no_grad()
def test_study_heldout_ce_equals_the_full_logits_cross_entropy(tiny_model_dir):
    """The study's held-out CE runs the LM head on answer positions only: the same value as the mean
    cross-entropy of the full [B, T, vocab] logits over the labelled positions (padded batch, adapter attached)."""
    from mtlora.config import AdapterConfig
    from mtlora.reference import random_adapter_tensors
    from mtlora_train.data import IGNORE_INDEX
    from mtlora_train.study_report import _task_ce

    model = load_base_model(tiny_model_dir, torch.float32, "cpu").eval()
    cfg = AdapterConfig(method="mtlora", rank=4, alpha=8.0, num_experts=3, placement="ffn")
    inject.attach(model, cfg)
    inject.load_adapter_state(model, random_adapter_tensors(cfg, model.config, seed=1, scale=0.2), source="test")
    g = torch.Generator().manual_seed(0)
    items = []
    for n, p in ((9, 5), (14, 11), (6, 2), (12, 7), (5, 4)):                   # lengths differ: padded batches
        ids = torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()
        items.append({"input_ids": ids, "prompt_len": p})
    nll, count = 0.0, 0
    for it in items:                                                            # one unpadded sequence at a time
        ids = torch.tensor([it["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1].float()
        labels = torch.tensor(it["input_ids"][1:])
        labels[: it["prompt_len"] - 1] = IGNORE_INDEX
        nll += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    assert _task_ce(model, items, batch_size=3, pad_id=0) == pytest.approx(nll / count, rel=1e-5)


def test_processes_meet_after_the_final_save_before_the_group_is_torn_down(tiny_model_dir, mixture, tmp_path):
    """The last collective of a run is a barrier after the main process's final save (adapter, history, plots)
    and before `end_training` destroys the process group: a gloo rank that tears down and exits while a peer is
    still busy sometimes aborts at exit (the DDP integration test catches it only now and then)."""
    recipe = MtloraRecipe(_cfg(tiny_model_dir, mixture, tmp_path / "out", max_steps=1)).setup()
    calls, acc = [], recipe.accelerator
    for name in ("wait_for_everyone", "end_training"):
        real = getattr(acc, name)
        setattr(acc, name, lambda real=real, name=name: (calls.append(name), real())[1])
    real_save = recipe.save_final
    recipe.save_final = lambda: (calls.append("save_final"), real_save())[1]
    recipe.train()
    assert calls[-4:] == ["save_final", "wait_for_everyone", "wait_for_everyone", "end_training"], calls
    assert (tmp_path / "out" / "adapter").is_dir()
