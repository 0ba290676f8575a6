"""Qwen3-VL MoE on megatron-core: embeddings with visual features scattered in, MRoPE, the MoE decoder with
DeepStack, the LM head and the loss. One instance is one pipeline stage (the ViT lives on the first)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from qwenvl_mcore.models.qwen3_vl_moe.attention import AttentionContext, AttentionSegments, RotaryTables
from qwenvl_mcore.models.qwen3_vl_moe.config import (
    Qwen3VLMoeArgs,
    language_transformer_config,
    vision_transformer_config,
)
from qwenvl_mcore.models.qwen3_vl_moe.language import (
    DeepStackInputs,
    DeepStackTransformerBlock,
    VisualScatter,
    language_layer_spec,
)
from qwenvl_mcore.models.qwen3_vl_moe.layers import Norm
from qwenvl_mcore.models.qwen3_vl_moe.layout_checks import validate_layout
from qwenvl_mcore.models.qwen3_vl_moe.lm_loss import DEFAULT_CHUNK_TOKENS, token_losses
from qwenvl_mcore.models.qwen3_vl_moe.routing import RoutingStats
from qwenvl_mcore.models.qwen3_vl_moe.rope import MRotaryEmbedding, get_rope_index, packed_position_ids
from qwenvl_mcore.models.qwen3_vl_moe.vision import VisionModel
from qwenvl_mcore.models.qwen3_vl_moe.vision_batch import VisualFeatures
from qwenvl_mcore.parallel import context_parallel
from qwenvl_mcore.parallel.distributed import pipeline_stats_group
from qwenvl_mcore.parallel.layout import ParallelLayout

IGNORE_INDEX = -100


@dataclass
class MultimodalInputs:
    """One micro-batch as the model takes it (transformers' names; all batch-first).

    Packed micro-batches (see ``qwenvl_mcore.data.packing``) have b == 1 and set ``cu_seqlens``: int32 [n + 1]
    boundaries of the n samples in the row (0, ..., number of real tokens); every token from ``cu_seqlens[-1]`` on
    is padding (``attention_mask`` 0 there when given). Attention then stays inside each sample, position ids (when
    not given) are computed per sample, and labels must already be shifted per sample.
    """

    input_ids: torch.Tensor  # [b, s]
    attention_mask: torch.Tensor | None = None  # [b, s], 1 = real token
    position_ids: torch.Tensor | None = None  # [3, b, s]; computed from the ids and grids when None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # [b, s] next-token targets aligned with positions (see shift_labels)
    cu_seqlens: torch.Tensor | None = None  # [n + 1] int32 sample boundaries of a packed row (b == 1)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """transformers-style labels (target of position t is labels[t+1]) -> aligned targets, -100 at the end."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


class Qwen3VLMoeModel(MegatronModule):
    """One pipeline stage of Qwen3-VL MoE.

    forward() returns, on the last stage, per-token losses [b, s] (fp32, 0 where the label is ignored) when
    labels are given, else logits [b, s, vocab/tp]; on other stages the hidden states [s(/tp), b, h] for the
    next stage. Under context parallelism (parallel.cp > 1) each micro-batch is one packed row split over the CP
    ranks (parallel/context_parallel.py): the per-token losses are those of this rank's slice [1, n] (in its slice
    order), the logits those of the whole row in row order. While training, when `routing` (a
    routing.RoutingStats, set by the schedule) is given, the routers record into it and the load-balancing loss
    (transformers' formula over all layers) enters the gradient with weight `aux_loss_coeff * aux_loss_scale`.

    `vision_microbatches` is how many micro-batches of a step the schedule (training/schedule.py) encodes in one
    ViT call (0: all of them; 1: each micro-batch runs the ViT in its own forward, as a plain call of the model
    does); the schedule then hands each micro-batch its features (`vision_features`, see vision_batch.py).
    """

    def __init__(self, args: Qwen3VLMoeArgs, layout: ParallelLayout, *, dtype: torch.dtype = torch.float32,
                 vp_stage: int | None = None, aux_loss_coeff: float | None = None, vision_microbatches: int = 0,
                 loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS, **config_overrides):
        config = language_transformer_config(args, layout, dtype=dtype, **config_overrides)
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        validate_layout(args, layout)
        self.args, self.layout = args, layout
        self.vp_stage = vp_stage
        self.pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        self.post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.cp_group = parallel_state.get_context_parallel_group() if layout.cp > 1 else None
        # the routers' statistics of a micro-batch are summed over the ranks sharing its tokens: SP ranks and CP ranks
        if layout.cp > 1:
            self.stats_group = (parallel_state.get_tensor_and_context_parallel_group() if layout.sequence_parallel
                                else self.cp_group)
        else:
            self.stats_group = self.tp_group if layout.sequence_parallel else None
        self.aux_loss_coeff = args.text.router_aux_loss_coef if aux_loss_coeff is None else aux_loss_coeff
        self.aux_loss_scale = 1.0
        self.routing: RoutingStats | None = None
        if vision_microbatches < 0:
            raise ValueError(f"vision_microbatches={vision_microbatches}: must be 0 (all micro-batches of a step in "
                             "one ViT call) or more.")
        self.vision_microbatches = vision_microbatches
        self.pp_stats_group = pipeline_stats_group() if layout.pp > 1 else None
        self.share_embeddings_and_output_weights = args.tie_word_embeddings
        if args.tie_word_embeddings and layout.pp > 1:
            raise ValueError("tie_word_embeddings=true with pipeline parallelism is not supported; use parallel.pp=1.")
        t = args.text
        if self.pre_process:
            self.embedding = VocabParallelEmbedding(
                t.vocab_size, t.hidden_size, init_method=config.init_method,
                reduce_scatter_embeddings=config.sequence_parallel, config=config,
            )
            self.vision = VisionModel(args, vision_transformer_config(args, layout, dtype=dtype))
        self.rotary = MRotaryEmbedding(t.head_dim, t.rope_theta, t.mrope_section, interleaved=t.mrope_interleaved)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        n_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        self.decoder = DeepStackTransformerBlock(
            config=config,
            spec=TransformerBlockSubmodules(layer_specs=[language_layer_spec()] * n_layers, layer_norm=Norm),
            pre_process=self.pre_process, post_process=self.post_process, vp_stage=vp_stage,
        )
        if self.post_process:
            self.output_layer = ColumnParallelLinear(
                t.hidden_size, t.vocab_size, config=config, init_method=config.init_method, bias=False,
                skip_bias_add=False, gather_output=False,
                skip_weight_param_allocation=self.pre_process and self.share_embeddings_and_output_weights,
            )
        # Tokens per chunk of the LM head + loss at TP=1 (lm_loss.py: never the full logits); 0: the full logits
        # through megatron's ColumnParallelLinear, as at TP>1.
        if loss_chunk_tokens < 0:
            raise ValueError(f"loss_chunk_tokens={loss_chunk_tokens}: tokens per LM-head chunk, at least 1 (0: the "
                             "whole micro-batch's logits at once).")
        self.loss_chunk_tokens = loss_chunk_tokens

    @property
    def device(self) -> torch.device:
        """Where this stage's parameters live; forward moves host batches here."""
        return next(self.parameters()).device

    # -- megatron pipeline hooks -------------------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        if self.pre_process:
            return self.embedding.weight
        if self.post_process:
            return self.output_layer.weight
        return None

    # -- forward -----------------------------------------------------------------------------------------------
    def position_ids(self, batch: MultimodalInputs) -> torch.Tensor:
        """MRoPE position ids [3, b, s] as transformers' get_rope_index computes them (per sample when packed)."""
        if batch.position_ids is not None:
            return batch.position_ids
        a = self.args
        tokens = dict(image_token_id=a.image_token_id, video_token_id=a.video_token_id,
                      vision_start_token_id=a.vision_start_token_id, spatial_merge_size=a.vision.spatial_merge_size)
        if batch.cu_seqlens is not None:
            return packed_position_ids(batch.input_ids, batch.cu_seqlens, batch.image_grid_thw, batch.video_grid_thw,
                                       **tokens)
        position_ids, _ = get_rope_index(
            batch.input_ids, batch.image_grid_thw, batch.video_grid_thw, batch.attention_mask, **tokens)
        return position_ids

    def _visual_features(self, batch: MultimodalInputs, host_ids: torch.Tensor):
        """ViT features of the images then videos in token order: (visual mask [b, s] on the host, merged [n, h],
        deepstack list) or None. The placeholder masks and counts come from `host_ids` (the input ids on the
        host), so nothing here waits for the GPU."""
        image_mask, video_mask = host_ids == self.args.image_token_id, host_ids == self.args.video_token_id
        parts = []
        for pixels, grid, mask, what in (
            (batch.pixel_values, batch.image_grid_thw, image_mask, "image"),
            (batch.pixel_values_videos, batch.video_grid_thw, video_mask, "video"),
        ):
            n_tokens = int(mask.sum())
            if pixels is None:
                if n_tokens:
                    raise ValueError(f"{n_tokens} {what} placeholder tokens but no {what} pixels were given.")
                continue
            if self.cp_group is not None:  # each CP rank encodes a share of the frames; all get every feature
                merged, deepstack = context_parallel.spread_vision(self.vision, pixels, grid, self.cp_group)
            else:
                merged, deepstack = self.vision(pixels, grid)
            if merged.shape[0] != n_tokens:
                raise ValueError(
                    f"{what} features and placeholder tokens do not match: {merged.shape[0]} features for "
                    f"{n_tokens} tokens (grid_thw={grid.tolist()})."
                )
            parts.append((mask, merged, deepstack))
        if not parts:
            return None
        visual_mask = image_mask | video_mask
        if len(parts) == 1:  # one kind of visual input: its features are already in token order
            return visual_mask, parts[0][1], parts[0][2]
        # Features in visual-token order (batch-major), images and videos interleaved as their tokens are.
        n_visual = int(visual_mask.sum())
        merged = parts[0][1].new_empty(n_visual, parts[0][1].shape[-1])
        deep = [merged.new_empty(merged.shape) for _ in range(len(self.args.vision.deepstack_visual_indexes))]
        for mask, m, ds in parts:
            rows = mask[visual_mask].nonzero().squeeze(1).to(m.device, non_blocking=True)
            merged = merged.index_copy(0, rows, m)
            deep = [d.index_copy(0, rows, f) for d, f in zip(deep, ds)]
        return visual_mask, merged, deep

    def _given_features(self, features: VisualFeatures, host_ids: torch.Tensor):
        """(visual mask [b, s] on the host, merged, deepstack) of features encoded for this micro-batch by the
        schedule (vision_batch.py), checked against its placeholder tokens."""
        visual_mask = (host_ids == self.args.image_token_id) | (host_ids == self.args.video_token_id)
        n_visual = int(visual_mask.sum())
        if features.merged.shape[0] != n_visual:
            raise ValueError(f"visual features and placeholder tokens do not match: {features.merged.shape[0]} "
                             f"features for {n_visual} image and video tokens.")
        return visual_mask, features.merged, features.deepstack

    def _attention_mask(self, attention_mask: torch.Tensor | None, s: int) -> torch.Tensor | None:
        """Causal + key-padding mask [b, 1, s, s] (True = masked), or None for plain causal attention."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        valid = attention_mask.bool()
        causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
        allowed = causal[None] & valid[:, None, :]
        # A query that may attend to nothing (left padding) attends to itself, so softmax stays finite.
        allowed |= torch.eye(s, dtype=torch.bool, device=valid.device)[None]
        return ~allowed[:, None]

    def _chunked_loss(self) -> bool:
        """Whether the LM head + loss run in row chunks (lm_loss.py): TP=1, `loss_chunk_tokens` set, and the output
        layer megatron's plain ColumnParallelLinear computing its weight gradient in backward (LoRA adapters on it,
        which change its class, or deferred/fused wgrad keep megatron's path)."""
        c = self.config
        return (self.loss_chunk_tokens > 0 and c.tensor_model_parallel_size == 1
                and type(self.output_layer) is ColumnParallelLinear
                and not c.gradient_accumulation_fusion and not c.defer_embedding_wgrad_compute)

    def forward(self, batch: MultimodalInputs, microbatch_index: int = 0,
                vision_features: VisualFeatures | None = None) -> torch.Tensor:
        """`vision_features`: this micro-batch's visual features, already encoded (the schedule's batched ViT,
        vision_batch.py; first stage only, not under context parallelism); None: the ViT runs here."""
        if vision_features is not None:
            if self.cp_group is not None:
                raise ValueError("vision_features under context parallelism: each CP rank encodes its share of the "
                                 "frames in the model's forward; pass none.")
            batch = replace(batch, pixel_values=None, pixel_values_videos=None)  # encoded: keep them off the device
        tp = self.config.tensor_model_parallel_size
        sp = self.config.sequence_parallel
        cp = self.config.context_parallel_size
        if cp > 1:
            batch = context_parallel.as_packed_row(batch)
        b, s_orig = batch.input_ids.shape
        if batch.cu_seqlens is not None:
            batch = _check_packed(batch)
        if cp == 1:
            batch = _pad_to_multiple(batch, tp if sp else 1)
        s = batch.input_ids.shape[1]
        position_ids = self.position_ids(batch)  # on the host for host batches: per-sample loops over the grids
        host_ids = batch.input_ids.cpu() if self.pre_process else None
        split = None
        if cp > 1:
            # Position ids (and the visual placements below) come from the whole row; each rank keeps its slice.
            cp_rank = self.cp_group.rank()
            split = context_parallel.RowSplit.build(batch.cu_seqlens, s, cp, tp if sp else 1)
            ids, attention_mask, labels = context_parallel.local_inputs(batch, split, cp_rank)
            position_ids = split.take(position_ids, cp_rank, dim=2, fill=0)
            batch = replace(batch, input_ids=ids, attention_mask=attention_mask, labels=labels)
            s = split.n
        batch, position_ids = _to_device(batch, self.device), position_ids.to(self.device, non_blocking=True)
        if split is not None:
            mask = split.attention(cp_rank, self.cp_group, device=self.device)
        elif batch.cu_seqlens is not None:
            mask = packed_attention_segments(batch.cu_seqlens, s, device=self.device)
        else:
            mask = self._attention_mask(batch.attention_mask, s)
        attention = AttentionContext(mask, RotaryTables(self.rotary(position_ids), self.config.params_dtype))
        padding_mask = None if batch.attention_mask is None else ~batch.attention_mask.bool()
        if padding_mask is not None and sp:
            chunk = s // tp
            r = self.tp_group.rank()
            padding_mask = padding_mask[:, r * chunk:(r + 1) * chunk]

        deepstack = None
        if self.pre_process:
            hidden = self.embedding(batch.input_ids)  # [s/tp, b, h] under SP, else [b, s, h]
            if not sp:
                hidden = hidden.transpose(0, 1).contiguous()
            if vision_features is not None:
                visual = self._given_features(vision_features, host_ids)
            else:
                visual = self._visual_features(batch, host_ids)
            if visual is not None:
                visual_mask, merged, deep = visual
                if sp:
                    # Every TP rank ran the whole ViT but uses only its sequence slice of the features; summing
                    # the feature gradients over TP in backward gives every rank the full ViT gradient.
                    merged = tensor_parallel.copy_to_tensor_model_parallel_region(merged)
                    deep = [tensor_parallel.copy_to_tensor_model_parallel_region(d) for d in deep]
                if split is not None:  # every feature of the row is here: this rank places its slice's
                    scatter = context_parallel.visual_scatter(
                        visual_mask, split, cp_rank, sp_rank=self.tp_group.rank() if sp else 0,
                        sp_size=tp if sp else 1, device=self.device)
                else:
                    scatter = VisualScatter.from_mask(visual_mask, sp_rank=self.tp_group.rank() if sp else 0,
                                                      sp_size=tp if sp else 1, device=self.device)
                hidden = scatter.replace(hidden, merged)
                deepstack = DeepStackInputs(deep, scatter)
        else:
            hidden = None

        record = None
        if self.routing is not None and self.training and torch.is_grad_enabled():
            record = self.routing.for_microbatch(microbatch_index)
            record.coeff_scale = float(self.aux_loss_coeff * self.aux_loss_scale)
        hidden = self.decoder(hidden, attention_mask=attention, rotary_pos_emb=None,
                              padding_mask=padding_mask, deepstack=deepstack, routing_record=record)
        if record is not None:
            record.publish([layer.layer_number for layer in self.decoder.layers],
                           sp_group=self.stats_group, pp_group=self.pp_stats_group)

        if not self.post_process:
            return hidden
        weight = self.embedding.weight if (self.share_embeddings_and_output_weights and self.pre_process) else None
        if batch.labels is not None and self._chunked_loss():  # per-token losses, never the full logits
            labels = batch.labels
            if split is None and s_orig < s:  # drop the padding to a multiple of TP
                hidden, labels = hidden[:s_orig], labels[:, :s_orig]
            loss = token_losses(hidden, self.output_layer.weight if weight is None else weight,
                                labels.transpose(0, 1), IGNORE_INDEX, self.loss_chunk_tokens)
            return loss.transpose(0, 1).contiguous()
        logits, _ = self.output_layer(hidden, weight=weight)  # [s, b, V/tp]
        if split is not None:
            if batch.labels is None:  # logits of the whole row in its order on every CP rank
                return context_parallel.gather_row(logits, split, self.cp_group).transpose(0, 1).contiguous()
            labels = batch.labels  # per-token losses of this rank's slice [1, n] (see context_parallel)
        else:
            logits = logits[:s_orig]
            if batch.labels is None:
                return logits.transpose(0, 1).contiguous()
            labels = batch.labels[:, :s_orig]
        target = labels.transpose(0, 1).contiguous()
        ignore = target == IGNORE_INDEX
        target = target.masked_fill(ignore, 0)
        if tp == 1:
            # torch's fused log-softmax: two passes over the fp32 logits where megatron's vocab-parallel version
            # (needed only when the vocabulary is split) makes about six
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(),
                                                     reduction="none").view_as(target)
        else:
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), target)
        return loss.masked_fill(ignore, 0.0).transpose(0, 1).contiguous()


def parameter_part(name: str) -> str:
    """Which part a parameter of Qwen3VLMoeModel belongs to: "vision" (ViT patch/position embeddings and blocks),
    "merger" (the merger and the DeepStack mergers) or "language" (everything else). Wrapper prefixes allowed."""
    while name.startswith("module."):
        name = name[len("module."):]
    if name.startswith(("vision.merger.", "vision.deepstack_mergers.")):
        return "merger"
    return "vision" if name.startswith("vision.") else "language"


def build_model_chunks(args: Qwen3VLMoeArgs, layout: ParallelLayout, **kwargs) -> list[Qwen3VLMoeModel]:
    """This rank's model chunks: one per virtual pipeline stage (a single one without interleaving)."""
    if layout.vpp is None or layout.vpp == 1:
        return [Qwen3VLMoeModel(args, layout, **kwargs)]
    return [Qwen3VLMoeModel(args, layout, vp_stage=i, **kwargs) for i in range(layout.vpp)]


def packed_attention_segments(cu_seqlens: torch.Tensor, s: int, device=None) -> AttentionSegments | None:
    """Attention of a packed row of s tokens: causal within each sample, padding tokens alone (see
    `AttentionSegments.packed_row`); None (plain causal attention) for a single sample without padding."""
    if cu_seqlens.numel() == 2 and int(cu_seqlens[-1]) == s:
        return None
    return AttentionSegments.packed_row(cu_seqlens, s, device=device)


def _check_packed(batch: MultimodalInputs) -> MultimodalInputs:
    """Validate a packed micro-batch; fill in its attention_mask (1 before cu_seqlens[-1]) when not given."""
    b, s = batch.input_ids.shape
    cu = batch.cu_seqlens
    if b != 1:
        raise ValueError(f"a packed micro-batch (cu_seqlens set) must have batch size 1, got {b}.")
    if cu.dim() != 1 or cu.numel() < 1 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) > s:
        raise ValueError(f"cu_seqlens must be a 1-D sequence rising from 0 to at most {s}, got {cu.tolist()}.")
    real = (torch.arange(s, device=batch.input_ids.device) < int(cu[-1])).unsqueeze(0)
    if batch.attention_mask is None:
        return replace(batch, attention_mask=real.long())
    if not torch.equal(batch.attention_mask.bool(), real):
        raise ValueError("a packed micro-batch's attention_mask must be 1 exactly on the tokens before cu_seqlens[-1].")
    return batch


def _to_device(batch: MultimodalInputs, device: torch.device) -> MultimodalInputs:
    """The batch's tensors on `device`, except the host metadata read by Python loops (cu_seqlens, grids)."""
    moved = {}
    for name in ("input_ids", "attention_mask", "position_ids", "pixel_values", "pixel_values_videos", "labels"):
        t = getattr(batch, name)
        if t is not None and t.device != device:
            moved[name] = t.to(device, non_blocking=True)
    return replace(batch, **moved) if moved else batch


def _pad_to_multiple(batch: MultimodalInputs, multiple: int) -> MultimodalInputs:
    """Right-pad the sequence to a multiple of `multiple` (sequence parallelism splits it evenly).

    Padding sits after every real token, so causal attention keeps it invisible to them; its labels are ignored.
    """
    s = batch.input_ids.shape[1]
    pad = (-s) % multiple
    if pad == 0:
        return batch
    def right(t, value):
        return None if t is None else torch.nn.functional.pad(t, (0, pad), value=value)
    position_ids = batch.position_ids
    if position_ids is not None:
        position_ids = torch.cat([position_ids, position_ids[..., -1:].expand(-1, -1, pad)], dim=-1)
    attention_mask = batch.attention_mask
    if attention_mask is not None:
        attention_mask = right(attention_mask, 0)
    return MultimodalInputs(
        input_ids=right(batch.input_ids, 0), attention_mask=attention_mask, position_ids=position_ids,
        pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
        pixel_values_videos=batch.pixel_values_videos, video_grid_thw=batch.video_grid_thw,
        labels=right(batch.labels, IGNORE_INDEX), cu_seqlens=batch.cu_seqlens,
    )
