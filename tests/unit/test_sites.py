"""The adapter sites, defined once (`mtlora.sites`), against transformers' own LLaMA modules, and the grouped
fast path (`mtlora.grouped`, shared by the engine and the vLLM backend) against the MoLoRA oracle."""

from __future__ import annotations

import pytest
import torch

from mtlora import grouped, sites
from mtlora.adapters import MoLoRA
from mtlora.config import AdapterConfig
from mtlora.errors import ConfigError
from mtlora.testing import tiny_llama_model


@pytest.mark.parametrize("overrides", [{}, dict(num_key_value_heads=1, head_dim=24)])
def test_site_dims_are_the_transformers_module_shapes(overrides):
    model = tiny_llama_model(**overrides)
    layer = model.model.layers[0]
    for s in sites.SITES:
        d_in, d_out = sites.site_dims(model.config, s.name)
        if s.module is not None:                       # component level: the projection's own shape
            proj = layer.get_submodule(s.name)
            assert (proj.in_features, proj.out_features) == (d_in, d_out), s.name
            assert s.block == s.name.split(".")[0]
        else:                                          # block level: parallel to a sub-block, hidden -> hidden
            assert (d_in, d_out) == (model.config.hidden_size, model.config.hidden_size)


def test_fused_columns_tile_the_fused_projection():
    model = tiny_llama_model(num_key_value_heads=1)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for fused, parts in (("qkv", (attn.q_proj, attn.k_proj, attn.v_proj)), ("gate_up", (mlp.gate_proj, mlp.up_proj))):
        cols = sites.fused_columns(model.config, fused)
        assert [c.site.rsplit(".", 1)[1] for c in cols] == list(sites.FUSED[fused])
        assert [c.start for c in cols] == [0] + [sum(p.out_features for p in parts[:i]) for i in range(1, len(parts))]
        assert [c.width for c in cols] == [p.out_features for p in parts]
    with pytest.raises(ConfigError, match="unknown fused"):
        sites.fused_columns(model.config, "qkvo")


def test_config_sites_come_from_the_site_table():
    cfg = AdapterConfig(method="lora", target_modules=list(sites.LINEAR_MODULES))
    assert cfg.sites() == [s.name for s in sites.SITES if s.module is not None]
    assert AdapterConfig(method="mtlora", placement="both").sites() == ["self_attn", "mlp"]
    with pytest.raises(ConfigError) as err:
        sites.site_dims(tiny_llama_model().config, "mlp.act_fn")
    assert err.value.field == "site"


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_grouped_pack_of_several_sites_equals_molora(dtype, tol):
    """Three sites sharing one input (N = 4 with 3 routing groups, N = 2 with one group, plain LoRA) in one pack:
    one shrink matmul, each site's expand == its MoLoRA module (fp32 1e-5)."""
    torch.manual_seed(0)
    configs = [AdapterConfig(method="mtlora", rank=8, alpha=16, num_experts=4, placement="ffn", routing_group_size=16),
               AdapterConfig(method="hydralora", rank=4, alpha=4, num_experts=2, target_modules=["up_proj"]),
               AdapterConfig(method="lora", rank=6, alpha=3, target_modules=["q_proj"])]
    mods = [MoLoRA(48, d_out, c).eval() for c, d_out in zip(configs, (48, 96, 32))]
    for m in mods:
        with torch.no_grad():
            m.lora_B.normal_(0, 0.5)
    p = grouped.pack([grouped.SiteWeights.from_native(m.lora_A.to(dtype), m.lora_B.to(dtype),
                                                      None if m.router is None else m.router.to(dtype), m.scaling)
                      for m in mods])
    assert p.W.shape == (8 + 3 * 4 + 4 + 2 + 6, 48)
    x = torch.randn(13, 48)
    hz = grouped.shrink(x, p)
    for m, part in zip(mods, p.parts):
        delta, w = grouped.expand(hz, part)
        want = m(x)
        assert want.abs().max() > 1e-2
        torch.testing.assert_close(delta.float(), want, atol=tol, rtol=tol)
        if m.router is None:
            assert w is None
        else:
            torch.testing.assert_close(w, m.route(x), atol=tol, rtol=tol)
