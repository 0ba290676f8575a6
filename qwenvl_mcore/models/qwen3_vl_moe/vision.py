"""The Qwen3-VL vision tower on megatron-core: Conv3d patch embedding, learned positions resampled to each grid,
ViT blocks as a megatron `TransformerBlock` (local spec, TP over heads / MLP), a 2x2 patch merger and the DeepStack
mergers. Numerically it follows transformers' `Qwen3VLMoeVisionModel` (5.x). At TP=1 the blocks and mergers run
on plain torch ops over the same parameters (vision_blocks.py, `VisionModel.block_impl`); the grid tables are built
on the host and copied without waiting.

Patch order: `pixel_values` rows come from the processor grouped by spatial-merge blocks (per image, per frame: the
`merge x merge` blocks in row-major order, the patches of a block row-major), so four consecutive patches form one
merged token. Everything computed per patch here (positions, rotary angles, attention segments) uses that order.

Tensor parallelism: the ViT sequence is replicated on every TP rank (no sequence parallelism); heads, MLP and merger
widths are split by megatron's column/row-parallel linears, whose all-reduces leave every output identical on all
TP ranks. The patch embedding, position table and norms are replicated.
"""

from __future__ import annotations

from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from qwenvl_mcore.models.qwen3_vl_moe.config import Qwen3VLMoeArgs
from qwenvl_mcore.models.qwen3_vl_moe.attention import (
    AttentionContext,
    AttentionSegments,
    RotaryTables,
    SDPAttention,
    SegmentSelfAttention,
)
from qwenvl_mcore.models.qwen3_vl_moe.layers import Norm
from qwenvl_mcore.models.qwen3_vl_moe.rope import to_device, vision_patch_positions, vision_rotary_angles
from qwenvl_mcore.models.qwen3_vl_moe.vision_blocks import (
    BLOCK_IMPLS,
    plain_blocks_forward,
    plain_merger_forward,
    plain_path_problem,
)

__all__ = [
    "VisionModel",
    "PatchEmbed",
    "PatchMerger",
    "vision_layer_spec",
    "vision_cu_seqlens",
    "vision_segments",
    "interpolated_position_embeddings",
]

# transformers' PatchMerger LayerNorms use eps 1e-6 (hard-coded there, not a config value).
_MERGER_NORM_EPS = 1e-6


def vision_layer_spec() -> ModuleSpec:
    """Megatron spec of one ViT block (pre-norm LayerNorm, biased qkv/proj, non-gated MLP), local modules only.

    Parameter names: input_layernorm.{weight,bias}, self_attention.linear_qkv.{weight,bias} (megatron's per-head
    [q_h; k_h; v_h] row layout), self_attention.linear_proj.*, pre_mlp_layernorm.*, mlp.linear_fc1.*,
    mlp.linear_fc2.*. Attention is bidirectional within the `AttentionSegments` passed to forward.
    """
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=SegmentSelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=partial(
                MLP.as_mlp_submodule,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _grid_list(grid_thw) -> list[tuple[int, int, int]]:
    """(t, h, w) per image/video as Python ints. `grid_thw`: a [n, 3] tensor (read once; a tensor on a GPU costs
    one device sync, one on the host none) or a sequence of triples (already on the host)."""
    if isinstance(grid_thw, torch.Tensor):
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"grid_thw must be [n, 3] (t, h, w per image/video), got shape {tuple(grid_thw.shape)}")
        rows = grid_thw.tolist()
    else:
        rows = [tuple(r) for r in grid_thw]
        if any(len(r) != 3 for r in rows):
            raise ValueError(f"grid_thw must hold (t, h, w) triples, got {rows!r}")
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def _grid_device(grid_thw, device):
    if device is not None:
        return device
    return grid_thw.device if isinstance(grid_thw, torch.Tensor) else torch.device("cpu")


def vision_cu_seqlens(grid_thw) -> torch.Tensor:
    """int32 [num_segments + 1] boundaries of the ViT attention segments: one segment of h*w patches per frame of
    each image / video (t segments for a grid with temporal size t), in patch order, starting at 0."""
    return vision_segments(grid_thw).cu_seqlens


def vision_segments(grid_thw, device: torch.device | str | None = None) -> AttentionSegments:
    """The ViT's attention segments (bidirectional): a patch attends exactly to the patches of its own frame of its
    own image/video (see `vision_cu_seqlens`), as transformers' ViT does. Built on the host, the boundaries copied
    to `device` (default: the grid's) without waiting."""
    lengths = [h * w for t, h, w in _grid_list(grid_thw) for _ in range(t)]
    segments = AttentionSegments.from_lengths(lengths, causal=False)
    segments.cu_seqlens = to_device(segments.cu_seqlens, _grid_device(grid_thw, device))
    return segments


@lru_cache(maxsize=4096)
def _frame_position_taps(h: int, w: int, side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps [h*w, 4] (long rows of the side x side table) and weights [h*w, 4] (float32) of one h x w
    frame, in patch order, on the host (cached per frame size: read-only)."""
    pos = vision_patch_positions([(1, h, w)], merge)  # [h*w, 2] (row, col), host
    n = pos.shape[0]
    heights = torch.full((n,), h, dtype=torch.long)
    widths = torch.full((n,), w, dtype=torch.long)

    def axis(index: torch.Tensor, size: torch.Tensor):
        # Source coordinate on the table; clamp(size-1, min=1) keeps a 1-patch axis at coordinate 0.
        src = index.to(torch.float32) * (side - 1) / torch.clamp(size - 1, min=1)
        lo = torch.floor(src)
        frac = src - lo
        lo = lo.long()
        hi = (lo + 1).clamp(max=side - 1)  # at the last row the upper tap has weight 0
        return lo, hi, 1 - frac, frac

    r0, r1, wr0, wr1 = axis(pos[:, 0], heights)
    c0, c1, wc0, wc1 = axis(pos[:, 1], widths)
    taps = torch.stack((r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1), dim=1)  # [n, 4]
    weights = torch.stack((wr0 * wc0, wr0 * wc1, wr1 * wc0, wr1 * wc1), dim=1)  # [n, 4] float32
    return taps, weights


def interpolated_position_embeddings(table: torch.Tensor, grid_thw, spatial_merge_size: int) -> torch.Tensor:
    """Learned positions [N, hidden] (float32 when `table` is lower precision) for every patch, in patch order.

    `table` is the [side*side, hidden] learned grid. Each image's h x w patch grid is sampled from it bilinearly with
    corner alignment (patch row r maps to r*(side-1)/(h-1) on the table; likewise columns), the same taps and
    weights as transformers' `get_vision_interpolation_indices_and_weights(mode="bilinear", align_corners=True)`.
    All frames of a video get the same positions. The weights are float32 and the weighted sum is taken in the
    promoted dtype, as transformers does, before the caller casts to the activation dtype.

    The taps and weights are computed on the host from the grid (a list, or a tensor read once) and copied to the
    table's device without waiting: no device sync when the grid is on the host.
    """
    side = int(round(table.shape[0] ** 0.5))
    if side * side != table.shape[0]:
        raise ValueError(f"position table has {table.shape[0]} rows, not a square number")
    frames = [_frame_position_taps(h, w, side, spatial_merge_size)
              for t, h, w in _grid_list(grid_thw) for _ in range(t)]
    if not frames:
        return table.new_zeros(0, table.shape[1], dtype=torch.promote_types(table.dtype, torch.float32))
    taps = to_device(torch.cat([f[0] for f in frames]), table.device)
    weights = to_device(torch.cat([f[1] for f in frames]), table.device)
    return (F.embedding(taps, table) * weights[:, :, None]).sum(1)


class PatchEmbed(torch.nn.Module):
    """Conv3d with kernel = stride = (T, P, P) over each patch: [N, C*T*P*P] -> [N, hidden] (parameter dtype;
    the pixels are cast to it first, as transformers does)."""

    def __init__(self, in_channels: int, hidden_size: int, kernel: tuple[int, int, int], *, device=None, dtype=None):
        super().__init__()
        self.in_channels, self.kernel, self.hidden_size = in_channels, kernel, hidden_size
        self.proj = torch.nn.Conv3d(
            in_channels, hidden_size, kernel_size=kernel, stride=kernel, bias=True, device=device, dtype=dtype
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.reshape(-1, self.in_channels, *self.kernel).to(self.proj.weight.dtype)
        return self.proj(x).reshape(-1, self.hidden_size)


class PatchMerger(MegatronModule):
    """Folds each 2x2 block of patches (4 consecutive rows) into one token and projects it to the LLM width.

    `postshuffle_norm=False` (the final merger): LayerNorm over `hidden` on every patch, then concatenate the 4.
    `postshuffle_norm=True` (DeepStack mergers): concatenate first, LayerNorm over 4*hidden.
    Then linear_fc1 (column-parallel 4h->4h) -> exact GELU -> linear_fc2 (row-parallel 4h->out, all-reduced).
    forward: [N, hidden] -> [N/4, out_hidden], identical on every TP rank.
    """

    def __init__(self, config: TransformerConfig, *, out_hidden_size: int, merge_unit: int, postshuffle_norm: bool):
        super().__init__(config=config)
        self.hidden_size = config.hidden_size
        self.merged_size = config.hidden_size * merge_unit
        self.postshuffle_norm = postshuffle_norm
        self.norm = Norm(config, self.merged_size if postshuffle_norm else self.hidden_size, eps=_MERGER_NORM_EPS)
        self.linear_fc1 = ColumnParallelLinear(
            self.merged_size, self.merged_size, config=config, init_method=config.init_method, bias=True,
            gather_output=False, skip_bias_add=False,
        )
        self.linear_fc2 = RowParallelLinear(
            self.merged_size, out_hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.hidden_size)
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged_size))
        else:
            x = self.norm(x).reshape(-1, self.merged_size)
        x = x.unsqueeze(1)  # megatron linears take [s, b, h]
        x, _ = self.linear_fc1(x)
        x = F.gelu(x)  # exact (erf) GELU: transformers uses nn.GELU() here, unlike the blocks' tanh GELU
        x, _ = self.linear_fc2(x)
        return x.squeeze(1)


class VisionModel(MegatronModule):
    """Qwen3-VL ViT. forward(pixel_values [N, C*T*P*P], grid_thw Long [n, 3]) ->
    (merged [N/4, out_hidden], deepstack: list of [N/4, out_hidden], one per DeepStack block in block order).

    `config` is `vision_transformer_config(args, layout)`. `pixel_values` rows are patches in the processor's order
    (see the module docstring); N must equal sum(t*h*w) of `grid_thw`, with h and w divisible by the merge size.
    Outputs are in the dtype of the parameters and identical on all TP ranks.

    `grid_thw` may stay on the host (a CPU tensor or a list of (t, h, w)): every grid table (positions, rotary
    angles, attention segments) is then built on the host and copied to the device without waiting, so the tower
    never syncs; a grid on the GPU is read back once.

    `block_impl` (attribute, default "auto"): how the blocks and mergers run, see vision_blocks.py. "auto" runs
    them on plain torch ops over these same parameters at TP=1 ("torch") and through megatron's modules otherwise;
    "torch_exact" replays megatron's op order bit for bit; "megatron" always uses megatron's modules.
    """

    block_impl: str = "auto"

    def __init__(self, args: Qwen3VLMoeArgs, config: TransformerConfig):
        super().__init__(config=config)
        v = args.vision
        self.vision_args = v
        self.spatial_merge_size = v.spatial_merge_size
        self.merge_unit = v.spatial_merge_size**2
        self.patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
        self.rope_theta = _vision_rope_theta(args)
        self.deepstack_visual_indexes = tuple(v.deepstack_visual_indexes)
        if config.hidden_size != v.hidden_size or config.num_layers != v.depth:
            raise ValueError("VisionModel: config must be vision_transformer_config(args, ...) of the same args.")
        if config.sequence_parallel:
            raise ValueError("VisionModel: the ViT does not use sequence parallelism (its sequence is replicated).")

        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        kernel = (v.temporal_patch_size, v.patch_size, v.patch_size)
        # Replicated (not TP-split): small, and its input is the full patch sequence on every rank.
        self.patch_embed = PatchEmbed(
            v.in_channels, v.hidden_size, kernel, device=device, dtype=config.params_dtype
        )
        self.pos_embed = torch.nn.Embedding(
            v.num_position_embeddings, v.hidden_size, device=device, dtype=config.params_dtype
        )
        if config.perform_initialization:
            with torch.no_grad():
                config.init_method(self.patch_embed.proj.weight)
                self.patch_embed.proj.bias.zero_()
                config.init_method(self.pos_embed.weight)

        self.decoder = TransformerBlock(
            config=config, spec=vision_layer_spec(), post_layer_norm=False, pre_process=True, post_process=False
        )
        self.merger = PatchMerger(
            config, out_hidden_size=v.out_hidden_size, merge_unit=self.merge_unit, postshuffle_norm=False
        )
        self.deepstack_mergers = torch.nn.ModuleList(
            PatchMerger(config, out_hidden_size=v.out_hidden_size, merge_unit=self.merge_unit, postshuffle_norm=True)
            for _ in self.deepstack_visual_indexes
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """megatron's default, except that each DeepStack merger declares its own TP sharding (the default treats
        an nn.ModuleList as replicated, which would store each TP rank's half as the whole tensor)."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, sharded_state_dict_default

        assert not self._parameters, "VisionModel keeps its parameters in submodules"
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        # Passed explicitly: for plain torch modules (patch embedding, position table) megatron 0.19.2 otherwise
        # gives every TP rank replica id 0 of the replicated tensors, which its load rejects.
        tp_group = parallel_state.get_tensor_model_parallel_group()
        sd = {}
        for name, module in self.named_children():
            if name == "deepstack_mergers":
                for i, merger in enumerate(module):
                    sd.update(merger.sharded_state_dict(f"{prefix}{name}.{i}.", sharded_offsets, metadata))
            else:
                sd.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                     tp_group=tp_group))
        return sd

    def embed_patches(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """Patch embedding + interpolated learned positions: [N, C*T*P*P] -> [N, hidden] (parameter dtype)."""
        x = self.patch_embed(pixel_values)
        pos = interpolated_position_embeddings(self.pos_embed.weight, grid_thw, self.spatial_merge_size)
        return x + pos.to(x.dtype)

    def blocks_impl(self) -> str:
        """The implementation `block_impl` selects now: "torch", "torch_exact" or "megatron" (see vision_blocks).
        "auto" is "torch" when `plain_path_problem` finds nothing, else "megatron"; "torch"/"torch_exact" where it
        finds something is an error naming it."""
        if self.block_impl not in BLOCK_IMPLS:
            raise ValueError(f"VisionModel.block_impl={self.block_impl!r}: choose one of {', '.join(BLOCK_IMPLS)}")
        if self.block_impl == "megatron":
            return "megatron"
        problem = plain_path_problem(self.config, self.decoder.layers)
        if problem is None:
            return "torch" if self.block_impl == "auto" else self.block_impl
        if self.block_impl == "auto":
            return "megatron"
        raise ValueError(f"VisionModel.block_impl={self.block_impl!r} cannot run this ViT: {problem}; "
                         f"use block_impl='auto' or 'megatron'.")

    def forward(self, pixel_values: torch.Tensor, grid_thw):
        grids = _grid_list(grid_thw)  # the one host read of the grid (none when it is on the host)
        self._check_inputs(pixel_values, grids)
        hidden = self.embed_patches(pixel_values, grids)
        rotary = vision_rotary_angles(
            grids, head_dim=self.vision_args.head_dim, spatial_merge_size=self.spatial_merge_size,
            theta=self.rope_theta, device=hidden.device,
        )
        attention = AttentionContext(vision_segments(grids, hidden.device), RotaryTables(rotary, hidden.dtype))

        # The block returns the outputs of the requested layers in layer order; transformers pairs each with the
        # merger at that layer's position in deepstack_visual_indexes.
        taps = sorted(set(self.deepstack_visual_indexes))
        impl = self.blocks_impl()
        if impl == "megatron":
            out = self.decoder(
                hidden_states=hidden.unsqueeze(1), attention_mask=attention, rotary_pos_emb=None,
                extract_layer_indices=set(taps),
            )
            hidden, intermediates = out if taps else (out, [])
            hidden, intermediates = hidden.squeeze(1), [h.squeeze(1) for h in intermediates]

            def merge(merger, x):
                return merger(x)
        else:
            exact = impl == "torch_exact"
            hidden, intermediates = plain_blocks_forward(self.decoder, hidden, attention, taps, exact=exact)

            def merge(merger, x):
                return plain_merger_forward(merger, x, exact=exact)
        deepstack = [
            merge(self.deepstack_mergers[self.deepstack_visual_indexes.index(layer)], h)
            for layer, h in zip(taps, intermediates)
        ]
        merged = merge(self.merger, hidden)
        return merged, deepstack

    def _check_inputs(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> None:
        m = self.spatial_merge_size
        for t, h, w in grids:
            if t < 1 or h % m or w % m or h < 1 or w < 1:
                raise ValueError(f"grid (t={t}, h={h}, w={w}): sizes must be positive and h, w divisible by {m}")
        n = sum(t * h * w for t, h, w in grids)
        if pixel_values.dim() != 2 or pixel_values.shape != (n, self.patch_dim):
            raise ValueError(
                f"pixel_values must be [{n}, {self.patch_dim}] (sum t*h*w of grid_thw, C*T*P*P), "
                f"got {tuple(pixel_values.shape)}"
            )


def _vision_rope_theta(args: Qwen3VLMoeArgs) -> float:
    """The ViT's rotary base: vision_config.rope_parameters.rope_theta (or rope_theta), else transformers' 1e4."""
    v = (args.hf_config or {}).get("vision_config") or {}
    rope = v.get("rope_parameters") or {}
    return float(rope.get("rope_theta") or v.get("rope_theta") or 10000.0)
