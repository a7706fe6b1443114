"""Training pictures: the spectrum and routing numbers behind the plots, and the files a run writes."""

from __future__ import annotations

import json

import pytest
import torch

from mtlora import inject
from mtlora.base import load_base_model
from mtlora.config import AdapterConfig
from mtlora.errors import CheckpointError
from mtlora_train import plots, state


def test_expert_spectra_are_the_singular_values_of_each_expert():
    b = torch.zeros(2, 6, 3)                             # [N, d_out, r]
    b[0, 0, 0], b[0, 1, 1], b[0, 2, 2] = 3.0, 2.0, 1.0   # diagonal: singular values 3, 2, 1
    b[1] = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    spectra = plots.expert_spectra({"layers.0.mlp.lora_B": b, "layers.0.mlp.lora_A": torch.ones(3, 4)})
    assert list(spectra) == ["layers.0.mlp"]
    torch.testing.assert_close(spectra["layers.0.mlp"][0], torch.tensor([3.0, 2.0, 1.0]))
    torch.testing.assert_close(spectra["layers.0.mlp"][1], torch.linalg.svdvals(b[1]))


def test_routing_usage_is_the_masked_mean_of_the_router_softmax(tiny_model_dir):
    model = load_base_model(tiny_model_dir, torch.float32)
    cfg = AdapterConfig(method="mtlora", placement="ffn", rank=4, num_experts=3, routing_group_size=32)
    adapters = inject.attach(model, cfg)
    for a in adapters.values():
        torch.nn.init.normal_(a.router, std=0.5, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0                                      # padding must not count
    usage = plots.routing_usage(model, adapters, [{"input_ids": ids, "attention_mask": mask}])
    name, adapter = next(iter(adapters.items()))
    captured = {}
    hook = adapter.register_forward_pre_hook(lambda mod, args: captured.setdefault("z", args[0].detach()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    hook.remove()
    w = adapter.route(captured["z"])                     # [B, T, g, N]
    keep = mask.bool()
    want = w[keep].mean(dim=(0, 1))                      # tokens x groups -> [N]
    torch.testing.assert_close(usage[name], want, atol=1e-6, rtol=0)
    assert abs(float(usage[name].sum()) - 1.0) < 1e-5 and adapter.last_routing is None


def test_a_training_run_writes_its_plots(tiny_model_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="the train extra's matplotlib draws the plots")
    from mtlora_train.config import TrainConfig
    from mtlora_train.recipe import MtloraRecipe

    rows = [{"instruction": "Repeat", "input": w, "output": w, "task_type": "r"} for w in ("ab", "cd", "ef", "gh")]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = TrainConfig(method="mtlora", model_name_or_path=str(tiny_model_dir), dataset_dir=str(tmp_path / "data"),
                      output_dir=str(tmp_path / "out"), lora_rank=4, lora_nums=3, enable_block_adapter=True,
                      block_adapter_type="ffn", per_device_train_batch_size=2, max_steps=2, save_steps=1,
                      enable_blc=True, learning_rate=1e-2, data_cache_dir=str(tmp_path / "cache"))
    recipe = MtloraRecipe(cfg).setup()
    recipe.train()
    out = tmp_path / "out"
    for name in ("loss.png", "spectrum.png", "routing.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    assert plots.main([str(out)]) == 0                    # the CLI redraws them from the files

    # --routing rebuilds the run from its saved config: the same numbers as the trained model in memory
    live = recipe.routing_usage()
    assert state.run_config(out) == cfg.to_dict()
    (out / state.TRAIN_CONFIG_FILE).unlink()              # an older run: the config inside its newest checkpoint
    assert state.run_config(out) == cfg.to_dict()
    rebuilt = plots.run_routing_usage(out)
    assert list(rebuilt) == list(live)
    for site in live:
        torch.testing.assert_close(rebuilt[site], live[site], atol=1e-6, rtol=0)
    (out / "routing.png").unlink()
    assert plots.main([str(out), "--routing"]) == 0 and (out / "routing.png").is_file()


def test_plots_cli_names_a_folder_that_is_not_a_training_run(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="not an mtlora-train output folder"):
        state.run_config(tmp_path)
    assert plots.main([str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
