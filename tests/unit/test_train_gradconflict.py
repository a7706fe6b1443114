"""Gradient-conflict analysis (`mtlora-train gradient-conflict`) on a tiny random model and a synthetic mixture."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from mtlora import inject
from mtlora.base import load_base_model, load_tokenizer
from mtlora.testing import make_tiny_model_dir
from mtlora_train import gradconflict as gc
from mtlora_train.cli import main as train_main

TASKS = {"upper": ("Write the word in capitals", str.upper), "reverse": ("Write it backwards", lambda w: w[::-1]),
         "first": ("Give the first letter", lambda w: w[0])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gc")
    rng = random.Random(0)
    rows = []
    for _ in range(8):
        for task, (instruction, fn) in TASKS.items():
            word = "".join(rng.choice("abcdefgh") for _ in range(4))
            rows.append({"instruction": instruction, "input": word, "output": fn(word), "task_type": task})
    (root / "data").mkdir()
    (root / "data" / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return make_tiny_model_dir(root / "model"), root / "data", root


def test_conflict_stats_by_hand():
    c = torch.tensor([[1.0, 0.5, -0.2], [0.5, 1.0, -0.6], [-0.2, -0.6, 1.0]])
    s = gc.conflict_stats(c)
    assert s["pairs"] == 3
    assert s["mean_similarity"] == pytest.approx((0.5 - 0.2 - 0.6) / 3)
    assert s["conflict_share"] == pytest.approx(2 / 3)
    assert s["conflict_magnitude"] == pytest.approx((0.2 + 0.6) / 3)
    red = gc.reductions({"hydralora": {"mean_similarity": 0.4, "conflict_share": 0.5, "conflict_magnitude": 0.2,
                                       "mean_abs_similarity": 0.5},
                         "block": {"mean_similarity": 0.1, "conflict_share": 0.25, "conflict_magnitude": 0.2,
                                   "mean_abs_similarity": 0.25}})
    assert red["block_vs_hydralora"]["mean_similarity"] == pytest.approx(0.75)
    assert red["block_vs_hydralora"]["conflict_magnitude"] == pytest.approx(0.0)


def test_cosine_matrix_equals_cosine_of_concatenated_gradients():
    torch.manual_seed(0)
    grads = {t: {0: torch.randn(7), 1: torch.randn(5)} for t in "abcd"}
    tasks, c, per_layer = gc.cosine_matrix(grads)
    flat = {t: torch.cat([g[0], g[1]]).double() for t, g in grads.items()}
    for i, s in enumerate(tasks):
        for j, t in enumerate(tasks):
            want = torch.dot(flat[s], flat[t]) / (flat[s].norm() * flat[t].norm())
            assert c[i, j].item() == pytest.approx(want.item(), abs=1e-12)
            want0 = torch.dot(grads[s][0].double(), grads[t][0].double()) / (grads[s][0].norm() * grads[t][0].norm())
            assert per_layer[0, i, j].item() == pytest.approx(want0.item(), abs=1e-6)


def test_task_gradient_equals_autograd_of_the_task_loss(setup):
    model_dir, data, _ = setup
    model, tok = load_base_model(model_dir), load_tokenizer(model_dir)
    model.requires_grad_(False)
    cfg = gc.ConflictConfig(arms=["hydralora"], lora_rank=4, lora_nums=2)
    torch.manual_seed(0)
    adapters = inject.attach(model, gc._arm_config(cfg, "hydralora"))
    for a in adapters.values():
        a.requires_grad_(True)
        torch.nn.init.normal_(a.lora_B, std=0.1)          # B != 0 so A and router get gradients too
    from mtlora_train.data import load_dataset

    ds = load_dataset(str(data), tok, 64, "qa", str(setup[2] / "cache"))
    batches = gc.task_batches(ds, ["upper", "first"], 2, 3, seed=1, pad_id=0)
    grads = gc.task_gradients(model, adapters, batches, progress=False)
    params = [p for a in adapters.values() for p in a.parameters()]
    loss = sum(model(**b).loss for b in batches["first"]) / 2
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    got = torch.cat([grads["first"][layer] for layer in sorted(grads["first"])])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in params)


def test_command_writes_json_and_plot(setup, capsys):
    model_dir, data, root = setup
    out = root / "out"
    rc = train_main(["gradient-conflict", "--model_name_or_path", str(model_dir), "--dataset_dir", str(data),
                     "--output_dir", str(out), "--arms", "lora,hydralora,block", "--lora_rank", "4",
                     "--lora_nums", "2", "--batches_per_task", "2", "--batch_size", "2", "--max_seq_length", "64",
                     "--data_cache_dir", str(root / "cache")])
    assert rc == 0
    result = json.loads((out / "gradient_conflict.json").read_text())
    assert (out / "gradient_conflict.png").stat().st_size > 0
    assert result["tasks"] == sorted(TASKS)
    for arm, r in result["arms"].items():
        c = torch.tensor(r["similarity_matrix"])
        torch.testing.assert_close(c, c.T)
        torch.testing.assert_close(torch.diagonal(c), torch.ones(3, dtype=c.dtype))
        assert len(r["per_layer_mean_similarity"]) == 2
        assert not math.isnan(r["stats"]["mean_similarity"])
    assert set(result["reductions"]) == {"block_vs_lora", "block_vs_hydralora"}
    assert "block_vs_hydralora" in capsys.readouterr().out


def test_unknown_arm_is_a_clear_error(capsys):
    assert train_main(["gradient-conflict", "--arms", "lora,nope"]) == 2
    assert "unknown arm 'nope'" in capsys.readouterr().err


def test_shared_pass_equals_attached_gradients(setup):
    """At initialisation (B = 0) one bare pass with hooks gives every arm's gradients exactly."""
    model_dir, data, root = setup
    model, tok = load_base_model(model_dir), load_tokenizer(model_dir)
    model.requires_grad_(False)
    from mtlora_train.data import load_dataset

    ds = load_dataset(str(data), tok, 64, "qa", str(root / "cache"))
    batches = gc.task_batches(ds, ["upper", "reverse"], 2, 3, seed=2, pad_id=0)
    cfg = gc.ConflictConfig(lora_rank=4, lora_nums=2)
    arms = {"lora": "lora", "hydralora": "hydralora", "block": "block"}
    attached, detached = {}, {}
    for arm in arms:
        torch.manual_seed(5)
        adapters = inject.attach(model, gc._arm_config(cfg, arm))
        for a in adapters.values():
            a.requires_grad_(True)
        attached[arm] = gc.task_gradients(model, adapters, batches, progress=False)
        inject.detach(model)
        detached[arm] = adapters
    shared = gc.init_task_gradients(model, detached, batches, progress=False)
    for arm in arms:
        for task in batches:
            for layer, g in attached[arm][task].items():
                assert float(g.abs().sum()) > 0
                torch.testing.assert_close(shared[arm][task][layer], g, rtol=1e-4, atol=1e-8)
    with torch.no_grad():
        next(iter(detached["block"].values())).lora_B.add_(1.0)
    with pytest.raises(Exception, match="initialisation"):
        gc.init_task_gradients(model, {"block": detached["block"]}, batches, progress=False)
