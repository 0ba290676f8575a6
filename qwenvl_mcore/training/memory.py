"""Per-GPU memory of a training run, by category, from the model config and the parallel layout alone.

Small pure functions, each stating its formula; `plan()` puts them together for one resolved run config and
`tools/plan_memory.py` prints the result (docs/memory.md has the derivations and the table of every preset).

Notation (one rank): tp, pp, vpp, ep, etp, cp from the layout; DP = world / (tp*pp*cp) and EDP =
world / (ep*etp*pp) (megatron's data-parallel and expert-data-parallel group sizes: the expert-data-parallel group
spans DP x CP); h hidden, q = heads*head_dim, g = kv_heads*head_dim,
E experts, k = top-k, F = moe_intermediate_size, V vocabulary, L layers; s tokens of one micro-batch (a packed
sequence, or micro_batch_size x seq_length without packing), s_t = s / tp (sequence parallelism); B bytes per
activation element (2 for bf16, 4 for fp32). Everything is in bytes unless a name says GiB. A pipeline rank's
layers are `ParallelLayout.stage_layers`' (L / pp on even stages; uneven stages give the first and last their own
counts), so every stage is planned on its own and the plan reports the worst.

What is counted, and why (the code it follows):
- weights: the parameter tensors this rank's model chunks hold, enumerated the way `models/qwen3_vl_moe` builds them
  (column/row-parallel linears split by tp, norms/router/patch embedding replicated, experts [E/ep, h, 2, F/etp] and
  [E/ep, F/etp, h], the ViT and the embedding on the first stage, final norm and LM head on the last). With the
  distributed optimizer megatron's DDP moves trainable parameters into one contiguous buffer per (dtype, dense or
  expert) and model chunk, each parameter starting at a multiple of 64 elements and the buffer padded to a multiple of
  lcm(group size, 128) (megatron.core.optimizer.param_layout); frozen parameters stay where they are, unpadded.
- gradients: megatron DDP's grad buffers, same layout as the trainable parameters; `training/setup.py` builds DDP with
  grad_reduce_in_fp32=True by default (`optim.grad_dtype=fp32`), so they are fp32 (4 bytes) for bf16 and fp32
  parameters alike; with `optim.grad_dtype=bf16` they are bf16 (2 bytes), and the optimizer step casts this rank's
  gradient shards into one fp32 buffer (4 bytes per sharded trainable element) for Adam, counted in
  optimizer_step_temp.
- optimizer: megatron's distributed optimizer over torch Adam/AdamW (no Apex/TE in this venv): exp_avg + exp_avg_sq in
  fp32 (8 bytes) plus an fp32 master copy (4 bytes) when parameters are bf16 (fp32 parameters are their own master:
  megatron's shard is a view); dense elements sharded over DP, expert elements over EDP. Frozen parameters have
  neither gradients nor optimizer states. Without the distributed optimizer nothing is sharded.
- activations: saved tensors of the in-flight micro-batches (see `layer_activation_bytes`), plus the working set
  of one layer under full recompute, the stage input of non-first stages, and the rotary tables.
- vit: the vision tower's saved tensors for a micro-batch whose visual tokens are `image_share` of its tokens
  (4 patches per visual token); the ViT is never recomputed (only the LLM config gets the recompute settings).
  With `model.vision_microbatches` = k != 1 the ViT encodes k micro-batches in one call and keeps their saved
  tensors, their features and the features' gradient buffer until that group's backward (`vision_alive_microbatches`,
  `vision_batch_feature_bytes`).
- moe_dispatch: the token dispatcher's buffers of one layer: the permuted tokens and the experts' outputs (megatron's
  alltoall dispatcher sends and receives them; at EP = ETP = 1 the local dispatcher gathers and sums them, with
  every one of the s_t * k rows on this rank whatever the load imbalance).
- logits: the last stage's [s, V/tp] logits in B bytes and their fp32 copy that the cross entropy keeps; at TP=1
  with `model.loss_chunk_tokens` > 0 (lm_loss.py) only one chunk's logits and fp32 log-softmax at a time, plus two
  fp32 numbers per token and the fp32 hidden gradient of the backward.
- optimizer_step_temp: torch's foreach Adam allocates one fp32 temporary as large as the biggest parameter group
  it updates (sqrt(exp_avg_sq)); Apex/Transformer-Engine's fused Adam does not (counted only with adam="torch");
  with bf16 gradient buffers, the fp32 copy of the gradient shards the step casts (counted with either Adam). It is
  alive at the optimizer step, when activations are gone, so the peak is static + max(activations, step temp).
- context parallelism (cp > 1): every per-token activation, the dispatch buffers and the logits are this CP rank's
  slice of the row (s/cp tokens); the attention keeps the K/V blocks it gathers from the whole row and the blocks'
  causal mask biases (`cp_attention_bytes`); the ViT encodes a 1/cp share of the frames and all-gathers the features
  (`cp_vision_extra_bytes`: the whole pixel tensor and the gathered features stay on every CP rank).
- LoRA (`peft=lora`, qwenvl_mcore/lora): the whole base is frozen (its stored dtype, unpadded, no gradient, no
  optimizer state); the adapters (`lora_sites`: rank r on every targeted linear, sharded like its base) are the
  trainable parameters above, dense ones over DP, expert ones over EDP. Activations are full training's plus each
  adapter's low-rank z (tokens x r per target, `adapter_activation_bytes`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from qwenvl_mcore.training import lora_sites

GIB = 2**30
ADAM_KINDS = ("fused", "torch")
CATEGORIES = ("weights", "gradients", "optimizer", "activations", "vit", "moe_dispatch", "logits",
              "optimizer_step_temp")
PARAM_ALIGN = 64  # megatron pads every parameter's start in a DDP buffer to 64 elements (distributed optimizer)
BUCKET_ALIGN = 128  # ... and each bucket's end to lcm(data-parallel group size, 128)


# -- parameters ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor of a rank's model chunk: its local element count, whether it is an expert weight
    (reduced and sharded over the expert-data-parallel group) and its part ("vision", "merger" or "language",
    as `model.parameter_part` names them, which decides what model.freeze_* freezes)."""

    name: str
    numel: int
    expert: bool = False
    part: str = "language"
    adapter: bool = False  # a LoRA adapter tensor (lora_A / lora_B): the only trainable tensors of a LoRA run


def adapter_params(sites, lora, layout, args, prefix: str = "") -> list[ParamTensor]:
    """The LoRA tensors (A and B) of these adapter sites on one rank, shaped as `lora_sites.AdapterSite.shapes`
    says (qwenvl_mcore/lora/layers.py builds them so)."""
    out = []
    for site in sites:
        for ab, shape in zip("AB", site.shapes(lora.rank, tp=layout.tp, ep=layout.ep, etp=layout.etp,
                                               num_experts=args.text.num_experts)):
            out.append(ParamTensor(f"{prefix}lora_{ab}.{site.kind}", math.prod(shape), expert=site.expert,
                                   part=site.part, adapter=True))
    return out


def language_layer_params(args, layout, lora=None) -> list[ParamTensor]:
    """One MoE decoder layer on one rank:
    norms h + h, q/k norms d + d (replicated), qkv (q + 2g)/tp * h, output projection h * q/tp, router E * h
    (replicated), experts (E/ep) * h * 2 * (F/etp) and (E/ep) * (F/etp) * h; with `lora` (a
    lora_sites.LoRAShape) the adapters of the targeted linears (`adapter_params`)."""
    t, tp = args.text, layout.tp
    h, d = t.hidden_size, t.head_dim
    q, g = t.num_attention_heads * d, t.num_key_value_heads * d
    e_local, f_local = t.num_experts // layout.ep, t.moe_intermediate_size // layout.etp
    return [
        ParamTensor("input_layernorm", h),
        ParamTensor("linear_qkv", (q + 2 * g) // tp * h),
        ParamTensor("q_layernorm", d),
        ParamTensor("k_layernorm", d),
        ParamTensor("linear_proj", h * (q // tp)),
        ParamTensor("pre_mlp_layernorm", h),
        ParamTensor("router", t.num_experts * h),
        ParamTensor("experts.weight1", e_local * h * 2 * f_local, expert=True),
        ParamTensor("experts.weight2", e_local * f_local * h, expert=True),
    ] + ([] if lora is None else adapter_params(lora_sites.language_layer_sites(args, lora.kinds), lora, layout, args))


def vision_params(args, layout, lora=None) -> list[ParamTensor]:
    """The ViT on one rank (first pipeline stage): patch embedding C*T*P*P*hv + hv and position table npos*hv
    (replicated); per block LayerNorms 2*(hv + hv), qkv 3hv/tp*hv + 3hv/tp, proj hv*hv/tp + hv, fc1 I/tp*hv + I/tp,
    fc2 hv*I/tp + hv; the merger (norm over hv) and each DeepStack merger (norm over m = 4hv):
    fc1 m*m/tp + m/tp, fc2 out*m/tp + out. With `lora`, the adapters of the targeted block and merger linears."""
    v, tp = args.vision, layout.tp
    hv, inter = v.hidden_size, v.intermediate_size
    m, out = v.merged_hidden_size, v.out_hidden_size
    params = [
        ParamTensor("patch_embed.weight", v.in_channels * v.temporal_patch_size * v.patch_size**2 * hv, part="vision"),
        ParamTensor("patch_embed.bias", hv, part="vision"),
        ParamTensor("pos_embed", v.num_position_embeddings * hv, part="vision"),
    ]
    for i in range(v.depth):
        params += [ParamTensor(f"blocks.{i}.{name}", n, part="vision") for name, n in (
            ("ln1.weight", hv), ("ln1.bias", hv), ("qkv.weight", 3 * hv // tp * hv), ("qkv.bias", 3 * hv // tp),
            ("proj.weight", hv * (hv // tp)), ("proj.bias", hv), ("ln2.weight", hv), ("ln2.bias", hv),
            ("fc1.weight", inter // tp * hv), ("fc1.bias", inter // tp), ("fc2.weight", hv * (inter // tp)),
            ("fc2.bias", hv))]
        if lora is not None:
            params += adapter_params(lora_sites.vision_block_sites(args, lora.kinds), lora, layout, args,
                                     f"blocks.{i}.")
    for j, norm_width in enumerate([hv] + [m] * len(v.deepstack_visual_indexes)):
        params += [ParamTensor(f"merger{j}.{name}", n, part="merger") for name, n in (
            ("norm.weight", norm_width), ("norm.bias", norm_width), ("fc1.weight", m // tp * m),
            ("fc1.bias", m // tp), ("fc2.weight", out * (m // tp)), ("fc2.bias", out))]
        if lora is not None:
            params += adapter_params(lora_sites.merger_sites(args, lora.kinds), lora, layout, args, f"merger{j}.")
    return params


def chunk_params(args, layout, *, first: bool, last: bool, layers: int, lora=None) -> list[ParamTensor]:
    """One model chunk (`Qwen3VLMoeModel`): on the first stage the embedding V/tp*h and the ViT, then `layers`
    decoder layers, on the last stage the final norm h and the LM head V/tp*h (none when tied on a single stage)."""
    t = args.text
    params: list[ParamTensor] = []
    if first:
        params.append(ParamTensor("embedding", t.vocab_size // layout.tp * t.hidden_size))
        params += vision_params(args, layout, lora)
    for _ in range(layers):
        params += language_layer_params(args, layout, lora)
    if last:
        params.append(ParamTensor("final_layernorm", t.hidden_size))
        if not (args.tie_word_embeddings and first):
            params.append(ParamTensor("output_layer", t.vocab_size // layout.tp * t.hidden_size))
    return params


def stage_chunks(args, layout, pp_rank: int, lora=None) -> list[list[ParamTensor]]:
    """The model chunks of pipeline rank `pp_rank`: vpp chunks (one without interleaving); chunk c is virtual
    stage c*pp + pp_rank and holds the layers `ParallelLayout.stage_layers` gives it (L / (pp*vpp) on even stages;
    uneven stages: parallel.first_stage_layers / last_stage_layers); virtual stage 0 is first, pp*vpp - 1 last."""
    vpp = layout.vpp or 1
    stages = layout.pp * vpp
    chunks = []
    for c, layers in enumerate(layout.rank_layers(args.text.num_hidden_layers, pp_rank)):
        virtual = c * layout.pp + pp_rank
        chunks.append(chunk_params(args, layout, first=virtual == 0, last=virtual == stages - 1, layers=len(layers),
                                   lora=lora))
    return chunks


def padded_numel(numels: Iterable[int], group_size: int) -> int:
    """Elements of one megatron DDP buffer under the distributed optimizer: every parameter starts at a multiple
    of 64 and the (single, no overlap) bucket ends at a multiple of lcm(group_size, 128); 0 for no parameters."""
    numels = list(numels)
    if not numels:
        return 0
    total = sum(math.ceil(n / PARAM_ALIGN) * PARAM_ALIGN for n in numels)
    divisor = math.lcm(group_size, BUCKET_ALIGN)
    return math.ceil(total / divisor) * divisor


def model_state_bytes(chunks: Sequence[Sequence[ParamTensor]], *, param_bytes: int, frozen: Iterable[str] = (),
                      dp: int, edp: int, distributed_optimizer: bool = True, lora: bool = False,
                      grad_bytes: int = 4) -> dict[str, int]:
    """weights, gradients, optimizer, optimizer_step_temp (torch foreach Adam) and grad_cast_temp bytes of one
    rank.

    Trainable: the parameters outside the `frozen` parts; with `lora` the adapters only (the base is frozen whole
    and stays in its dtype, outside DDP's buffers, with no gradient and no optimizer state; the adapters have the
    base's dtype, fp32 gradients, and fp32 masters and Adam moments when that dtype is bf16).

    Per chunk, trainable parameters go to DDP buffers per kind (dense over DP, expert over EDP):
      weights    = padded(trainable) * param_bytes + frozen * param_bytes   (padded only with the distributed optimizer)
      gradients  = padded(trainable) * grad_bytes                           (4: grad_reduce_in_fp32=True)
      grad cast  = 4 * trainable / group when grad_bytes < 4: the step's fp32 copy of the gradient shards
      optimizer  = trainable / group * (8 + (4 if param_bytes < 4 else 0))  (group = DP or EDP; 1 if not distributed)
      step temp  = 4 * the largest optimizer parameter group's shard: torch's foreach Adam makes one fp32
                   temporary per parameter group (sqrt(exp_avg_sq)) and steps the groups one after the other;
                   groups: dense / expert x part (vision, merger and language get their own LRs) x weight decay
                   or not (norms and biases)
    """
    frozen = set(frozen)
    out = {"weights": 0, "gradients": 0, "optimizer": 0, "optimizer_step_temp": 0, "grad_cast_temp": 0}
    per_element_state = 8 + (4 if param_bytes < 4 else 0)
    groups: dict[tuple, int] = {}
    for chunk in chunks:
        for expert, group in ((False, dp), (True, edp)):
            shard = group if distributed_optimizer else 1
            kind = [p for p in chunk if p.expert == expert]
            trains = [p.adapter if lora else p.part not in frozen for p in kind]
            trainable = [p for p, t in zip(kind, trains) if t]
            frozen_n = sum(p.numel for p, t in zip(kind, trains) if not t)
            numels = [p.numel for p in trainable]
            buffer = padded_numel(numels, group) if distributed_optimizer else sum(numels)
            out["weights"] += buffer * param_bytes + frozen_n * param_bytes
            out["gradients"] += buffer * grad_bytes
            out["optimizer"] += math.ceil(sum(numels) / shard) * per_element_state
            if grad_bytes < 4:
                out["grad_cast_temp"] += math.ceil(sum(numels) / shard) * 4
            for p in trainable:
                key = (expert, p.part, is_no_decay(p.name))
                groups[key] = groups.get(key, 0) + p.numel / shard
    out["optimizer_step_temp"] = int(4 * max(groups.values(), default=0))
    return out


def is_no_decay(name: str) -> bool:
    """Norm weights and biases: megatron's standard overrides put them in a no-weight-decay parameter group."""
    return name.endswith(("layernorm", "norm.weight", "norm.bias", ".bias", "ln1.weight", "ln2.weight"))


# -- activations --------------------------------------------------------------------------------------------------
def norm_bytes(act_bytes: int) -> int:
    """Bytes our RMSNorm keeps per element: its fp32 upcast (4) and the normalised tensor before the weight (B);
    in fp32 the upcast is the input itself and the normalised tensor is fp32 (4 + 4)."""
    return 4 + act_bytes


def layer_activation_bytes(args, layout, tokens: int, act_bytes: int, *, recompute: str = "none",
                           moe_imbalance: float = 1.0, sequences: int = 1, dense_mask: bool = False,
                           lora=None) -> dict[str, int]:
    """Saved tensors of one MoE decoder layer for one micro-batch of `tokens` tokens (Korthikanti et al. 2022,
    "Reducing Activation Recomputation in Large Transformer Models", per-layer accounting, adapted: GQA, RMSNorm
    with an fp32 upcast, per-head q/k norms, flash-style attention that keeps no s^2 probabilities, no dropout,
    MoE with top-k routed tokens and SwiGLU experts; sequence parallelism divides everything by tp).

    Per token of this rank's sequence slice (s_t = s / tp), B bytes per element, N = 4 + B (RMSNorm):
      attention  N*h (input norm) + B*h (qkv input) + N*(q + g) (q/k norms) + B*(q + g) (rotated q, k)
                 + B*(q + 2g) (qkv output, kept by v) + B*q (attention output, which is also the output
                 projection's input: SDPA writes it [b, s, heads, d], so the reshape is a view)
                 + 4*heads (log-sum-exp); the rotary cos/sin tables are shared by all layers (llm_activation_bytes)
      moe        N*h (pre-MLP norm) + B*h (router input) + 12*E (fp32 router logits, scores, probabilities)
                 + k*imb*(2*B*h*etp (expert input, expert output before the probability scaling)
                          + 4*B*F (gate_up output 2F, silu output F, SwiGLU product F))
    and, with `dense_mask` (unpacked micro-batches with padding; packed rows use segment attention, no mask), per
    layer B*b*(s/b)^2 for the attention-mask bias SDPA builds from the bool mask (b = `sequences` rows of s/b tokens)
    and keeps for backward.
    selective recompute (core attention, with the rotation: SDPAttention checkpoints both) drops the rotated q, k,
    the attention output, the log-sum-exp and the mask bias;
    full recompute keeps only the layer input, B*h per token (see `llm_activation_bytes`).
    With context parallelism (layout.cp > 1) `tokens` is the whole row and every per-token term runs on this CP
    rank's slice, s_t = s / (cp*tp); the attention terms are the CP attention's (`cp_attention_bytes`):
      attention  N*h + B*h + N*(q + g) + 3*B*q (q picked into blocks, SDPA's output, the projection input: the
                 blocks are index-selected copies and the output is scattered back) + 4*heads; the rotated q, k and
                 the qkv output are not kept (index_select and the K/V all-gather keep no input)
      + "cp_kv" (K/V blocks gathered from the whole row) and "mask_bias" (the blocks' bottom-right causal biases).
    With `lora` (a lora_sites.LoRAShape) the base's tensors are the same (its input gradients need them, and each
    adapter's A keeps the input its base linear keeps) plus "adapters", `adapter_activation_bytes`; full recompute
    recomputes them too.
    """
    t, tp, cp = args.text, layout.tp, layout.cp or 1
    h, d = t.hidden_size, t.head_dim
    q, g, heads = t.num_attention_heads * d, t.num_key_value_heads * d, t.num_attention_heads
    b_, n_ = act_bytes, norm_bytes(act_bytes)
    s_t = tokens / (cp * tp)
    experts = t.num_experts_per_tok * moe_imbalance * (2 * b_ * h * layout.etp + 4 * b_ * t.moe_intermediate_size)
    moe = n_ * h + b_ * h + 12 * t.num_experts + experts
    if cp == 1:
        attention = n_ * h + b_ * h + n_ * (q + g) + b_ * (q + g) + b_ * (q + 2 * g) + b_ * q + 4 * heads
        core = b_ * (q + g) + b_ * q + 4 * heads  # recomputed under selective recompute
        mask = b_ * tokens * tokens / sequences if dense_mask else 0
        out = {"attention": int(s_t * attention), "moe": int(s_t * moe), "mask_bias": int(mask)}
    else:
        # context parallelism (`cp_attention_bytes`): q copied into blocks, SDPA's output and the projection input
        # are distinct tensors, rotated q/k and the qkv output are not kept; the gathered K/V blocks and mask biases
        attention = n_ * h + b_ * h + n_ * (q + g) + 3 * b_ * q + 4 * heads
        core = 2 * b_ * q + 4 * heads
        kv = cp_attention_bytes(args, layout, tokens, act_bytes)
        out = {"attention": int(s_t * attention), "moe": int(s_t * moe), "mask_bias": kv["mask_bias"],
               "cp_kv": kv["kv_blocks"]}
    if lora is not None:
        out["adapters"] = adapter_activation_bytes(lora_sites.language_layer_sites(args, lora.kinds), lora.rank,
                                                   layout, tokens / cp, act_bytes, sequence_parallel=True,
                                                   routed_rows=s_t * t.num_experts_per_tok * layout.etp * moe_imbalance)
    if recompute == "selective":
        out["attention"] -= int(s_t * core)
        out["mask_bias"] = 0
        out.pop("cp_kv", None)
    elif recompute == "full":
        out = {"layer_input": int(s_t * b_ * h)}
    return out


def cp_vision_extra_bytes(args, layout, patches: float, act_bytes: int) -> int:
    """What a CP rank holds for the ViT beyond its share's saved tensors (`vision_activation_bytes` on patches/cp):
    the micro-batch's whole pixel tensor, B*C*T*P*P per patch, stays alive (the rank's patch embedding keeps its
    share, a view of it), so (cp-1)/cp of the pixels count on top of the share's; and the all-gathered features,
    merged and DeepStack, B*(1 + n_deep)*out per merged token of the row (patches / merge^2)."""
    v, cp = args.vision, layout.cp or 1
    pixels = act_bytes * v.in_channels * v.temporal_patch_size * v.patch_size**2 * patches * (cp - 1) / cp
    features = act_bytes * (1 + len(v.deepstack_visual_indexes)) * v.out_hidden_size * patches / v.spatial_merge_size**2
    return int(pixels + features)


def cp_attention_bytes(args, layout, tokens: float, act_bytes: int) -> dict[str, int]:
    """What one layer's context-parallel attention (parallel/context_parallel.py, all-gather K/V) keeps for
    backward on one CP rank, beyond its per-token tensors, for a packed row of s = `tokens` tokens:
      kv_blocks  2*B*K*g/tp: each of the rank's query chunks attends to its sample's chunks 0..k, index-selected
                 from the gathered row into SDPA's key and value blocks (copies, which SDPA keeps). Rank r holds
                 chunks r and 2cp-1-r of every sample, whose keys are chunks 0..r and 0..2cp-1-r: 2cp+1 chunks,
                 so K = s*(2cp+1)/(2cp) key rows whatever the rank and the samples (more than the whole row).
                 The gathered row itself ([s, 2g/tp], all-gather output) and the picked k_all / v_all are not kept
                 (index_select keeps only its index): they live while the layer's attention runs.
      mask_bias  B*(2cp+1)*c^2, c = s/(2cp): SDPA turns the bottom-right causal bool mask of each (query length,
                 key length) group of blocks into a bias of [ql, kl] in the activation dtype and keeps it (the
                 CPU's flash kernel and the GPU's memory-efficient one alike); blocks of the same lengths share one.
                 The worst case is one sample filling the row: ql = c, kl = (r+1)*c and (2cp-r)*c; rows of several
                 samples have smaller chunks (the bias falls with the square of the sample length).
    """
    cp = layout.cp or 1
    g = args.text.num_key_value_heads * args.text.head_dim
    keys = tokens * (2 * cp + 1) / (2 * cp)
    chunk = tokens / (2 * cp)
    return {"kv_blocks": int(2 * act_bytes * keys * g / layout.tp),
            "mask_bias": int(act_bytes * (2 * cp + 1) * chunk * chunk)}


def adapter_activation_bytes(sites, rank: int, layout, tokens: float, act_bytes: int, *, sequence_parallel: bool,
                             routed_rows: float = 0.0) -> int:
    """What the adapters of these sites keep for backward for `tokens` tokens (the sequence of a layer, a ViT
    block's patches or a merger's merged tokens). Each adapter computes z = scale * (x A^T) and keeps z, the input
    of its B GEMM (x is its base linear's input, already kept); per site:
      column:     B*s*r   (z gathered over the sequence under sequence parallelism, or copied to every TP rank)
      row:        B*s_t*r (z reduce-scattered over the sequence; without sequence parallelism all-reduced: B*s*r)
      experts:    B*rows*r, rows = s_t*k*etp*imb (the routed rows this rank's experts run, as for their input)
      replicated: 4*s_t*r (the router's adapter runs in fp32) + 4*s_t*h for its fp32 copy of a bf16 input
    """
    out = 0.0
    s_t = tokens / layout.tp if sequence_parallel else tokens
    for site in sites:
        if site.style == "column":
            out += act_bytes * tokens * rank
        elif site.style == "row":
            out += act_bytes * s_t * rank
        elif site.expert:
            out += act_bytes * routed_rows * rank
        else:
            out += 4 * s_t * rank + (4 * s_t * site.fan_in if act_bytes < 4 else 0)
    return int(out)


def vision_alive_microbatches(group: int, microbatches: int, in_flight: float, *, cp: int = 1) -> int:
    """Micro-batches whose ViT tensors the first stage holds at its peak, when the schedule encodes `group` of them
    per ViT call (model.vision_microbatches; 0: all of the step's) with `in_flight` micro-batches in flight.

    Per micro-batch (group 1, and always under context parallelism): ceil(in_flight), each micro-batch's ViT
    backward running inside its own. Grouped: a group's tensors are made at its first micro-batch's forward and
    kept until the backward of its last one; the in-flight window of f = ceil(in_flight) consecutive micro-batches
    touches at most 1 + ceil((f - 1) / k) groups of k, so min(M, k * (1 + ceil((f - 1) / k)))."""
    flight = math.ceil(in_flight)
    if group == 1 or cp > 1:
        return flight
    k = microbatches if group <= 0 else min(group, microbatches)
    return min(microbatches, k * (1 + math.ceil((flight - 1) / k)))


def vision_batch_feature_bytes(args, patches: float, act_bytes: int, *, needs_grad: bool) -> int:
    """Grouped ViT (vision_microbatches != 1), per micro-batch of the group: its features, merged and DeepStack,
    B*(1 + n_deep)*out per merged token (patches / merge^2), kept from the group's ViT call until its backward, and
    as much again for their gradient buffer when anything before the features trains."""
    v = args.vision
    features = act_bytes * (1 + len(v.deepstack_visual_indexes)) * v.out_hidden_size * patches / v.spatial_merge_size**2
    return int(features * (2 if needs_grad else 1))


def in_flight_microbatches(pp: int, vpp: int | None, pp_rank: int, microbatches: int) -> float:
    """Micro-batches whose activations pipeline rank `pp_rank` holds at its peak, in units of the whole stage.

    1F1B (megatron's non-interleaved schedule): min(M, pp - rank). Interleaved with vpp chunks: megatron runs
    (pp - rank - 1)*2 + (vpp - 1)*pp warm-up forwards, so (that + 1) chunk activations of 1/vpp of the stage each,
    at most M*vpp (Narayanan et al. 2021); the result is an approximation of the interleaved peak."""
    if pp == 1:
        return 1.0
    if not vpp or vpp == 1:
        return float(min(microbatches, pp - pp_rank))
    warmup = (pp - pp_rank - 1) * 2 + (vpp - 1) * pp
    return min(warmup + 1, microbatches * vpp) / vpp


def llm_activation_bytes(args, layout, tokens: int, act_bytes: int, *, recompute: str, layers: int, first: bool,
                         last: bool, in_flight: float, moe_imbalance: float = 1.0, sequences: int = 1,
                         dense_mask: bool = False, lora=None) -> int:
    """The stage's LLM activations at its peak:
      none/selective: in_flight * layers * layer_activation_bytes
      full:           in_flight * layers * B*s_t*h (checkpointed layer inputs) + one layer's full activations
                      (recomputed during its backward; our decoder block checkpoints every layer on its own)
    plus, per in-flight micro-batch: the stage input B*s_t*h (received from the previous stage) on non-first
    stages, the final norm and LM-head input (N + B)*s_t*h on the last stage, the bool mask b*(s/b)^2 (with
    `dense_mask`) and the MRoPE angles and cos/sin tables 8*s*head_dim. With context parallelism `tokens` is the
    whole row and each term is this CP rank's slice: s_t = s / (cp*tp), the tables 8*(s/cp)*head_dim."""
    t = args.text
    cp = layout.cp or 1
    s_t = tokens / (cp * layout.tp)
    per_layer = sum(layer_activation_bytes(args, layout, tokens, act_bytes, recompute=recompute,
                                           moe_imbalance=moe_imbalance, sequences=sequences,
                                           dense_mask=dense_mask, lora=lora).values())
    total = in_flight * layers * per_layer
    if recompute == "full":
        total += sum(layer_activation_bytes(args, layout, tokens, act_bytes, recompute="none",
                                            moe_imbalance=moe_imbalance, sequences=sequences,
                                            dense_mask=dense_mask, lora=lora).values())
    extra = (tokens * tokens / sequences if dense_mask else 0) + 8 * tokens / cp * t.head_dim
    if not first:
        extra += act_bytes * s_t * t.hidden_size
    if last:
        extra += (norm_bytes(act_bytes) + act_bytes) * s_t * t.hidden_size
    return int(total + in_flight * extra)


def vision_activation_bytes(args, layout, patches: int, act_bytes: int, *, vision_trains: bool = True,
                            merger_trains: bool = True, lora=None) -> dict[str, int]:
    """The ViT and its mergers for one micro-batch of `patches` patches: {"saved": kept for backward until the
    micro-batch's backward, "working": alive only while the tower runs}. The ViT is not recomputed; its patch
    sequence is replicated on the TP ranks, heads and MLP split by tp. Saved per patch and block:
      B*hv (LayerNorm 1 input) + B*hv (qkv input) + B*2hv/tp (rotated q, k) + B*3hv/tp (qkv output, kept by v)
      + B*hv/tp (attention output = proj input) + 4*heads/tp (log-sum-exp)
      + B*hv (LayerNorm 2 input) + B*hv (fc1 input) + 2*B*I/tp (GELU input and output)
      + 16 (LayerNorm mean and rstd, fp32)
    (attention runs per frame on segments: no mask); once per micro-batch the rotary angles and cos/sin tables,
    (4 + 2*B)*d_v per patch; the patch embedding keeps its input, B*C*T*P*P per patch. Each of the 1 + len(deepstack) mergers keeps B*hv*(2 + 2/tp) per patch (norm input, fc1 input, GELU
    input and output). A frozen ViT keeps nothing (neither its parameters nor its input need a gradient): one
    block's working set instead. With `lora` (vision_trains / merger_trains: whether ViT / merger linears have
    adapters) the adapters' z per block and merger too (`adapter_activation_bytes`, no sequence parallelism;
    mergers run on patches / merge^2 tokens)."""
    v, tp = args.vision, layout.tp
    hv, b_ = v.hidden_size, act_bytes
    block = (4 * b_ * hv + 16 + b_ * 6 * hv / tp + 4 * v.num_heads / tp + 2 * b_ * v.intermediate_size / tp) * patches
    embed = (b_ * v.in_channels * v.temporal_patch_size * v.patch_size**2 + (4 + 2 * b_) * v.head_dim) * patches
    mergers = (1 + len(v.deepstack_visual_indexes)) * b_ * hv * (2 + 2 / tp) * patches
    if lora is not None:
        block += adapter_activation_bytes(lora_sites.vision_block_sites(args, lora.kinds), lora.rank, layout,
                                          patches, b_, sequence_parallel=False)
        mergers += (1 + len(v.deepstack_visual_indexes)) * adapter_activation_bytes(
            lora_sites.merger_sites(args, lora.kinds), lora.rank, layout, patches / v.spatial_merge_size**2, b_,
            sequence_parallel=False)
    saved = (v.depth * block + embed if vision_trains else 0) + (mergers if merger_trains else 0)
    return {"saved": int(saved), "working": 0 if vision_trains else int(block)}


def dispatch_bytes(args, layout, tokens: int, act_bytes: int, *, moe_imbalance: float = 1.0) -> int:
    """The token dispatcher's buffers of the layer being run: the permuted tokens and the expert outputs, each
    s_t * k * etp * imb rows of h elements: 2 * B * s_t * k * etp * imb * h (s_t = s / (cp*tp): a CP rank
    dispatches its slice's tokens). At EP = ETP = 1 every expert is local: imb = 1 (the rows are s_t * k whatever
    the load)."""
    t = args.text
    imbalance = 1.0 if layout.ep == 1 and layout.etp == 1 else moe_imbalance
    rows = tokens / ((layout.cp or 1) * layout.tp) * t.num_experts_per_tok * layout.etp * imbalance
    return int(2 * act_bytes * rows * t.hidden_size)


def logits_bytes(args, layout, tokens: int, act_bytes: int, *, chunk_tokens: int = 0) -> int:
    """Last stage: the LM head's logits [s, V/tp] in B bytes and the fp32 copy the vocab-parallel cross entropy
    turns into its saved softmax in place: s * V/tp * (B + 4) (4 when the model is fp32: no copy); with context
    parallelism each CP rank computes the logits of its slice only: s/cp rows.

    At TP=1 with `chunk_tokens` > 0 (lm_loss.py) at most c = min(chunk_tokens, s/cp) rows of logits (B) and their
    fp32 log-softmax (4) exist at once, and the backward's vocabulary slices are no larger; it keeps 8 bytes per
    token (row maximum, log-normaliser) and sums the hidden gradient in fp32 (4 * h per token, plus one B * h
    product per token when B < 4): c * V * (B + 4) + s/cp * (8 + 4h + (B h if B < 4))."""
    rows = tokens / (layout.cp or 1)
    vocab = args.text.vocab_size
    if layout.tp == 1 and chunk_tokens > 0:
        h = args.text.hidden_size
        per_token = 8 + 4 * h + (act_bytes * h if act_bytes < 4 else 0)
        return int(min(chunk_tokens, rows) * vocab * (act_bytes + 4) + rows * per_token)
    per = 4 + (act_bytes if act_bytes < 4 else 0)
    return int(rows * vocab / layout.tp * per)


# -- a run --------------------------------------------------------------------------------------------------------
@dataclass
class RunShape:
    """What the memory of a run depends on, read from its resolved config (`from_config`)."""

    name: str
    args: object
    layout: object
    world_size: int
    param_bytes: int
    recompute: str
    frozen: tuple[str, ...]
    seq_length: int
    micro_batch_size: int
    packing: bool
    microbatches: int  # per rank and optimizer step
    distributed_optimizer: bool = True
    image_share: float = 0.25  # visual tokens / tokens of a micro-batch
    moe_imbalance: float = 1.0  # tokens on the busiest EP rank / the mean
    adam: str = "fused"
    lora: object = None  # lora_sites.LoRAShape with peft=lora (base frozen, adapters train), else None
    vision_microbatches: int = 1  # micro-batches per ViT call (model.vision_microbatches; 0: all of a step's)
    grad_bytes: int = 4  # DDP's gradient buffers (optim.grad_dtype: fp32 4, bf16 2)
    loss_chunk_tokens: int = 0  # model.loss_chunk_tokens (TP=1: the LM head's loss in row chunks; 0: whole)

    @property
    def dp(self) -> int:
        return self.layout.data_parallel_size(self.world_size)

    @property
    def edp(self) -> int:
        return self.layout.expert_data_parallel_size(self.world_size)


def world_size_from_name(name: str) -> int | None:
    """`<nodes>x<gpus per node>x<gpu>` in a run name (e.g. sft_30b_a3b_2x8xh100 -> 16), else None."""
    m = re.search(r"(\d+)x(\d+)x", name)
    return int(m.group(1)) * int(m.group(2)) if m else None


def from_config(cfg, *, world_size: int | None = None, image_share: float = 0.25, moe_imbalance: float = 1.0,
                adam: str = "fused") -> RunShape:
    """The RunShape of a composed config (`training.config.compose`). The world size: given, else from the run
    name (`1x8xh100` = 8 GPUs), else the smallest the layout runs on, lcm(tp*pp*cp, ep*etp*pp)."""
    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config, flavor_hf_config
    from qwenvl_mcore.models.qwen3_vl_moe.layout_checks import validate_layout
    from qwenvl_mcore.training.config import layout_of

    if adam not in ADAM_KINDS:
        raise ValueError(f"adam={adam!r}: choose one of {', '.join(ADAM_KINDS)}")
    if not 0.0 <= image_share < 1.0:
        raise ValueError(f"image_share={image_share}: must be in [0, 1)")
    args = args_from_hf_config(flavor_hf_config(cfg.model.flavor))
    layout = layout_of(cfg)
    if world_size is None:
        world_size = world_size_from_name(cfg.trainer.name) or math.lcm(
            layout.model_parallel_size, layout.ep * layout.etp * layout.pp)
    validate_layout(args, layout, world_size)
    dp = layout.data_parallel_size(world_size)
    per_step = cfg.data.micro_batch_size * dp
    microbatches = max(1, cfg.data.global_batch_size // per_step)
    frozen = tuple(part for part, flag in (("vision", cfg.model.freeze_vision), ("merger", cfg.model.freeze_merger),
                                           ("language", cfg.model.freeze_language)) if flag)
    return RunShape(
        name=cfg.trainer.name, args=args, layout=layout, world_size=world_size,
        param_bytes=2 if cfg.model.dtype == "bf16" else 4, recompute=cfg.model.recompute, frozen=frozen,
        seq_length=cfg.data.seq_length, micro_batch_size=cfg.data.micro_batch_size, packing=cfg.data.packing,
        microbatches=microbatches, distributed_optimizer=cfg.optim.distributed_optimizer,
        image_share=image_share, moe_imbalance=moe_imbalance, adam=adam, lora=lora_sites.LoRAShape.of(cfg.peft),
        vision_microbatches=cfg.model.vision_microbatches,
        grad_bytes=2 if cfg.optim.grad_dtype == "bf16" else 4, loss_chunk_tokens=cfg.model.loss_chunk_tokens)


def stage_memory(run: RunShape, pp_rank: int, *, seq_length: int | None = None,
                 micro_batch_size: int | None = None) -> dict[str, int]:
    """Bytes by category on pipeline rank `pp_rank`, and `total` = weights + gradients + optimizer
    + max(activations + vit + moe_dispatch + logits, optimizer_step_temp if adam == "torch" else its gradient cast).
    optimizer_step_temp is always reported (what torch's foreach Adam would add at the step, plus the fp32 copy of
    bf16 gradients); the foreach part counts in the total only with adam="torch" (Apex / Transformer-Engine fused
    Adam has none)."""
    args, layout = run.args, run.layout
    seq = seq_length or run.seq_length
    mbs = micro_batch_size or run.micro_batch_size
    tokens = seq * mbs
    chunks = stage_chunks(args, layout, pp_rank, run.lora)
    state = model_state_bytes(chunks, param_bytes=run.param_bytes, frozen=run.frozen, dp=run.dp, edp=run.edp,
                              distributed_optimizer=run.distributed_optimizer, lora=run.lora is not None,
                              grad_bytes=run.grad_bytes)
    first = pp_rank == 0
    last = pp_rank == layout.pp - 1
    act_bytes = run.param_bytes
    cp = layout.cp or 1
    flight = in_flight_microbatches(layout.pp, layout.vpp, pp_rank, run.microbatches)
    layers = sum(len(c) for c in layout.rank_layers(args.text.num_hidden_layers, pp_rank))  # every chunk's
    out = dict(state)
    out["activations"] = llm_activation_bytes(args, layout, tokens, act_bytes, recompute=run.recompute,
                                              layers=layers, first=first, last=last, in_flight=flight,
                                              moe_imbalance=run.moe_imbalance, sequences=mbs,
                                              dense_mask=not run.packing and cp == 1, lora=run.lora)
    vit = 0
    if first and run.image_share > 0:
        patches = int(tokens * run.image_share) * args.vision.spatial_merge_size**2
        if run.lora is None:
            trains = dict(vision_trains="vision" not in run.frozen, merger_trains="merger" not in run.frozen)
        else:  # adapters on the ViT need the mergers' input gradients too: the mergers keep their tensors
            trains = dict(vision_trains=run.lora.vision_trains,
                          merger_trains=run.lora.merger_trains or run.lora.vision_trains)
        # context parallelism: each CP rank encodes a share of the frames (about patches / cp) and all-gathers
        # the features (merged and DeepStack, (1 + n_deep) * out per merged token of the row, a working buffer)
        one = vision_activation_bytes(args, layout, patches / cp, act_bytes, lora=run.lora, **trains)
        gathered = cp_vision_extra_bytes(args, layout, patches, act_bytes) if cp > 1 else 0
        # the tower's saved tensors live as long as the micro-batches of virtual stage 0 in flight, or, when it
        # encodes several micro-batches per call, as long as the groups those touch (features and their gradients too)
        alive = vision_alive_microbatches(run.vision_microbatches, run.microbatches, flight, cp=cp)
        features = 0
        if run.vision_microbatches != 1 and cp == 1:
            features = vision_batch_feature_bytes(args, patches, act_bytes,
                                                  needs_grad=trains["vision_trains"] or trains["merger_trains"])
        vit = int((one["saved"] + features) * alive + one["working"] + gathered)
    out["vit"] = vit
    out["moe_dispatch"] = dispatch_bytes(args, layout, tokens, act_bytes, moe_imbalance=run.moe_imbalance)
    out["logits"] = logits_bytes(args, layout, tokens, act_bytes, chunk_tokens=run.loss_chunk_tokens) if last else 0
    static = out["weights"] + out["gradients"] + out["optimizer"]
    running = out["activations"] + out["vit"] + out["moe_dispatch"] + out["logits"]
    cast = out.pop("grad_cast_temp")  # bf16 gradient buffers: the step's fp32 copy, with either Adam
    out["optimizer_step_temp"] += cast
    step_temp = out["optimizer_step_temp"] if run.adam == "torch" else cast
    out["total"] = static + max(running, step_temp)
    return out


@dataclass
class Plan:
    """The memory plan of one run: every pipeline stage at the configured micro-batch, the worst stage, whether it
    fits under `fraction` of the GPU, and the largest micro-batch that does."""

    name: str
    world_size: int
    layout: dict
    dp: int
    edp: int
    dtype: str
    recompute: str
    frozen: list
    packing: bool
    seq_length: int
    micro_batch_size: int
    microbatches: int
    image_share: float
    moe_imbalance: float
    adam: str
    gpu_gib: float
    fraction: float
    stages: list = field(default_factory=list)  # bytes by category per pipeline rank
    worst_stage: int = 0
    fits: bool = False
    largest: int = 0  # tokens (packing) or micro_batch_size (no packing); 0: not even one step fits
    largest_capped: bool = False
    lora: dict | None = None  # peft=lora: {"rank", "targets"}; None: full training
    vision_microbatches: int = 1  # micro-batches per ViT call (0: all of a step's)

    @property
    def worst(self) -> dict:
        return self.stages[self.worst_stage]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["worst"] = self.worst
        d["budget_bytes"] = self.budget
        return d

    @property
    def budget(self) -> int:
        return int(self.gpu_gib * GIB * self.fraction)


def plan(run: RunShape, *, gpu_gib: float = 80.0, fraction: float = 0.9, max_steps: int = 64) -> Plan:
    """Memory of every stage at the run's micro-batch and the largest micro-batch that fits under
    fraction * gpu_gib on every stage: with packing, data.seq_length multiples (1x, 2x, ... up to max_steps x),
    reported in tokens; without, micro_batch_size 1, 2, ... Memory grows with the micro-batch, so the search
    stops at the first that does not fit."""
    pp = run.layout.pp
    stages = [stage_memory(run, r) for r in range(pp)]
    worst = max(range(pp), key=lambda r: stages[r]["total"])
    budget = gpu_gib * GIB * fraction
    result = Plan(
        name=run.name, world_size=run.world_size, layout=run.layout.as_dict(), dp=run.dp, edp=run.edp,
        dtype="bf16" if run.param_bytes == 2 else "fp32", recompute=run.recompute, frozen=list(run.frozen),
        packing=run.packing, seq_length=run.seq_length, micro_batch_size=run.micro_batch_size,
        microbatches=run.microbatches, image_share=run.image_share, moe_imbalance=run.moe_imbalance, adam=run.adam,
        gpu_gib=gpu_gib, fraction=fraction, stages=stages, worst_stage=worst,
        fits=stages[worst]["total"] <= budget,
        lora=None if run.lora is None else {"rank": run.lora.rank, "targets": run.lora.ordered_kinds},
        vision_microbatches=run.vision_microbatches)

    def fits(step: int) -> bool:
        kw = dict(seq_length=run.seq_length * step) if run.packing else dict(micro_batch_size=step)
        return all(stage_memory(run, r, **kw)["total"] <= budget for r in range(pp))

    step = 0
    while step < max_steps and fits(step + 1):
        step += 1
    result.largest = step * (run.seq_length if run.packing else 1)
    result.largest_capped = step == max_steps
    return result


# -- presentation -------------------------------------------------------------------------------------------------
COLUMNS = (("weights", "weights"), ("gradients", "grads"), ("optimizer", "optim"), ("activations", "activ"),
           ("vit", "vit"), ("moe_dispatch", "dispatch"), ("logits", "logits"), ("optimizer_step_temp", "step tmp"),
           ("total", "total"))


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def describe(p: Plan) -> str:
    lay = p.layout
    parts = [f"tp{lay['tp']}", f"pp{lay['pp']}"] + ([f"vpp{lay['vpp']}"] if lay.get("vpp") else []) + [
        f"ep{lay['ep']}", f"etp{lay['etp']}"] + ([f"cp{lay['cp']}"] if (lay.get("cp") or 1) > 1 else []) + (["sp"] if lay["sequence_parallel"] else []) + [
        f"{n.split('_')[0]} stage {lay[n]} layers" for n in ("first_stage_layers", "last_stage_layers") if lay.get(n)]
    batch = (f"packed {p.seq_length} tokens" if p.packing else f"micro_batch_size {p.micro_batch_size} x {p.seq_length}")
    frozen = f", frozen {'+'.join(p.frozen)}" if p.frozen else ""
    if p.lora:
        frozen = f", LoRA rank {p.lora['rank']} on {' '.join(p.lora['targets'])} (base frozen)"
    vit = ""
    if p.vision_microbatches != 1 and (lay.get("cp") or 1) == 1:
        per_call = p.microbatches if p.vision_microbatches == 0 else min(p.vision_microbatches, p.microbatches)
        vit = f" ({per_call} per ViT call)"
    return (f"{p.name}: {p.world_size} GPUs, {' '.join(parts)}, DP {p.dp}, EDP {p.edp}, {p.dtype}, "
            f"recompute {p.recompute}{frozen}; {batch}, {p.microbatches} micro-batches/step{vit}, image share "
            f"{p.image_share:g}, MoE imbalance {p.moe_imbalance:g}, "
            + ("torch foreach Adam (step tmp counted)" if p.adam == "torch"
               else "fused Adam (step tmp: what torch's foreach Adam would add, not counted)"))


def largest_text(p: Plan) -> str:
    if p.largest == 0:
        return "none"
    more = "+" if p.largest_capped else ""
    return f"{p.largest}{more} tokens" if p.packing else f"micro_batch_size {p.largest}{more}"


def format_plan(p: Plan) -> str:
    """A markdown table of one run: a row per pipeline stage (GiB per category), total, fits, largest micro-batch."""
    head = "| stage | " + " | ".join(label for _, label in COLUMNS) + " | fits |"
    rule = "|" + "---|" * (len(COLUMNS) + 2)
    rows = []
    for r, st in enumerate(p.stages):
        fits = "yes" if st["total"] <= p.budget else "NO"
        mark = " (max)" if r == p.worst_stage and len(p.stages) > 1 else ""
        rows.append(f"| {r}{mark} | " + " | ".join(_gib(st[key]) for key, _ in COLUMNS) + f" | {fits} |")
    verdict = (f"worst stage {p.worst_stage}: {_gib(p.worst['total'])} GiB of {_gib(p.budget)} GiB "
               f"({p.fraction:.0%} of {p.gpu_gib:g} GiB): {'fits' if p.fits else 'DOES NOT FIT'}; "
               f"largest micro-batch that fits: {largest_text(p)}")
    lines = [describe(p), "", head, rule, *rows, "", verdict]
    hardware = hardware_text(p)
    if hardware:
        lines.append(hardware)
    return "\n".join(lines)


def hardware_text(p: Plan) -> str:
    """For a run named for its hardware (`..._1x8xh100`) on that many GPUs: whether it fits those nodes and the
    longest packed sequence (or micro-batch) it allows, in words; "" otherwise."""
    m = re.search(r"(\d+)x(\d+)x([a-z0-9]+)", p.name)
    if not m or int(m.group(1)) * int(m.group(2)) != p.world_size:
        return ""
    nodes, per_node, gpu = int(m.group(1)), int(m.group(2)), m.group(3).upper()
    where = f"{'one' if nodes == 1 else nodes} node{'s' if nodes > 1 else ''} of {per_node} x {p.gpu_gib:g} GiB"
    allows = ("the longest packed sequence it allows: " if p.packing else "the largest micro-batch it allows: ")
    return (f"{p.name} {'fits' if p.fits else 'does NOT fit'} {where} ({gpu}, {p.fraction:.0%} usable) at "
            f"{p.seq_length} tokens; {allows}{largest_text(p)}")


def format_summary(plans: Sequence[Plan]) -> str:
    """One row per run: its worst stage in GiB per category."""
    head = "| run | " + " | ".join(label for _, label in COLUMNS) + " | fits | largest micro-batch |"
    rule = "|" + "---|" * (len(COLUMNS) + 3)
    rows = [f"| {p.name} | " + " | ".join(_gib(p.worst[key]) for key, _ in COLUMNS)
            + f" | {'yes' if p.fits else 'NO'} | {largest_text(p)} |" for p in plans]
    return "\n".join([head, rule, *rows])


__all__ = [
    "GIB", "CATEGORIES", "ParamTensor", "language_layer_params", "vision_params", "chunk_params", "stage_chunks",
    "adapter_params", "padded_numel", "model_state_bytes", "norm_bytes", "layer_activation_bytes",
    "adapter_activation_bytes", "cp_attention_bytes", "cp_vision_extra_bytes", "in_flight_microbatches",
    "vision_alive_microbatches", "vision_batch_feature_bytes", "llm_activation_bytes", "vision_activation_bytes",
    "dispatch_bytes", "logits_bytes", "RunShape",
    "world_size_from_name", "from_config", "stage_memory", "Plan", "plan", "format_plan", "format_summary",
    "hardware_text",
]
