"""The memory planner (qwenvl_mcore/training/memory.py, tools/plan_memory.py): its parameter, gradient and optimizer
bytes equal what megatron's DDP and distributed optimizer really allocate for the tiny model on the CPU, its
per-layer and ViT activation formulas match the tensors autograd saves, its sharding matches the real model's at
TP2 x EP2 and PP2, every shipped preset fits under 90% of an 80 GiB GPU, and its table has every category."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest

from qwenvl_mcore.training import memory
from qwenvl_mcore.training.config import CONF_DIR, compose

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
STATE_CASES = (
    ("model.flavor=debug", "parallel=single", "model.dtype=fp32"),
    ("model.flavor=debug", "parallel=single", "model.dtype=bf16"),
    ("model.flavor=debug", "parallel=single", "model.dtype=bf16", "model.freeze_vision=true"),
)


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
    from qwenvl_mcore.training.trainer import DTYPES, freeze

    out = {"state": [], "activations": {}}
    for overrides in cases:
        cfg = compose(list(overrides))
        layout = layout_of(cfg)
        init_distributed(layout, seed=cfg.trainer.seed)
        args = args_from_hf_config(flavor_hf_config(cfg.model.flavor))
        chunks = build_model_chunks(args, layout, dtype=DTYPES[cfg.model.dtype])
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
        model = build_model_chunks(args, layout, dtype=dtype)[0]
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        s = 256
        x = torch.randn(s, 1, args.text.hidden_size, dtype=dtype, requires_grad=True)
        rotary = model.rotary(torch.arange(s).view(1, 1, s).expand(3, 1, s))
        layer = model.decoder.layers[0]
        got_layer = _saved_bytes(lambda: layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rotary), params)
        grid = torch.tensor([[1, 16, 32]])  # 512 patches in one image
        pixels = torch.randn(512, model.vision.patch_dim)
        got_vit = _saved_bytes(lambda: model.vision(pixels, grid), params)
        out["activations"][name] = {"layer": got_layer, "vit": got_vit, "args": args, "tokens": s, "patches": 512}
    return out


@pytest.fixture(scope="module")
def measured():
    from qwenvl_mcore.testing.dist import run_on_ranks

    return run_on_ranks(_one_rank, 1, STATE_CASES)[0]


@pytest.mark.parametrize("case", range(len(STATE_CASES)), ids=["fp32", "bf16", "bf16_frozen_vit"])
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


# -- sharding: the planner's per-rank tensors are the real model's ---------------------------------------------
def _shard_rank(rank, world, layouts):
    import torch

    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config
    from qwenvl_mcore.models.qwen3_vl_moe.model import build_model_chunks, parameter_part
    from qwenvl_mcore.parallel import ParallelLayout, init_distributed
    from megatron.core import parallel_state

    args = args_from_hf_config(flavor_hf_config("debug"))
    out = []
    for kwargs in layouts:
        layout = ParallelLayout(**kwargs)
        init_distributed(layout, seed=1)
        with torch.device("meta"):
            chunks = build_model_chunks(args, layout, use_cpu_initialization=False, perform_initialization=False)
        counts = {}
        for c in chunks:
            for name, p in c.named_parameters():
                key = "expert" if not getattr(p, "allreduce", True) else parameter_part(name)
                counts[key] = counts.get(key, 0) + p.numel()
        out.append((parallel_state.get_pipeline_model_parallel_rank(), counts))
    return out


SHARD_LAYOUTS = (dict(tp=2, ep=2, sequence_parallel=True), dict(pp=2))


def test_planned_shards_equal_the_real_model():
    """Every rank of a TP2 x EP2 (SP) and of a PP2 layout holds exactly the elements the planner enumerates for
    its stage: dense language, vision, merger and expert parameters (two ranks, the tiny model on the meta device)."""
    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config
    from qwenvl_mcore.parallel import ParallelLayout
    from qwenvl_mcore.testing.dist import run_on_ranks

    results = run_on_ranks(_shard_rank, 2, SHARD_LAYOUTS)
    args = args_from_hf_config(flavor_hf_config("debug"))
    for rank_results in results:
        for kwargs, (pp_rank, counts) in zip(SHARD_LAYOUTS, rank_results):
            planned = {}
            for chunk in memory.stage_chunks(args, ParallelLayout(**kwargs), pp_rank):
                for p in chunk:
                    key = "expert" if p.expert else p.part
                    planned[key] = planned.get(key, 0) + p.numel
            assert planned == counts, (kwargs, pp_rank, planned, counts)


def test_released_totals_are_enumerated_exactly():
    """At one rank the planner's tensors add up to the released parameter counts (31,070,754,032 and
    235,670,022,896, see test_config_and_layout.py)."""
    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config
    from qwenvl_mcore.parallel import ParallelLayout

    for flavor, total in (("qwen3_vl_30b_a3b", 31_070_754_032), ("qwen3_vl_235b_a22b", 235_670_022_896)):
        args = args_from_hf_config(flavor_hf_config(flavor))
        assert sum(p.numel for c in memory.stage_chunks(args, ParallelLayout(), 0) for p in c) == total


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


# -- presets -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_preset_fits_under_90_percent_of_80_gib(name):
    cfg = compose([f"experiment={name}"])
    p = memory.plan(memory.from_config(cfg), gpu_gib=80, fraction=0.9)
    print(memory.format_plan(p))
    assert p.fits, memory.format_plan(p)
    assert p.largest >= cfg.data.seq_length * (1 if cfg.data.packing else cfg.data.micro_batch_size)


def test_cli_table_and_json_have_every_category():
    import importlib.util

    from qwenvl_mcore.training.config import CONF_DIR

    spec = importlib.util.spec_from_file_location("plan_memory", CONF_DIR.parent / "tools" / "plan_memory.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    text = io.StringIO()
    with redirect_stdout(text):
        assert cli.main(["experiment=sft_30b_a3b_2x8xh100"]) == 0
    table = text.getvalue()
    for _, label in memory.COLUMNS:
        assert f" {label} |" in table, label
    assert "| 0 (max) |" in table and "| 1 |" in table and "fits" in table and "largest micro-batch" in table
    text = io.StringIO()
    with redirect_stdout(text):
        cli.main(["experiment=sft_30b_a3b_1x8xh100", "--json", "--gpu-gib", "40"])
    plan = json.loads(text.getvalue())
    assert set(memory.CATEGORIES) | {"total"} <= set(plan["worst"])
    assert plan["fits"] is False and plan["budget_bytes"] == int(40 * 2**30 * 0.9)
