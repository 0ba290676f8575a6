"""The memory planner (qwenvl_mcore/training/memory.py, tools/plan_memory.py): its parameter, gradient and optimizer
bytes equal what megatron's DDP and distributed optimizer really allocate for the tiny model on the CPU, its
per-layer and ViT activation formulas match the tensors autograd saves, its sharding matches the real model's at
TP2 x EP2 and PP2, every shipped preset fits under 90% of an 80 GiB GPU, and its table has every category."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout

import pytest

from qwenvl_mcore.training import memory
from qwenvl_mcore.training.config import CONF_DIR, compose

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
STATE_CASES = (
    ("model.flavor=debug", "parallel=single", "model.dtype=fp32"),
    ("model.flavor=debug", "parallel=single", "model.dtype=bf16"),
    ("model.flavor=debug", "parallel=single", "model.dtype=bf16", "model.freeze_vision=true"),
    ("model.flavor=debug", "parallel=single", "model.dtype=bf16", "peft=lora", "model.init_from=unused"),
)
LORA_CASE = 3


# -- what one CPU rank really allocates -----------------------------------------------------------------------
def _measured_state(chunks, optimizer) -> dict[str, int]:
    """Bytes of the parameters (distinct storages: DDP's param buffers and frozen parameters), of DDP's grad
    buffers, and of the optimizer: every tensor in Adam's state plus the fp32 main parameters that are not views of
    the model's parameters (bf16 models)."""
    import torch

    model_storages = {}
    for c in chunks:
        for p in c.parameters():
            s = p.untyped_storage()
            model_storages[s.data_ptr()] = s.nbytes()
    grads = sum(b.grad_data.numel() * b.grad_data.element_size()
                for c in chunks for b in (*c.buffers, *c.expert_parallel_buffers))
    optim = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for state in inner.state.values():
            optim += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        for group in inner.param_groups:
            for p in group["params"]:
                if p.untyped_storage().data_ptr() not in model_storages:
                    optim += p.numel() * p.element_size()
    return {"weights": sum(model_storages.values()), "gradients": grads, "optimizer": optim}


def _saved_bytes(fn, exclude) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs (parameters excluded)."""
    import torch

    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _one_rank(rank, world, cases):
    import torch

    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config
    from qwenvl_mcore.models.qwen3_vl_moe.model import MultimodalInputs, build_model_chunks
    from qwenvl_mcore.parallel import ParallelLayout, init_distributed
    from qwenvl_mcore.testing import tiny
    from qwenvl_mcore.training.config import layout_of, optim_settings_of
    from qwenvl_mcore.training.setup import build_optimizer, wrap_ddp
    from qwenvl_mcore.lora import training as lora_training
    from qwenvl_mcore.lora.config import LoRAConfig
    from qwenvl_mcore.models.qwen3_vl_moe.model import parameter_part
    from qwenvl_mcore.training.trainer import DTYPES, freeze

    out = {"state": [], "activations": {}, "adapters": None}
    for overrides in cases:
        cfg = compose(list(overrides))
        layout = layout_of(cfg)
        init_distributed(layout, seed=cfg.trainer.seed)
        args = args_from_hf_config(flavor_hf_config(cfg.model.flavor))
        chunks = build_model_chunks(args, layout, dtype=DTYPES[cfg.model.dtype])
        if cfg.peft.method == "lora":  # what the trainer does: apply_lora on the loaded base, before DDP
            adapters = lora_training.prepare(chunks, lora_training.lora_config(cfg))
            out["adapters"] = [_adapter_record(name, p, parameter_part(name)) for name, p in adapters]
        else:
            freeze(chunks, cfg)
        chunks = wrap_ddp(chunks, distributed_optimizer=cfg.optim.distributed_optimizer)
        optimizer, _ = build_optimizer(chunks, optim_settings_of(cfg), steps=1)
        ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(0))
        chunks[0](MultimodalInputs(input_ids=ids, labels=ids)).sum().backward()
        ok, _, _ = optimizer.step()  # one real step: Adam's states exist
        assert ok
        out["state"].append(_measured_state(chunks, optimizer))

    # activations: one decoder layer and the ViT of a mid-sized config, saved tensors vs the formulas
    layout = ParallelLayout()
    init_distributed(layout, seed=1)
    rope = dict(rope_type="default", rope_theta=1e4, mrope_section=[8, 4, 4], mrope_interleaved=True)
    args = args_from_hf_config(tiny.tiny_hf_config(
        text=dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32, moe_intermediate_size=128,
                  num_experts=16, num_experts_per_tok=4, num_hidden_layers=2, rope_parameters=rope),
        vision=dict(out_hidden_size=256, hidden_size=128, num_heads=4, intermediate_size=320)).to_dict())
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for lora in (False, True):
            model = build_model_chunks(args, layout, dtype=dtype)[0]
            if lora:  # every target but the router, the base frozen
                lora_training.prepare([model], LoRAConfig(method="lora", rank=LORA_RANK))
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            s = 256
            x = torch.randn(s, 1, args.text.hidden_size, dtype=dtype, requires_grad=True)
            rotary = model.rotary(torch.arange(s).view(1, 1, s).expand(3, 1, s))
            layer = model.decoder.layers[0]
            got_layer = _saved_bytes(lambda: layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rotary),
                                     params)
            grid = torch.tensor([[1, 16, 32]])  # 512 patches in one image
            pixels = torch.randn(512, model.vision.patch_dim)
            got_vit = _saved_bytes(lambda: model.vision(pixels, grid), params)
            out["activations"][name + ("_lora" if lora else "")] = {
                "layer": got_layer, "vit": got_vit, "args": args, "tokens": s, "patches": 512}
    return out


LORA_RANK = 8  # the activation check's adapters (the state case takes conf/peft/lora.yaml's rank)


def _adapter_record(name, p, part) -> dict:
    """What the planner must reproduce of one real adapter tensor: its target kind, A or B, shape, part, whether
    it is an expert tensor, and the sharding megatron and the checkpoint code read from it (split dim over TP /
    expert-TP; expert tensors also over EP on dim 0)."""
    ab, kind = name.rsplit(".", 2)[-2:]
    return {"name": name, "kind": kind, "ab": ab[-1], "shape": tuple(p.shape), "part": part,
            "expert": not getattr(p, "allreduce", True), "split": getattr(p, "tensor_model_parallel", False),
            "dim": getattr(p, "partition_dim", -1)}


@pytest.fixture(scope="module")
def measured():
    from qwenvl_mcore.testing.dist import run_on_ranks

    return run_on_ranks(_one_rank, 1, STATE_CASES)[0]


@pytest.mark.parametrize("case", range(len(STATE_CASES)), ids=["fp32", "bf16", "bf16_frozen_vit", "bf16_lora"])
def test_tiny_model_state_matches_measured_bytes(measured, case):
    """Planned weights / gradients / optimizer bytes of the tiny model at one rank are within 5% of what megatron's
    DDP buffers, parameters and distributed optimizer (after one Adam step) really hold."""
    cfg = compose(list(STATE_CASES[case]))
    planned = memory.stage_memory(memory.from_config(cfg, world_size=1), 0)
    got = measured["state"][case]
    print(f"{STATE_CASES[case]}: measured {got}, planned "
          f"{ {k: planned[k] for k in ('weights', 'gradients', 'optimizer')} }")
    for key in ("weights", "gradients", "optimizer"):
        assert got[key] > 0
        assert abs(planned[key] - got[key]) <= 0.05 * got[key], (key, planned[key], got[key])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activation_formulas_match_saved_tensors(measured, dtype):
    """One decoder layer (causal, no mask) and the ViT (segment attention, no mask): the planner's per-layer and
    ViT formulas are within 10% of the bytes autograd saves on the CPU. The GPU path differs only in the attention
    kernel and the token dispatcher, which keep the same tensors."""
    from qwenvl_mcore.parallel import ParallelLayout

    m = measured["activations"][dtype]
    b = 4 if dtype == "fp32" else 2
    layer = memory.layer_activation_bytes(m["args"], ParallelLayout(), m["tokens"], b)
    planned_layer = sum(layer.values()) - layer["mask_bias"]
    planned_vit = memory.vision_activation_bytes(m["args"], ParallelLayout(), m["patches"], b)["saved"]
    print(f"{dtype}: layer measured {m['layer']} planned {planned_layer}; vit measured {m['vit']} planned {planned_vit}")
    assert abs(planned_layer - m["layer"]) <= 0.10 * m["layer"]
    assert abs(planned_vit - m["vit"]) <= 0.10 * m["vit"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lora_activation_formulas_bound_saved_tensors(measured, dtype):
    """The same layer and ViT with adapters on every linear but the router (rank 8) and a frozen base. The planner
    counts full training's tensors plus each adapter's z: an upper bound, since a frozen base keeps a little less
    (a norm's output before its frozen weight is kept only for that weight's gradient). Checked: what LoRA keeps
    is at most the measured full-training bytes plus the planned adapters' bytes, and the planned figure is within
    25% (layer) / 40% (ViT) of the measured one (measured on the CPU: layer 8-10%, ViT 26% below the plan)."""
    from qwenvl_mcore.parallel import ParallelLayout
    from qwenvl_mcore.training.lora_sites import LoRAShape, resolve_targets

    full, got = measured["activations"][dtype], measured["activations"][dtype + "_lora"]
    lora = LoRAShape(LORA_RANK, resolve_targets(["all"]))
    b = 4 if dtype == "fp32" else 2
    args, lay = got["args"], ParallelLayout()
    layer = memory.layer_activation_bytes(args, lay, got["tokens"], b, lora=lora)
    planned_layer = sum(layer.values()) - layer["mask_bias"]
    vit = memory.vision_activation_bytes(args, lay, got["patches"], b, lora=lora)["saved"]
    vit_adapters = vit - memory.vision_activation_bytes(args, lay, got["patches"], b)["saved"]
    print(f"{dtype} LoRA: layer measured {got['layer']} (full training {full['layer']}) planned {planned_layer} "
          f"(adapters {layer['adapters']}); vit measured {got['vit']} (full training {full['vit']}) planned {vit} "
          f"(adapters {vit_adapters})")
    assert layer["adapters"] > 0 and vit_adapters > 0
    assert got["layer"] <= full["layer"] + layer["adapters"]
    assert got["vit"] <= full["vit"] + vit_adapters
    assert got["layer"] <= planned_layer <= 1.25 * got["layer"]
    assert got["vit"] <= vit <= 1.40 * got["vit"]


def test_lora_state_is_the_real_adapters(measured):
    """peft=lora on the tiny model at one rank (qwenvl_mcore.lora apply_lora, as the trainer runs it): the planner
    enumerates exactly the real adapter tensors (target, A/B, element count, part, expert or not), and every base
    tensor is frozen: its weights count without padding, no gradient or optimizer byte (the byte totals are
    checked against megatron's buffers by test_tiny_model_state_matches_measured_bytes[bf16_lora])."""
    from collections import Counter

    from qwenvl_mcore.parallel import ParallelLayout

    cfg = compose(list(STATE_CASES[LORA_CASE]))
    run = memory.from_config(cfg, world_size=1)
    assert run.lora is not None and run.lora.rank == cfg.peft.rank
    real = measured["adapters"]
    planned = [p for chunk in memory.stage_chunks(run.args, ParallelLayout(), 0, run.lora) for p in chunk
               if p.adapter]

    def key(kind, ab, numel, part, expert):
        return (kind, ab, numel, part, expert)

    got = Counter(key(r["kind"], r["ab"], math.prod(r["shape"]), r["part"], r["expert"]) for r in real)
    want = Counter(key(p.name.rsplit(".", 1)[1], p.name.rsplit(".", 2)[-2][-1], p.numel, p.part, p.expert)
                   for p in planned)
    assert got == want
    assert sum(p.numel for p in planned) == sum(math.prod(r["shape"]) for r in real)
    assert {r["kind"] for r in real} == set(run.lora.kinds) and "router" not in run.lora.kinds


@pytest.mark.parametrize("layout", [dict(tp=2, ep=2), dict(tp=2, ep=2, etp=2), dict(tp=2, ep=8)],
                         ids=["tp2_ep2", "tp2_ep2_etp2", "tp2_ep8"])
def test_lora_sharding_follows_the_real_adapters(measured, layout):
    """Per rank at TP2 x EP2, TP2 x EP2 x ETP2 and TP2 x EP8, the planner's adapter tensors equal the real
    adapters' global shapes split as the real tensors declare (what megatron's finalize and the checkpoint code
    read): expert tensors on dim 0 over EP and, where they carry a split dim, on it over expert-TP; dense
    tensors marked tensor-parallel on their split dim over TP. Single process: the declaration comes from the
    one-rank model, the layout's sizes from the planner."""
    from collections import Counter

    from qwenvl_mcore.parallel import ParallelLayout

    lay = ParallelLayout(**layout, sequence_parallel=True)
    cfg = compose(list(STATE_CASES[LORA_CASE]))
    run = memory.from_config(cfg, world_size=1)
    args = run.args
    from qwenvl_mcore.models.qwen3_vl_moe.layout_checks import validate_layout

    validate_layout(args, lay)

    def local(r) -> int:
        shape = list(r["shape"])
        if r["expert"]:
            shape[0] //= lay.ep
            if r["dim"] >= 0:
                shape[r["dim"]] //= lay.etp
        elif r["split"]:
            shape[r["dim"]] //= lay.tp
        return math.prod(shape)

    got = Counter((r["kind"], r["ab"], local(r)) for r in measured["adapters"])
    planned = [p for chunk in memory.stage_chunks(args, lay, 0, run.lora) for p in chunk if p.adapter]
    want = Counter((p.name.rsplit(".", 1)[1], p.name.rsplit(".", 2)[-2][-1], p.numel) for p in planned)
    assert got == want


# -- sharding: the planner's per-rank tensors are the real model's ---------------------------------------------
def _shard_rank(rank, world, layouts):
    import torch

    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config
    from qwenvl_mcore.models.qwen3_vl_moe.model import build_model_chunks, parameter_part
    from qwenvl_mcore.parallel import ParallelLayout, init_distributed
    from megatron.core import parallel_state

    from qwenvl_mcore.lora.apply import apply_lora
    from qwenvl_mcore.lora.config import LoRAConfig

    args = args_from_hf_config(flavor_hf_config("debug"))
    out = []
    for kwargs in layouts:
        kwargs = dict(kwargs)
        lora = kwargs.pop("lora", False)
        layout = ParallelLayout(**kwargs)
        init_distributed(layout, seed=1)
        with torch.device("meta"):
            chunks = build_model_chunks(args, layout, use_cpu_initialization=False, perform_initialization=False)
        if lora:  # conf/peft/lora.yaml's adapters (rank 16, every target but the router)
            apply_lora(chunks, LoRAConfig(method="lora"))
        counts = {}
        for c in chunks:
            for name, p in c.named_parameters():
                key = "expert" if not getattr(p, "allreduce", True) else parameter_part(name)
                key = ("lora_" if getattr(p, "lora", False) else "") + key
                counts[key] = counts.get(key, 0) + p.numel()
        out.append((parallel_state.get_pipeline_model_parallel_rank(), counts))
    return out, _cp_saved(rank)


def _mid_args():
    """The mid-sized config of the activation checks."""
    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config
    from qwenvl_mcore.testing import tiny

    rope = dict(rope_type="default", rope_theta=1e4, mrope_section=[8, 4, 4], mrope_interleaved=True)
    return args_from_hf_config(tiny.tiny_hf_config(
        text=dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32, moe_intermediate_size=128,
                  num_experts=16, num_experts_per_tok=4, num_hidden_layers=2, rope_parameters=rope),
        vision=dict(out_hidden_size=256, hidden_size=128, num_heads=4, intermediate_size=320)).to_dict())


CP_ROW = 512  # one sample filling the row: the planner's worst case for the blocks' mask biases
CP_PATCHES = 1024  # two images of 512 patches: each CP rank encodes one


def _cp_saved(rank):
    """At CP2 (this rank of two): bytes autograd saves for one decoder layer over this rank's slice of a packed row
    (the model's own path: RowSplit, ContextParallelAttention, AttentionContext with the rotary tables) and for the
    ViT spread over the CP ranks (`spread_vision`), in fp32 and bf16."""
    import torch
    from megatron.core import parallel_state

    from qwenvl_mcore.models.qwen3_vl_moe.attention import AttentionContext, RotaryTables
    from qwenvl_mcore.models.qwen3_vl_moe.model import build_model_chunks
    from qwenvl_mcore.parallel import ParallelLayout, context_parallel, init_distributed

    layout = ParallelLayout(cp=2)
    init_distributed(layout, seed=1)
    group = parallel_state.get_context_parallel_group()
    args = _mid_args()
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = build_model_chunks(args, layout, dtype=dtype)[0]
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        split = context_parallel.RowSplit.build([0, CP_ROW], CP_ROW, 2)
        pos = split.take(torch.arange(CP_ROW).view(1, 1, CP_ROW).expand(3, 1, CP_ROW), rank, dim=2, fill=0)
        ctx = AttentionContext(split.attention(rank, group), RotaryTables(model.rotary(pos), dtype))
        x = torch.randn(split.n, 1, args.text.hidden_size, dtype=dtype, requires_grad=True)
        layer = model.decoder.layers[0]
        got_layer = _saved_bytes(lambda: layer(hidden_states=x, attention_mask=ctx, rotary_pos_emb=None), params)
        grid = torch.tensor([[1, 16, 32], [1, 16, 32]])
        pixels = torch.randn(CP_PATCHES, model.vision.patch_dim, dtype=dtype)
        got_vit = _saved_bytes(lambda: context_parallel.spread_vision(model.vision, pixels, grid, group), params)
        out[name] = {"layer": got_layer, "vit": got_vit, "local": split.n}
    return out


SHARD_LAYOUTS = (dict(tp=2, ep=2, sequence_parallel=True), dict(pp=2),
                 dict(tp=2, ep=2, sequence_parallel=True, lora=True), dict(pp=2, lora=True),
                 dict(pp=2, first_stage_layers=3), dict(pp=2, first_stage_layers=3, lora=True))  # uneven: 3 + 1


@pytest.fixture(scope="module")
def two_ranks():
    """One 2-rank launch: the shard counts of SHARD_LAYOUTS, then the CP2 activation measurement (`_cp_saved`)."""
    from qwenvl_mcore.testing.dist import run_on_ranks

    return run_on_ranks(_shard_rank, 2, SHARD_LAYOUTS)


def test_planned_shards_equal_the_real_model(two_ranks):
    """Every rank of a TP2 x EP2 (SP), of a PP2 and of an uneven PP2 (3 + 1 layers) layout holds exactly the
    elements the planner enumerates for its stage: dense language, vision, merger and expert parameters (two ranks,
    the tiny model on the meta device);
    with LoRA (apply_lora, conf/peft/lora.yaml's adapters) the adapters' elements per part and expert too."""
    from qwenvl_mcore.lora.config import LoRAConfig
    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config
    from qwenvl_mcore.parallel import ParallelLayout
    from qwenvl_mcore.training.lora_sites import LoRAShape

    results = [shards for shards, _ in two_ranks]
    args = args_from_hf_config(flavor_hf_config("debug"))
    for rank_results in results:
        for kwargs, (pp_rank, counts) in zip(SHARD_LAYOUTS, rank_results):
            kwargs = dict(kwargs)
            lora = LoRAShape.of(LoRAConfig(method="lora")) if kwargs.pop("lora", False) else None
            planned = {}
            for chunk in memory.stage_chunks(args, ParallelLayout(**kwargs), pp_rank, lora):
                for p in chunk:
                    key = ("lora_" if p.adapter else "") + ("expert" if p.expert else p.part)
                    planned[key] = planned.get(key, 0) + p.numel
            assert planned == counts, (kwargs, pp_rank, planned, counts)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_context_parallel_activation_formulas_match_saved_tensors(two_ranks, dtype):
    """At CP2 on two gloo ranks, one decoder layer over each rank's half of a 512-token row (one sample) and the
    ViT spread over the two ranks (two images, one each): the planner's CP formulas (layer_activation_bytes with
    cp=2: slice tensors on s/cp tokens, the gathered K/V blocks, the blocks' mask biases; vision_activation_bytes
    on patches/cp) are within 10% of the bytes autograd saves on each rank (the layer in bf16 within 3%); the K/V blocks and mask biases are
    what cp_attention_bytes says (K = s*(2cp+1)/(2cp) key rows, (2cp+1) chunk^2 bias elements); and CP halves the
    layer's per-token tensors against the one-rank formula."""
    from qwenvl_mcore.parallel import ParallelLayout

    args = _mid_args()
    b = 4 if dtype == "fp32" else 2
    planned = memory.layer_activation_bytes(args, ParallelLayout(cp=2), CP_ROW, b)
    g = args.text.num_key_value_heads * args.text.head_dim
    assert planned["cp_kv"] == 2 * b * (CP_ROW * 5 // 4) * g  # 640 key rows of k and v
    assert planned["mask_bias"] == b * 5 * (CP_ROW // 4) ** 2  # ql=128 against kl=128 and 512 on either rank
    one_rank = memory.layer_activation_bytes(args, ParallelLayout(), CP_ROW, b)
    assert planned["moe"] == one_rank["moe"] // 2
    planned_layer = sum(planned.values())
    planned_vit = memory.vision_activation_bytes(args, ParallelLayout(cp=2), CP_PATCHES / 2, b)["saved"]
    # the rank's patch embedding keeps its share of the pixels, a view of the whole micro-batch's pixel tensor
    v = args.vision
    planned_vit += b * v.in_channels * v.temporal_patch_size * v.patch_size**2 * CP_PATCHES // 2
    for rank, (_, cp) in enumerate(two_ranks):
        m = cp[dtype]
        print(f"{dtype} CP2 rank {rank}: layer measured {m['layer']} planned {planned_layer}; "
              f"vit measured {m['vit']} planned {planned_vit}")
        assert m["local"] == CP_ROW // 2
        # bf16 (the training dtype) within 3%; fp32 within 10% as the one-rank checks (in fp32 the q/k norms' upcast
        # is their input, a view that keeps the whole qkv output, which the planner does not add)
        tolerance = 0.03 if dtype == "bf16" else 0.10
        assert abs(planned_layer - m["layer"]) <= tolerance * m["layer"], (rank, planned, m["layer"])
        assert abs(planned_vit - m["vit"]) <= 0.10 * m["vit"], (rank, planned_vit, m["vit"])


def test_context_parallel_group_sizes_and_slices():
    """DP = world / (tp*pp*cp), EDP = world / (ep*etp*pp) (the expert-data-parallel group spans DP x CP), as megatron's
    parallel_state builds them; at CP the per-token categories are a CP rank's slice of the row (activations,
    dispatch and logits halve at CP2), the ViT encodes a share, and the dense optimizer state grows with the smaller
    DP."""
    cfg = compose(["experiment=sft_30b_a3b_1x8xh100", "data.seq_length=32768"])
    base = memory.from_config(cfg)
    cp2 = memory.from_config(compose(["experiment=sft_30b_a3b_1x8xh100", "data.seq_length=32768",
                                      "parallel.cp=2"]))
    assert (base.dp, base.edp) == (2, 1) and (cp2.dp, cp2.edp) == (1, 1)
    assert cp2.microbatches == 2 * base.microbatches
    wide = memory.from_config(compose(["experiment=sft_30b_a3b_2x8xh100", "parallel.cp=2", "parallel.ep=4"]))
    assert (wide.world_size, wide.dp, wide.edp) == (16, 4, 2)  # 16/(1*2*2), 16/(4*1*2)
    a, c = memory.stage_memory(base, 0), memory.stage_memory(cp2, 0)
    assert c["logits"] == a["logits"] // 2 and c["moe_dispatch"] == a["moe_dispatch"] // 2
    assert c["activations"] < 0.75 * a["activations"] and c["vit"] < 0.6 * a["vit"]
    assert c["optimizer"] > a["optimizer"] and c["weights"] == a["weights"]
    p = memory.plan(cp2)
    assert "cp2" in memory.describe(p) and "DP 1, EDP 1" in memory.describe(p)


def test_released_totals_are_enumerated_exactly():
    """At one rank the planner's tensors add up to the released parameter counts (31,070,754,032 and
    235,670,022,896, see test_config_and_layout.py)."""
    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config
    from qwenvl_mcore.parallel import ParallelLayout

    for flavor, total in (("qwen3_vl_30b_a3b", 31_070_754_032), ("qwen3_vl_235b_a22b", 235_670_022_896)):
        args = args_from_hf_config(flavor_hf_config(flavor))
        assert sum(p.numel for c in memory.stage_chunks(args, ParallelLayout(), 0) for p in c) == total


def test_uneven_stages_are_planned_stage_by_stage():
    """235B-A22B at TP4 x PP4 x EP16 with parallel.first_stage_layers=22 (22/24/24/24 layers; 94 do not split
    evenly over 4): each stage's chunks hold its own layer count (the first one the ViT and embedding too, the last
    the LM head), the plan reports all four stages, and the first stage's LLM memory is 22/24 of a middle one's."""
    overrides = ["experiment=sft_235b_a22b_8x8xh100", "parallel.pp=4", "parallel.first_stage_layers=22"]
    run = memory.from_config(compose(overrides), world_size=128)
    layers = {r: sum(1 for c in memory.stage_chunks(run.args, run.layout, r) for p in c if p.name == "router")
              for r in range(4)}
    assert layers == {0: 22, 1: 24, 2: 24, 3: 24}
    names = [{p.name for c in memory.stage_chunks(run.args, run.layout, r) for p in c} for r in range(4)]
    assert "embedding" in names[0] and not any("embedding" in n for n in names[1:])
    assert "output_layer" in names[3] and not any("output_layer" in n for n in names[:3])
    planned = memory.plan(run)
    assert len(planned.stages) == 4
    stage = [memory.stage_memory(run, r) for r in range(4)]
    assert stage == planned.stages
    # experts (the bulk of the weights) scale with the layers: stage 0 holds 22/24 of stage 1's expert elements
    experts = [sum(p.numel for c in memory.stage_chunks(run.args, run.layout, r) for p in c if p.expert)
               for r in range(4)]
    assert experts[1] == experts[2] == experts[3] and experts[0] * 24 == experts[1] * 22
    assert stage[1]["weights"] == stage[2]["weights"] and stage[0]["weights"] != stage[1]["weights"]
    assert "first stage 22 layers" in memory.describe(planned)
    # the same run on even stages is refused naming the fields
    from qwenvl_mcore.parallel import LayoutError

    with pytest.raises(LayoutError, match="parallel.first_stage_layers"):
        memory.from_config(compose([*overrides[:2], "parallel.first_stage_layers=null"]), world_size=128)


# -- formulas ------------------------------------------------------------------------------------------------
def test_buffer_padding_and_pipeline_accounting():
    # 64-element parameter starts, bucket end at lcm(group, 128)
    assert memory.padded_numel([1, 1], 1) == 128
    assert memory.padded_numel([100, 200], 3) == 384  # 128 + 256 = 384 = lcm(3, 128)
    assert memory.padded_numel([], 8) == 0
    # 1F1B: stage r keeps min(M, pp - r) micro-batches; no pipeline: one
    assert [memory.in_flight_microbatches(4, None, r, 16) for r in range(4)] == [4, 3, 2, 1]
    assert memory.in_flight_microbatches(4, None, 0, 2) == 2
    assert memory.in_flight_microbatches(1, None, 0, 8) == 1
    assert memory.world_size_from_name("sft_30b_a3b_2x8xh100") == 16
    assert memory.world_size_from_name("debug") is None


def test_recompute_and_freezing_reduce_memory():
    base = ["experiment=sft_30b_a3b_2x8xh100"]
    totals = {r: memory.stage_memory(memory.from_config(compose(base + [f"model.recompute={r}"])), 0)
              for r in ("none", "selective", "full")}
    assert totals["none"]["activations"] > totals["selective"]["activations"] > totals["full"]["activations"]
    frozen = memory.stage_memory(memory.from_config(compose(base + ["model.freeze_vision=true"])), 0)
    assert frozen["gradients"] < totals["full"]["gradients"] and frozen["optimizer"] < totals["full"]["optimizer"]
    assert frozen["vit"] < totals["full"]["vit"]


def test_bf16_gradients_chunked_loss_and_local_dispatch_are_planned():
    """optim.grad_dtype=bf16 halves DDP's gradient buffers and adds the step's fp32 copy of the gradient shards; at
    TP=1 the chunked LM loss keeps one chunk's logits (model.loss_chunk_tokens; 0: the whole micro-batch's); at
    EP = ETP = 1 the dispatch buffers do not grow with the load imbalance (every expert is local)."""
    one = ["experiment=sft_30b_a3b_2x8xh100", "parallel=single", "model.dtype=bf16", "data.seq_length=4096"]
    fp32 = memory.from_config(compose(one), world_size=1)
    bf16 = memory.from_config(compose(one + ["optim.grad_dtype=bf16"]), world_size=1)
    a, b = memory.stage_memory(fp32, 0), memory.stage_memory(bf16, 0)
    assert b["gradients"] * 2 == a["gradients"]
    trainable = sum(p.numel for c in memory.stage_chunks(fp32.args, fp32.layout, 0) for p in c)  # DP = EDP = 1
    assert b["optimizer_step_temp"] == a["optimizer_step_temp"] + 4 * trainable
    running = sum(b[k] for k in ("activations", "vit", "moe_dispatch", "logits"))
    assert b["total"] == b["weights"] + b["gradients"] + b["optimizer"] + max(running, 4 * trainable)
    t = fp32.args.text
    assert fp32.loss_chunk_tokens == 384 and fp32.layout.tp == 1
    assert a["logits"] == 384 * t.vocab_size * (2 + 4) + 4096 * (8 + 4 * t.hidden_size + 2 * t.hidden_size)
    whole = memory.stage_memory(memory.from_config(compose(one + ["model.loss_chunk_tokens=0"]), world_size=1), 0)
    assert whole["logits"] == 4096 * t.vocab_size * (2 + 4) > 8 * a["logits"]
    skewed = memory.RunShape(**{**fp32.__dict__, "moe_imbalance": 2.0})
    assert memory.stage_memory(skewed, 0)["moe_dispatch"] == a["moe_dispatch"]


# -- presets -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_preset_fits_under_90_percent_of_80_gib(name):
    cfg = compose([f"experiment={name}"])
    p = memory.plan(memory.from_config(cfg), gpu_gib=80, fraction=0.9)
    print(memory.format_plan(p))
    assert p.fits, memory.format_plan(p)
    assert p.largest >= cfg.data.seq_length * (1 if cfg.data.packing else cfg.data.micro_batch_size)


def test_lora_235b_fits_one_node_of_8x80_gib():
    """The 235B LoRA preset fits 80 GiB GPUs (under the 90% budget) on one node of 8, at its 9,216-token packed
    sequences, with the base frozen in bf16: no gradient or optimizer byte for it; and the CLI says so in words."""
    cfg = compose(["experiment=lora_235b_a22b_1x8xh100"])
    run = memory.from_config(cfg)
    assert run.world_size == 8 and run.lora is not None and run.param_bytes == 2
    p = memory.plan(run, gpu_gib=80, fraction=0.9)
    assert p.fits and p.largest == cfg.data.seq_length == 9216, memory.format_plan(p)
    worst = p.worst
    assert 60 * 2**30 < worst["total"] <= 72 * 2**30
    # the frozen base: bf16 weights ~57.6 GiB; adapters' fp32 grads and states only a few GiB
    assert worst["weights"] > 55 * 2**30 and worst["gradients"] < 2 * 2**30 and worst["optimizer"] < 5 * 2**30
    # one more 1,024 tokens would not fit: the preset takes the longest length in 1,024-token steps
    longer = memory.stage_memory(run, 0, seq_length=cfg.data.seq_length + 1024)
    assert longer["total"] > p.budget

    rc, out = _cli(["experiment=lora_235b_a22b_1x8xh100"])
    assert rc == 0, out
    assert "lora_235b_a22b_1x8xh100 fits one node of 8 x 80 GiB" in out, out
    assert "the longest packed sequence it allows: 9216 tokens" in out, out
    assert "LoRA rank 16" in out


def _cli(argv) -> tuple[int, str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_memory", CONF_DIR.parent / "tools" / "plan_memory.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    text = io.StringIO()
    with redirect_stdout(text):
        rc = cli.main(argv)
    return rc, text.getvalue()


def test_235b_full_fine_tune_at_8k_fits_8_nodes_and_no_fewer():
    """sft_235b_a22b_8x8xh100: the full fine-tune at 8,192 tokens fits 8 nodes of 8 x 80 GiB at TP4 x PP4 (19/25/25/25)
    x EP16, every stage under the budget; 7 nodes do not fit at the best layouts the planner found (CP2 x TP4 x
    PP7, CP2 x TP4 x PP3 on 6), and the previous layout (TP4 x PP2 x EP32) does not fit 8,192 tokens."""
    cfg = compose(["experiment=sft_235b_a22b_8x8xh100"])
    run = memory.from_config(cfg)
    assert run.world_size == 64 and cfg.data.seq_length == 8192 and not run.frozen and run.lora is None
    assert [len(x) for r in range(4) for x in run.layout.rank_layers(94, r)] == [19, 25, 25, 25]
    p = memory.plan(run, gpu_gib=80, fraction=0.9)
    assert p.fits and p.largest == 8192, memory.format_plan(p)
    assert all(st["total"] <= p.budget for st in p.stages) and p.worst["total"] > 70 * 2**30
    for over, gpus in ((["parallel.tp=4", "parallel.pp=7", "parallel.cp=2", "parallel.ep=8",
                         "parallel.first_stage_layers=10"], 56),
                       (["parallel.pp=3", "parallel.cp=2", "parallel.first_stage_layers=30"], 48),
                       (["parallel.pp=2", "parallel.ep=32", "parallel.first_stage_layers=null"], 64)):
        other = memory.plan(memory.from_config(compose(["experiment=sft_235b_a22b_8x8xh100", *over]),
                                               world_size=gpus))
        assert not other.fits, (over, memory.format_plan(other))
    rc, out = _cli(["experiment=sft_235b_a22b_8x8xh100"])
    assert rc == 0
    assert "sft_235b_a22b_8x8xh100 fits 8 nodes of 8 x 80 GiB (H100, 90% usable) at 8192 tokens" in out, out
    assert "the longest packed sequence it allows: 8192 tokens" in out


def test_30b_32k_context_parallel_preset_fits_one_node_of_8x80_gib():
    """lora_30b_a3b_32k_1x8xh100: 32K-token rows on one node of 8 at CP2 x TP2 x EP8 (DP2), each CP rank planning
    its 16K-token slice; the full fine-tune at 32K fits no layout of that node (the experts' state)."""
    cfg = compose(["experiment=lora_30b_a3b_32k_1x8xh100"])
    run = memory.from_config(cfg)
    assert (run.world_size, run.layout.cp, run.dp, run.edp) == (8, 2, 2, 1) and run.lora is not None
    p = memory.plan(run, gpu_gib=80, fraction=0.9)
    assert p.fits and cfg.data.seq_length == 32768 and p.largest == 65536, memory.format_plan(p)
    assert memory.stage_memory(run, 0, seq_length=98304)["total"] > p.budget
    for lay in (["parallel.tp=4", "parallel.cp=2"], ["parallel.tp=2", "parallel.cp=4"], ["parallel.cp=1"]):
        full = memory.plan(memory.from_config(compose(["experiment=sft_30b_a3b_1x8xh100", "data.seq_length=32768",
                                                       *lay, "model.freeze_vision=true"])))
        assert not full.fits, memory.format_plan(full)
    rc, out = _cli(["experiment=lora_30b_a3b_32k_1x8xh100"])
    assert rc == 0 and "cp2" in out
    assert "lora_30b_a3b_32k_1x8xh100 fits one node of 8 x 80 GiB (H100, 90% usable) at 32768 tokens" in out, out
    assert "the longest packed sequence it allows: 65536 tokens" in out


def test_lora_leaves_full_training_unchanged_and_costs_less():
    """peft=lora changes nothing of a full-training plan (adapters are enumerated only with LoRA), and at the same
    layout it needs far less: no gradient or optimizer state of the base, weights without DDP's padding."""
    base = ["experiment=sft_30b_a3b_1x8xh100"]
    full = memory.from_config(compose(base))
    assert full.lora is None
    assert not any(p.adapter for c in memory.stage_chunks(full.args, full.layout, 0) for p in c)
    lora = memory.from_config(compose(base + ["peft=lora", "model.init_from=unused"]))
    f, l_ = memory.stage_memory(full, 0), memory.stage_memory(lora, 0)
    # the same base tensors, frozen: weights without padding, plus the adapters
    base_elements = sum(p.numel for c in memory.stage_chunks(full.args, full.layout, 0) for p in c)
    adapter_elements = sum(p.numel for c in memory.stage_chunks(lora.args, lora.layout, 0, lora.lora) for p in c
                           if p.adapter)
    assert l_["weights"] >= 2 * (base_elements + adapter_elements)
    assert l_["weights"] < 2 * (base_elements + adapter_elements) + 2 * 64 * 10_000  # padding of the adapters only
    assert l_["gradients"] < 0.05 * f["gradients"] and l_["optimizer"] < 0.05 * f["optimizer"]
    assert l_["activations"] > f["activations"]  # the adapters' z on top of full training's tensors


def test_cli_table_and_json_have_every_category():
    rc, table = _cli(["experiment=sft_30b_a3b_2x8xh100"])
    assert rc == 0, table
    for _, label in memory.COLUMNS:
        assert f" {label} |" in table, label
    assert "| 0 (max) |" in table and "| 1 |" in table and "fits" in table and "largest micro-batch" in table
    plan = json.loads(_cli(["experiment=sft_30b_a3b_1x8xh100", "--json", "--gpu-gib", "40"])[1])
    assert set(memory.CATEGORIES) | {"total"} <= set(plan["worst"])
    assert plan["fits"] is False and plan["budget_bytes"] == int(40 * 2**30 * 0.9)


def test_grouped_vit_keeps_its_groups_alive():
    """model.vision_microbatches = k: the first stage holds the ViT tensors of the groups its in-flight micro-batches
    touch (k per group), plus each grouped micro-batch's features and their gradient buffer; per micro-batch
    (k = 1) and under context parallelism as before."""
    assert [memory.vision_alive_microbatches(k, 16, 1.0) for k in (1, 2, 3, 0)] == [1, 2, 3, 16]
    assert [memory.vision_alive_microbatches(k, 16, 2.0) for k in (1, 2, 3, 4, 0)] == [2, 4, 6, 8, 16]
    assert [memory.vision_alive_microbatches(k, 4, 4.0) for k in (1, 2, 3, 0)] == [4, 4, 4, 4]
    assert memory.vision_alive_microbatches(2, 16, 2.0, cp=2) == 2
    base = ["experiment=sft_30b_a3b_2x8xh100"]  # PP2: two micro-batches in flight on the first stage
    vit = {k: memory.stage_memory(memory.from_config(compose(base + [f"model.vision_microbatches={k}"])), 0)["vit"]
           for k in (1, 2, 0)}
    run = memory.from_config(compose(base))
    args, patches = run.args, int(4096 * run.image_share) * 4
    one = memory.vision_activation_bytes(args, run.layout, patches, 2)
    features = memory.vision_batch_feature_bytes(args, patches, 2, needs_grad=True)
    assert vit[1] == one["saved"] * 2 + one["working"]
    assert vit[2] == int((one["saved"] + features) * 4 + one["working"])
    assert vit[0] == int((one["saved"] + features) * 16 + one["working"])
    assert features == 2 * 2 * 4 * args.vision.out_hidden_size * patches // 4  # merged + 3 DeepStack, and grads
    frozen = memory.vision_batch_feature_bytes(args, patches, 2, needs_grad=False)
    assert frozen * 2 == features
