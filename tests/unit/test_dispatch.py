"""The EP=1 token dispatcher (dispatch.LocalTokenDispatcher) against megatron's allgather dispatcher on the same MoE
layer and weights, fp32 on the CPU: permuted tokens, probabilities and counts bit for bit, layer outputs and every
gradient (input, router, experts, through the aux-loss gradient too) to 1e-6 relative; padding tokens (routed
nowhere, output 0); experts without tokens; the grouped GEMM (the GPU's path) and the loop; and no host sync, no
data-dependent size and no scatter-add / index-add (atomics on a GPU) anywhere in its forward and backward. The
router's own top-k (Qwen3VLRouter._plain_topk) against megatron's routing, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from qwenvl_mcore.models.qwen3_vl_moe.dispatch import plan_routes
from qwenvl_mcore.testing.dist import run_on_ranks

# (tokens, padding tokens at the end, seed): 3 tokens x top-2 of 8 experts leave at least 2 experts without tokens
CASES = {"plain": (40, 0, 1), "padding": (37, 9, 2), "few_tokens": (3, 0, 3), "few_tokens_padding": (4, 2, 4),
         "all_padding": (6, 6, 5)}

# what a GPU would resolve with atomics or a data-dependent size (host reads: testing.host_reads)
_SUSPECT_OPS = ("nonzero", "masked_select", "_local_scalar_dense", "bincount", "unique", "index_add", "scatter_add",
                "index_put", "masked_scatter", "equal", "is_nonzero", "repeat_interleave")


def _checks(rank: int, world: int) -> dict:
    from torch.utils._python_dispatch import TorchDispatchMode
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config, \
        language_transformer_config
    from qwenvl_mcore.models.qwen3_vl_moe.dispatch import LocalTokenDispatcher
    from qwenvl_mcore.models.qwen3_vl_moe.layers import GroupedExperts, Qwen3VLMoELayer, Qwen3VLRouter
    from qwenvl_mcore.models.qwen3_vl_moe.routing import MicroBatchRouting
    from qwenvl_mcore.parallel import ParallelLayout, init_distributed
    from qwenvl_mcore.testing.host_reads import HostReads

    init_distributed(ParallelLayout(), seed=1, timeout_s=120)
    args = args_from_hf_config(flavor_hf_config("debug"))
    k, num_experts = args.text.num_experts_per_tok, args.text.num_experts

    def build(local: bool, **overrides):
        config = language_transformer_config(args, ParallelLayout(), moe_local_dispatcher=local, **overrides)
        layer = Qwen3VLMoELayer(config, submodules=MoESubmodules(experts=GroupedExperts, router=Qwen3VLRouter),
                                layer_number=1)
        layer.set_layer_number(1)  # what TransformerLayer does; the router records under it
        return layer.train()

    local, megatron = build(True), build(False)
    # megatron's MoE recompute (the layer's forward again in its backward): the dispatcher's state is per forward
    recomputed = build(True, recompute_granularity="selective", recompute_modules=["moe"])
    assert recomputed.moe_layer_recompute
    out: dict = {"local_type": type(local.token_dispatcher).__name__,
                 "megatron_type": type(megatron.token_dispatcher).__name__,
                 "local_padding_routed": local.router.padding_routed,
                 "megatron_padding_routed": megatron.router.padding_routed}
    assert isinstance(local.token_dispatcher, LocalTokenDispatcher)
    assert isinstance(megatron.token_dispatcher, MoEAllGatherTokenDispatcher)
    torch.manual_seed(0)
    with torch.no_grad():  # router weights large enough for clear top-k choices
        local.router.weight.normal_(0.0, 1.0)
    megatron.load_state_dict(local.state_dict())
    recomputed.load_state_dict(local.state_dict())

    class OpLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    def run(layer, hidden, pad, grad_out, *, aux: bool, grouped: bool | None, watch: bool = False):
        layer.experts.grouped_gemm = grouped
        layer.zero_grad(set_to_none=True)
        seen = {}

        def hook(module, inputs, output):
            seen["rows"], seen["counts"], seen["probs"] = (t.detach().clone() for t in inputs)

        handle = layer.experts.register_forward_hook(hook)
        x = hidden.clone().requires_grad_(True)
        record = MicroBatchRouting(num_experts, coeff_scale=0.5 if aux else 0.0)
        layer.router.routing_record = record
        ops, reads = OpLog(), HostReads()
        try:
            if watch:
                with ops, reads:
                    y, _ = layer(x, padding_mask=pad)
                    record.publish([1])
                    y.backward(grad_out)
            else:
                y, _ = layer(x, padding_mask=pad)
                record.publish([1])
                y.backward(grad_out)
        finally:
            handle.remove()
            layer.router.routing_record = None
        grads = {"input": x.grad, "router": layer.router.weight.grad, "weight1": layer.experts.weight1.grad,
                 "weight2": layer.experts.weight2.grad}
        return y.detach(), grads, seen, ops.ops, reads.reads

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    for name, (tokens, padding, seed) in CASES.items():
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(tokens, 1, args.text.hidden_size, generator=g)
        pad = torch.zeros(1, tokens, dtype=torch.bool)
        pad[0, tokens - padding:] = True
        grad_out = torch.randn(tokens, 1, args.text.hidden_size, generator=g)
        res = {}
        for aux in (False, True):
            want, want_grads, want_seen, _, _ = run(megatron, hidden, pad, grad_out, aux=aux, grouped=False)
            for grouped in (False, True):
                got, got_grads, seen, _, _ = run(local, hidden, pad, grad_out, aux=aux, grouped=grouped)
                key = f"aux{int(aux)}_grouped{int(grouped)}"
                n = int(want_seen["counts"].sum())
                res[key] = {
                    # int32 (the grouped GEMM's offset type), megatron's int64: the same values
                    "counts_equal": seen["counts"].dtype == torch.int32
                    and torch.equal(seen["counts"].long(), want_seen["counts"]),
                    "rows": tuple(seen["rows"].shape), "routed": n,
                    "rows_equal": torch.equal(seen["rows"][:n], want_seen["rows"]),
                    "probs_equal": torch.equal(seen["probs"][:n], want_seen["probs"]),
                    "unrouted_probs_zero": bool((seen["probs"][n:] == 0).all()),
                    "out_rel": rel(got, want),
                    "padding_out_zero": bool((got[tokens - padding:] == 0).all()),
                    "padding_grad_zero": bool((got_grads["input"][tokens - padding:] == 0).all()),
                    "grad_rel": {p: rel(got_grads[p], want_grads[p]) for p in want_grads},
                    "finite": bool(torch.isfinite(got).all()) and all(bool(torch.isfinite(v).all())
                                                                       for v in got_grads.values()),
                }
        got, got_grads, _, _, _ = run(recomputed, hidden, pad, grad_out, aux=True, grouped=True)
        want, want_grads, _, _, _ = run(local, hidden, pad, grad_out, aux=True, grouped=True)
        res["recompute_equal"] = torch.equal(got, want) and all(torch.equal(got_grads[p], want_grads[p])
                                                                 for p in want_grads)
        # the GPU's path: grouped GEMM, device counts; watch every op and host read of forward + backward
        _, _, _, ops, reads = run(local, hidden, pad, grad_out, aux=True, grouped=True, watch=True)
        res["suspect_ops"] = sorted({op for op in ops if any(s in op for s in _SUSPECT_OPS)})
        res["host_reads"] = reads
        _, _, _, ops, _ = run(megatron, hidden, pad, grad_out, aux=True, grouped=False, watch=True)
        res["megatron_suspect_ops"] = sorted({op for op in ops if any(s in op for s in _SUSPECT_OPS)})
        out[name] = res

    # the router's own top-k (Qwen3VLRouter._plain_topk, what both layers above ran) against megatron's routing:
    # probabilities, routing map and gradients (through the aux-loss gradient too) bit for bit
    out["plain_topk_reason"] = local.router.plain_topk_reason()
    router = local.router
    for name, (tokens, padding, seed) in CASES.items():
        g = torch.Generator().manual_seed(seed + 100)
        hidden = torch.randn(tokens, 1, args.text.hidden_size, generator=g)
        pad = torch.zeros(1, tokens, dtype=torch.bool)
        pad[0, tokens - padding:] = True
        grad_probs = torch.randn(tokens, num_experts, generator=g)
        got = {}
        for plain in (True, False):
            router._plain = plain
            router.zero_grad(set_to_none=True)
            x = hidden.clone().requires_grad_(True)
            record = MicroBatchRouting(num_experts, coeff_scale=0.5)
            router.routing_record = record
            probs, routing_map = router(x, padding_mask=pad)
            record.publish([1])
            probs.backward(grad_probs)
            router.routing_record = None
            got[plain] = (probs.detach(), routing_map, x.grad, router.weight.grad)
        router._plain = None
        out[f"router_{name}"] = [torch.equal(a, b) for a, b in zip(got[True], got[False])]
    return out


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_checks, 1)[0]


def test_ep1_layers_get_the_local_dispatcher(results):
    assert results["local_type"] == "LocalTokenDispatcher"
    assert results["megatron_type"] == "MoEAllGatherTokenDispatcher"
    assert results["local_padding_routed"] is False and results["megatron_padding_routed"] is False


@pytest.mark.parametrize("case", sorted(CASES))
def test_local_dispatcher_equals_megatron_allgather(results, case):
    """Same layer, same weights: the routed rows, probabilities and counts bit for bit; unrouted (padding) rows come
    last with probability 0; outputs and gradients to 1e-6; padding outputs and input gradients exactly 0."""
    tokens, padding, _ = CASES[case]
    k = 2
    for key in ("aux0_grouped0", "aux0_grouped1", "aux1_grouped0", "aux1_grouped1"):
        r = results[case][key]
        assert r["rows"][0] == tokens * k, (key, r["rows"])
        assert r["routed"] == (tokens - padding) * k, key
        assert r["counts_equal"] and r["rows_equal"] and r["probs_equal"] and r["unrouted_probs_zero"], (key, r)
        assert r["finite"], key
        assert r["out_rel"] <= 1e-6, (key, r["out_rel"])
        assert all(v <= 1e-6 for v in r["grad_rel"].values()), (key, r["grad_rel"])
        if padding:
            assert r["padding_out_zero"] and r["padding_grad_zero"], key


def test_experts_without_tokens_are_covered(results):
    """3 tokens x top-2 over 8 experts: some experts get no token (their offsets repeat); still equal."""
    r = results["few_tokens"]["aux1_grouped1"]
    assert r["routed"] == 6 and r["counts_equal"]


def test_no_host_sync_no_atomics_in_forward_and_backward(results):
    """The local dispatcher's layer (grouped GEMM, aux-loss gradient on): no host read, no data-dependent op, no
    scatter-add or index-add; megatron's allgather path on the same input has them (the check can fail)."""
    for case in CASES:
        assert results[case]["host_reads"] == [], (case, results[case]["host_reads"])
        assert results[case]["suspect_ops"] == [], (case, results[case]["suspect_ops"])
    assert any(results[case]["megatron_suspect_ops"] for case in CASES)


def test_plain_router_equals_megatron_routing(results):
    """Qwen3VLRouter's own top-k routing applies to Qwen3-VL's settings and gives megatron's probabilities, routing
    map and gradients bit for bit, with and without padding."""
    assert results["plain_topk_reason"] is None
    for name in CASES:
        assert results[f"router_{name}"] == [True] * 4, name


def test_plan_routes_orders_pairs_like_megatron():
    """plan_routes: expert-major order, tokens ascending within an expert (megatron's permute order), unrouted
    pairs last; slots invert order; counts per expert."""
    routing_map = torch.zeros(5, 6, dtype=torch.bool)
    for token, experts in enumerate([(4, 1), (1, 5), (), (0, 4), (5, 2)]):
        routing_map[token, list(experts)] = True
    plan = plan_routes(routing_map, 2)
    assert plan.source.tolist() == [3, 0, 1, 4, 0, 3, 1, 4, 2, 2]
    assert plan.counts.tolist() == [1, 2, 1, 0, 2, 2]
    assert torch.equal(plan.order[plan.slots], torch.arange(10))
    assert plan.experts[[0, 1, 3, 4]].tolist() == [[1, 4], [1, 5], [0, 4], [2, 5]]
    # megatron's permutation of the routed pairs: argsort of the [E, T] map, routed first
    flat = routing_map.T.reshape(-1).argsort(descending=True, stable=True)[:8]
    assert plan.source[:8].tolist() == (flat % 5).tolist()


def test_moe_recompute_gives_the_same_outputs_and_gradients(results):
    """With megatron's MoE recompute the layer's forward runs again in its backward: bit-identical results."""
    assert all(results[case]["recompute_equal"] for case in CASES)
