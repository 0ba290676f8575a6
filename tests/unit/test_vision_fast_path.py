"""The ViT's plain-torch block path (vision_blocks.py) against megatron's module stack, and its grid tables built on
the host without a device sync.

One rank (one spawned process, fp32 on the CPU), a 4-block ViT with DeepStack taps at blocks 1 and 3, on the same
weights: "torch_exact" (megatron's op order replayed) must give bit-identical merged and DeepStack features and
bit-identical gradients of every parameter; "torch" (bias fused into the GEMM, the default at TP=1) must agree to
1e-6 relative. Images, a video and a mix of both; no recompute, full recompute (uniform 1 and 2, block) and
selective recompute; LoRA adapters (with dropout) on every ViT linear.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from qwenvl_mcore.testing.dist import run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
GRIDS = {
    "images": [[1, 4, 6], [1, 10, 12]],
    "video": [[3, 4, 4]],
    "mixed": [[1, 4, 6], [2, 6, 4], [1, 2, 2]],
}
RECOMPUTE = {
    "none": {},
    "full_uniform1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full_uniform2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full_block2": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    "selective": dict(recompute_granularity="selective"),
}
DEPTH, TAPS = 4, [1, 3]  # taps at the ends of the uniform-2 groups: megatron's block returns them there too


def _build(args, layout, recompute: dict, state: dict | None):
    from qwenvl_mcore.models.qwen3_vl_moe.config import vision_transformer_config
    from qwenvl_mcore.models.qwen3_vl_moe.vision import VisionModel

    torch.manual_seed(0)
    model = VisionModel(args, vision_transformer_config(args, layout, **recompute))
    with torch.no_grad():
        if state is None:  # every weight and bias random (megatron zero-inits biases), norm scales around 1
            g = torch.Generator().manual_seed(3)
            for name, p in model.named_parameters():
                offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + offset)
        else:
            model.load_state_dict(state)
    return model.train()


def _add_lora(model) -> None:
    """Adapters (rank 4, dropout 0.1) on every ViT linear, A and B random so they change the output."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from qwenvl_mcore.lora.layers import enable_lora

    g = torch.Generator().manual_seed(5)
    for name, module in list(model.named_modules()):
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            continue
        enable_lora(module, rank=4, scale=0.5, dropout=0.1)
        if isinstance(module, ColumnParallelLinear):
            module.add_adapter("t", module.weight.shape[0])
        else:
            module.add_adapter("t")
        with torch.no_grad():
            for p in (module.lora_A["t"], module.lora_B["t"]):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _attend_counter(model) -> list[int]:
    """Counts calls of block 0's core attention kernel path (`SDPAttention._attend`): 2 per step under recompute."""
    core = model.decoder.layers[0].self_attention.core_attention
    calls = [0]
    original = core._attend

    def counted(*a, **k):
        calls[0] += 1
        return original(*a, **k)

    core._attend = counted
    return calls


def _step(model, impl: str, pixels, grid, seed: int = 11):
    """Outputs and every parameter's gradient of one forward/backward with `impl`; also how often block 0's
    megatron module ran and how often its core attention computed."""
    model.block_impl = impl
    model.zero_grad(set_to_none=True)
    layer_calls = [0]
    hook = model.decoder.layers[0].register_forward_hook(lambda *_: layer_calls.__setitem__(0, layer_calls[0] + 1))
    attend = _attend_counter(model)
    torch.manual_seed(seed)  # the LoRA dropout masks
    try:
        merged, deep = model(pixels, grid)
        outs = [merged, *deep]
        gen = torch.Generator().manual_seed(seed)
        sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs).backward()
    finally:
        hook.remove()
        del model.decoder.layers[0].self_attention.core_attention._attend
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"outs": [o.detach().clone() for o in outs], "grads": grads, "layer_calls": layer_calls[0],
            "attend_calls": attend[0], "n_params": sum(1 for p in model.parameters() if p.requires_grad)}


def _compare(a: dict, b: dict) -> dict:
    from qwenvl_mcore.testing.parity import worst_relative

    same_names = set(a["grads"]) == set(b["grads"]) and len(a["grads"]) == a["n_params"]
    outs = {str(i): o for i, o in enumerate(a["outs"])}
    ref_outs = {str(i): o for i, o in enumerate(b["outs"])}
    return {
        "same_grad_names": same_names,
        "n_outs": (len(a["outs"]), len(b["outs"])),
        "outs_equal": all(torch.equal(x, y) for x, y in zip(a["outs"], b["outs"])),
        "grads_equal": same_names and all(torch.equal(a["grads"][n], b["grads"][n]) for n in b["grads"]),
        "outs_rel": worst_relative(outs, ref_outs)[0],
        "grads_rel": worst_relative(a["grads"], b["grads"])[0] if same_names else float("inf"),
        "calls": {"layer": (a["layer_calls"], b["layer_calls"]), "attend": (a["attend_calls"], b["attend_calls"])},
    }


def _checks(rank: int, world_size: int) -> dict:
    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config
    from qwenvl_mcore.parallel import ParallelLayout, init_distributed
    from qwenvl_mcore.testing.tiny import tiny_hf_config

    layout = ParallelLayout()
    init_distributed(layout)
    args = args_from_hf_config(tiny_hf_config(vision={"depth": DEPTH, "deepstack_visual_indexes": TAPS}))
    base = _build(args, layout, {}, None)
    state = base.state_dict()
    gen = torch.Generator().manual_seed(7)
    res = {"impl_auto": base.blocks_impl()}

    def pixels_for(grids):
        n = sum(t * h * w for t, h, w in grids)
        return torch.randn(n, base.patch_dim, generator=gen)

    for rname, recompute in RECOMPUTE.items():
        model = base if not recompute else _build(args, layout, recompute, state)
        for gname, grids in GRIDS.items():
            if rname != "none" and gname != "mixed":
                continue
            pixels, grid = pixels_for(grids), torch.tensor(grids)
            # megatron's block cannot run the ViT under full recompute (its checkpoint saves tensors only and the
            # ViT's attention context is not one): full recompute is compared with megatron's path without it
            ref = _step(base if rname.startswith("full") else model, "megatron", pixels, grid)
            for impl in ("torch_exact", "torch"):
                res[(impl, rname, gname)] = _compare(_step(model, impl, pixels, grid), ref)

    # LoRA adapters with dropout on every ViT linear (blocks and mergers)
    lora = _build(args, layout, {}, state)
    _add_lora(lora)
    grids = GRIDS["mixed"]
    pixels, grid = pixels_for(grids), torch.tensor(grids)
    ref = _step(lora, "megatron", pixels, grid)
    for impl in ("torch_exact", "torch"):
        res[(impl, "lora", "mixed")] = _compare(_step(lora, impl, pixels, grid), ref)

    # Taps inside a uniform recompute group (megatron's block would drop them): the plain path still returns
    # each tap, equal to the no-recompute run.
    args_mid = args_from_hf_config(tiny_hf_config(vision={"depth": DEPTH, "deepstack_visual_indexes": [0, 2]}))
    plain = _build(args_mid, layout, {}, state)
    grouped = _build(args_mid, layout, RECOMPUTE["full_uniform2"] | {"recompute_num_layers": 3}, state)
    res["mid_group_taps"] = _compare(_step(grouped, "torch_exact", pixels, grid),
                                     _step(plain, "torch_exact", pixels, grid))

    # An unsupported config: "auto" keeps megatron's stack, "torch" names the problem.
    odd = _build(args, layout, {"fp32_residual_connection": True}, state)
    res["odd_auto"] = odd.blocks_impl()
    odd.block_impl = "torch"
    try:
        odd.blocks_impl()
        res["odd_error"] = None
    except ValueError as e:
        res["odd_error"] = str(e)
    return res


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_checks, 1)[0]


CASES = [(r, g) for r in RECOMPUTE for g in GRIDS if r == "none" or g == "mixed"] + [("lora", "mixed")]


def _assert_common(c: dict, recompute: str) -> None:
    assert c["same_grad_names"] and c["n_outs"] == (3, 3)  # merged + 2 DeepStack features, every parameter
    # the plain path never calls megatron's layer module; block 0's attention is computed once, twice when
    # recomputed (full: the layer again; selective: the core attention again; megatron's reference runs full
    # recompute without it, see _checks)
    assert c["calls"]["layer"] == (0, 1)
    expected = {"none": (1, 1), "lora": (1, 1), "selective": (2, 2)}.get(recompute, (2, 1))
    assert c["calls"]["attend"] == expected, c["calls"]


@pytest.mark.parametrize("recompute,grids", CASES)
def test_torch_exact_is_bit_identical_to_megatron(results, recompute, grids):
    """megatron's op order on plain ops: merged and DeepStack features and every parameter gradient bit-equal to
    megatron's TransformerLayer / PatchMerger path."""
    c = results[("torch_exact", recompute, grids)]
    _assert_common(c, recompute)
    assert c["outs_equal"] and c["grads_equal"], (c["outs_rel"], c["grads_rel"])


@pytest.mark.parametrize("recompute,grids", CASES)
def test_torch_fused_bias_matches_megatron(results, recompute, grids):
    """The default TP=1 path (bias inside the GEMM): features and every gradient within 1e-6 relative."""
    c = results[("torch", recompute, grids)]
    _assert_common(c, recompute)
    assert c["outs_rel"] <= 1e-6 and c["grads_rel"] <= 1e-6, (c["outs_rel"], c["grads_rel"])
    if recompute == "lora":  # adapted linears keep megatron's op order in both variants
        assert c["outs_equal"] and c["grads_equal"]


def test_plain_path_returns_taps_inside_recompute_groups(results):
    c = results["mid_group_taps"]
    assert c["n_outs"] == (3, 3) and c["outs_equal"] and c["grads_equal"]


def test_auto_picks_the_plain_path_at_tp1_and_megatron_where_unsupported(results):
    assert results["impl_auto"] == "torch"
    assert results["odd_auto"] == "megatron"
    assert "fp32_residual_connection" in results["odd_error"] and "block_impl='auto'" in results["odd_error"]


def _sync_checks(rank: int, world_size: int) -> dict:
    sys.path.insert(0, str(ROOT / "tools" / "bench"))
    from host_overhead import SyncCounter

    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config
    from qwenvl_mcore.parallel import ParallelLayout, init_distributed
    from qwenvl_mcore.testing.tiny import tiny_hf_config

    layout = ParallelLayout()
    init_distributed(layout)
    args = args_from_hf_config(tiny_hf_config())
    model = _build(args, layout, {}, None)
    grids = GRIDS["mixed"]
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), model.patch_dim)
    res = {}
    for impl in ("torch", "megatron"):
        for where in ("host tensor", "list", "device tensor"):
            grid = torch.tensor(grids) if where != "list" else [tuple(g) for g in grids]
            host = [grid] if where == "host tensor" else []
            with SyncCounter(host=host) as counter:
                step = _step(model, impl, pixels, grid)
            res[(impl, where)] = {"syncs": dict(counter.syncs), "sites": dict(counter.sites), "step": step}
    return res


@pytest.fixture(scope="module")
def syncs():
    return run_on_ranks(_sync_checks, 1)[0]


@pytest.mark.parametrize("impl", ["torch", "megatron"])
def test_host_grid_costs_no_sync_and_gives_the_same_numbers(syncs, impl):
    """With the grid on the host (a CPU tensor or a list) the ViT's forward and backward issue no host sync (as
    tools/bench/host_overhead.py counts them); a grid on the device is read back exactly once; all three give
    bit-identical features and gradients."""
    host, listed, device = (syncs[(impl, w)] for w in ("host tensor", "list", "device tensor"))
    assert host["syncs"] == {} and listed["syncs"] == {}, (host["sites"], listed["sites"])
    assert device["syncs"] == {"tolist": 1}, device["sites"]
    assert all("vision.py" in site for site in device["sites"])
    for other in (listed, device):
        assert all(torch.equal(a, b) for a, b in zip(host["step"]["outs"], other["step"]["outs"]))
        assert host["step"]["grads"].keys() == other["step"]["grads"].keys()
        assert all(torch.equal(host["step"]["grads"][n], other["step"]["grads"][n]) for n in host["step"]["grads"])
