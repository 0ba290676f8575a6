"""LoRA settings (qwenvl_mcore.lora.config, the `peft` config group) and the experts' adapters on their grouped
GEMM path against a hand-written per-expert reference (merged weights W + scale * A @ B, peft's formula)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qwenvl_mcore.lora.config import GROUPS, TARGETS, LoRAConfig, LoRAConfigError, resolve_targets


def test_groups_expand_and_router_is_not_in_all():
    assert resolve_targets(["all"]) == frozenset(TARGETS) - {"router"}
    assert resolve_targets(["attention", "router"]) == frozenset({"q", "k", "v", "o", "router"})
    assert resolve_targets("experts") == frozenset({"experts_gate_up", "experts_down"})
    assert set(GROUPS["all"]) | {"router"} == set(TARGETS)


@pytest.mark.parametrize("names,needle", [
    (["q", "qq"], "unknown name(s) ['qq']"),
    (["gate"], "target them together as experts_gate_up"),
    ([], "peft.targets is empty"),
])
def test_unknown_or_empty_targets_name_the_valid_ones(names, needle):
    with pytest.raises(LoRAConfigError) as e:
        resolve_targets(names)
    message = str(e.value)
    assert needle in message
    assert all(t in message for t in TARGETS) and all(g in message for g in GROUPS)


def test_settings_checked():
    assert LoRAConfig(method="lora", rank=16, alpha=32).scale == 2.0
    assert LoRAConfig(method="lora", rank=16, alpha=32, rslora=True).scale == 8.0
    cases = [
        (dict(method="qlora"), "peft.method='qlora'"),
        (dict(method="lora", rank=0), "peft.rank=0"),
        (dict(method="lora", alpha=float("nan")), "peft.alpha=nan"),
        (dict(method="lora", dropout=1.0), "peft.dropout=1.0"),
        (dict(method="lora", dropout=0.1, targets=["experts"]), "take no dropout"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(LoRAConfigError) as e:
            LoRAConfig(**kwargs).validate()
        assert needle in str(e.value), (kwargs, str(e.value))
    LoRAConfig(method="lora", dropout=0.1, targets=["attention", "vit"]).validate()  # apply_lora: tp=1 only
    LoRAConfig(method="none", targets=[]).validate()  # off: the targets are not looked at


def test_config_group_off_by_default_and_lora_needs_a_base():
    from qwenvl_mcore.training.config import ConfigError, compose

    assert compose([]).peft.method == "none"
    with pytest.raises(ConfigError, match=r"peft=lora trains adapters on a frozen base: set model.init_from="):
        compose(["peft=lora"])
    base = "model.init_from=/some/base"
    assert compose(["peft=lora", base]).peft.method == "lora"
    with pytest.raises(ConfigError, match=r"unknown name\(s\) \['up'\]"):
        compose(["peft=lora", base, "peft.targets=[q,up]"])
    with pytest.raises(ConfigError, match=r"model.freeze_vision=true with peft=lora: .*peft.targets choose"):
        compose(["peft=lora", base, "model.freeze_vision=true"])
    with pytest.raises(ConfigError, match=r"peft.dropout=0.1 needs parallel.tp=1"):
        compose(["peft=lora", base, "peft.dropout=0.1", "peft.targets=[attention]", "parallel.tp=2"])


# -- experts -----------------------------------------------------------------------------------------------------


class _Group(SimpleNamespace):
    def size(self):
        return 1

    def rank(self):
        return 0


def _lora_experts(num_experts=5, hidden=16, ffn=8, rank=3, scale=1.5):
    from qwenvl_mcore.lora.layers import enable_lora
    from qwenvl_mcore.models.qwen3_vl_moe.layers import GroupedExperts

    config = SimpleNamespace(
        moe_ffn_hidden_size=ffn, hidden_size=hidden, use_cpu_initialization=True, params_dtype=torch.float32,
        perform_initialization=True, init_method=lambda t: torch.nn.init.normal_(t, std=0.2),
        output_layer_init_method=lambda t: torch.nn.init.normal_(t, std=0.2), activation_func=F.silu,
    )
    layer = GroupedExperts(num_experts, config, pg_collection=SimpleNamespace(ep=_Group(), expt_tp=_Group(),
                                                                              expt_dp=_Group()))
    enable_lora(layer, rank=rank, scale=scale, dropout=0.0)
    layer.add_adapter("experts_gate_up")
    layer.add_adapter("experts_down")
    with torch.no_grad():
        for p in (*layer.lora_A.values(), *layer.lora_B.values()):
            p.normal_(0, 0.3)  # B non-zero
    return layer


@pytest.mark.parametrize("rank", [4, 3])
def test_expert_adapters_grouped_gemm_equals_loop_and_merged_reference(rank):
    """One adapter per expert on each fused tensor: the grouped GEMM path (torch's grouped_mm) and the per-expert
    loop give the same output and gradients, and both equal each expert computed with merged weights
    W + scale * A_e @ B_e (gate half first), as peft's target_parameters applies them. Rank 3 (12-byte rows,
    which grouped_mm refuses) takes the loop for the adapters and gives the same numbers."""
    torch.manual_seed(0)
    layer = _lora_experts(rank=rank)
    counts = torch.tensor([3, 0, 7, 1, 4])
    hidden = torch.randn(15, 16, requires_grad=True)
    probs = torch.rand(15)
    params = (hidden, *layer.lora_A.values(), *layer.lora_B.values())
    outs, grads = [], []
    for grouped in (True, False):
        layer.grouped_gemm = grouped
        out, _ = layer(hidden, counts, probs)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), params))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    s, e_n, h, f = layer.lora_scale, 5, 16, 8
    a1, b1 = layer.lora_A["experts_gate_up"], layer.lora_B["experts_gate_up"]
    a2, b2 = layer.lora_A["experts_down"], layer.lora_B["experts_down"]
    rows, start = [], 0
    for e, c in enumerate(counts.tolist()):
        x = hidden[start:start + c]
        w1 = layer.weight1[e].reshape(h, 2 * f) + s * a1[e] @ b1[e].reshape(-1, 2 * f)
        w2 = layer.weight2[e] + s * a2[e] @ b2[e]
        gate, up = (x @ w1).split(f, dim=-1)
        rows.append((F.silu(gate) * up) @ w2 * probs[start:start + c, None])
        start += c
    ref = torch.cat(rows)
    torch.testing.assert_close(outs[0], ref, rtol=1e-5, atol=1e-5)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(grads[0], ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_expert_adapter_shapes_and_sharding_attributes():
    """Adapters laid out like the experts' weights: EP splits dim 0 of all four (by name), expert-TP the F dim of
    gate_up's B and down's A (marked only when expert-TP > 1); all reduced over expert-DP (allreduce=False)."""
    layer = _lora_experts(num_experts=4, hidden=12, ffn=6, rank=2)
    shapes = {k: tuple(p.shape) for k, p in layer.lora_A.items()} | {
        "B." + k: tuple(p.shape) for k, p in layer.lora_B.items()}
    assert shapes == {"experts_gate_up": (4, 12, 2), "experts_down": (4, 6, 2),
                      "B.experts_gate_up": (4, 2, 2, 6), "B.experts_down": (4, 2, 12)}
    for p in (*layer.lora_A.values(), *layer.lora_B.values()):
        assert p.allreduce is False and p.tensor_model_parallel is False and p.lora is True
    assert math.isclose(layer.lora_scale, 1.5)


def test_peft_layout_round_trip():
    """to_peft_layout and from_peft_layout are inverse for every kind (experts' expert-major A / expert-minor B,
    the ViT's fused qkv B reordered per head), and peft's expert B columns are r-major, expert-minor."""
    from qwenvl_mcore.lora.peft_io import from_peft_layout, to_peft_layout
    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config
    from qwenvl_mcore.testing import tiny

    args = args_from_hf_config(tiny.tiny_hf_config())
    g = torch.Generator().manual_seed(0)
    e, r, h, f = 8, 3, 48, 40
    v = args.vision
    cases = [("experts_gate_up", "A", (e, h, r)), ("experts_gate_up", "B", (e, r, 2, f)),
             ("experts_down", "A", (e, f, r)), ("experts_down", "B", (e, r, h)),
             ("vit_qkv", "B", (3 * v.hidden_size, r)), ("q", "B", (64, r))]
    for kind, ab, shape in cases:
        t = torch.randn(shape, generator=g)
        peft = to_peft_layout(kind, ab, t, args)
        assert torch.equal(from_peft_layout(kind, ab, peft, args, shape), t), (kind, ab)
    b = torch.randn(e, r, 2, f, generator=g)
    peft_b = to_peft_layout("experts_gate_up", "B", b, args)
    assert peft_b.shape == (2 * f, r * e)
    # peft: B.view(out, r, E)[:, j, e] is expert e's column j
    assert torch.equal(peft_b.view(2 * f, r, e)[:, 1, 5], b[5, 1].reshape(-1))
    a = torch.randn(e, h, r, generator=g)
    assert torch.equal(to_peft_layout("experts_gate_up", "A", a, args).view(e, r, h)[5, 1], a[5, :, 1])
