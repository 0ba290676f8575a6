"""Model arguments derived from an HF `config.json`, and the megatron TransformerConfigs built from them.

Nothing here is hand-typed per model size: the presets are the released config files (flavors/*.json) and the
`debug` flavor is the tiny config the tests use. Both key spellings are accepted: the released files
(transformers 4.57: `text_config.num_experts`, `rope_scaling` + `rope_theta`) and transformers 5.x
(`num_local_experts`, `rope_parameters`).
"""

from __future__ import annotations

import copy

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

FLAVOR_DIR = Path(__file__).parent / "flavors"
FLAVORS = ("debug", "qwen3_vl_30b_a3b", "qwen3_vl_235b_a22b")


class ModelConfigError(ValueError):
    """A config.json this model cannot be built from; the message names the key and the fix."""


@dataclass(frozen=True)
class TextArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    mrope_interleaved: bool = True
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    attention_bias: bool = False


@dataclass(frozen=True)
class VisionArgs:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str = "gelu_pytorch_tanh"
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merged_hidden_size(self) -> int:
        return self.hidden_size * self.spatial_merge_size**2


@dataclass(frozen=True)
class Qwen3VLMoeArgs:
    """Everything that decides the architecture, read from an HF config.json."""

    text: TextArgs
    vision: VisionArgs
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    tie_word_embeddings: bool = False
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("hf_config")
        return d


def _get(d: dict, *names: str, where: str, default: Any = ...):
    for name in names:
        if name in d and d[name] is not None:
            return d[name]
    if default is ...:
        raise ModelConfigError(f"config.json: {where} has no {' / '.join(names)}; the file is not a Qwen3-VL MoE config.")
    return default


def args_from_hf_config(cfg: dict | Any) -> Qwen3VLMoeArgs:
    """Parse a Qwen3-VL MoE config (dict from config.json, or a transformers config object)."""
    if not isinstance(cfg, dict):
        cfg = cfg.to_dict()
    model_type = cfg.get("model_type")
    if model_type != "qwen3_vl_moe":
        raise ModelConfigError(
            f"config.json: model_type={model_type!r}, expected 'qwen3_vl_moe' (a Qwen3-VL MoE checkpoint)."
        )
    t = cfg.get("text_config") or {}
    v = cfg.get("vision_config") or {}
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", t.get("rope_theta"))
    if rope_theta is None:
        raise ModelConfigError("config.json: text_config has no rope_theta (nor rope_parameters.rope_theta).")
    mrope_section = rope.get("mrope_section")
    if not mrope_section:
        raise ModelConfigError("config.json: text_config.rope_scaling/rope_parameters has no mrope_section.")
    num_heads = _get(t, "num_attention_heads", where="text_config")
    hidden = _get(t, "hidden_size", where="text_config")
    head_dim = t.get("head_dim") or hidden // num_heads
    if t.get("mlp_only_layers"):
        raise ModelConfigError(
            "config.json: text_config.mlp_only_layers is not empty; dense layers inside the MoE stack are not "
            "supported (the released Qwen3-VL MoE models have none)."
        )
    if int(t.get("decoder_sparse_step", 1)) != 1:
        raise ModelConfigError("config.json: text_config.decoder_sparse_step must be 1 (every layer MoE).")
    if sum(mrope_section) * 2 != head_dim:
        raise ModelConfigError(
            f"config.json: mrope_section {mrope_section} sums to {sum(mrope_section)}, must be head_dim/2 = {head_dim // 2}."
        )
    text = TextArgs(
        vocab_size=_get(t, "vocab_size", where="text_config"),
        hidden_size=hidden,
        num_hidden_layers=_get(t, "num_hidden_layers", where="text_config"),
        num_attention_heads=num_heads,
        num_key_value_heads=_get(t, "num_key_value_heads", where="text_config", default=num_heads),
        head_dim=head_dim,
        moe_intermediate_size=_get(t, "moe_intermediate_size", where="text_config"),
        num_experts=_get(t, "num_experts", "num_local_experts", where="text_config"),
        num_experts_per_tok=_get(t, "num_experts_per_tok", where="text_config"),
        rms_norm_eps=float(_get(t, "rms_norm_eps", where="text_config", default=1e-6)),
        rope_theta=float(rope_theta),
        mrope_section=tuple(int(x) for x in mrope_section),
        mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
        norm_topk_prob=bool(t.get("norm_topk_prob", True)),
        router_aux_loss_coef=float(t.get("router_aux_loss_coef", 0.001)),
        hidden_act=t.get("hidden_act", "silu"),
        initializer_range=float(t.get("initializer_range", 0.02)),
        attention_bias=bool(t.get("attention_bias", False)),
    )
    if not text.norm_topk_prob:
        raise ModelConfigError("config.json: text_config.norm_topk_prob=false is not supported (Qwen3-VL uses true).")
    if text.attention_bias:
        raise ModelConfigError("config.json: text_config.attention_bias=true is not supported (Qwen3-VL has none).")
    if text.hidden_act != "silu":
        raise ModelConfigError(f"config.json: text_config.hidden_act={text.hidden_act!r}; only 'silu' is supported.")
    patch = v.get("patch_size", 16)
    tpatch = v.get("temporal_patch_size", 2)
    vision = VisionArgs(
        depth=_get(v, "depth", "num_hidden_layers", where="vision_config"),
        hidden_size=_get(v, "hidden_size", where="vision_config"),
        intermediate_size=_get(v, "intermediate_size", where="vision_config"),
        num_heads=_get(v, "num_heads", "num_attention_heads", where="vision_config"),
        out_hidden_size=_get(v, "out_hidden_size", where="vision_config"),
        patch_size=int(patch[0] if isinstance(patch, (list, tuple)) else patch),
        temporal_patch_size=int(tpatch[0] if isinstance(tpatch, (list, tuple)) else tpatch),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        in_channels=int(v.get("in_channels", 3)),
        num_position_embeddings=int(_get(v, "num_position_embeddings", where="vision_config")),
        deepstack_visual_indexes=tuple(int(i) for i in v.get("deepstack_visual_indexes", ())),
        hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
        initializer_range=float(v.get("initializer_range", 0.02)),
    )
    if vision.out_hidden_size != text.hidden_size:
        raise ModelConfigError(
            f"config.json: vision_config.out_hidden_size={vision.out_hidden_size} must equal text_config.hidden_size="
            f"{text.hidden_size}."
        )
    if any(not 0 <= i < vision.depth for i in vision.deepstack_visual_indexes):
        raise ModelConfigError(
            f"config.json: vision_config.deepstack_visual_indexes {list(vision.deepstack_visual_indexes)} must lie in "
            f"0..{vision.depth - 1}."
        )
    if len(vision.deepstack_visual_indexes) > text.num_hidden_layers:
        raise ModelConfigError("config.json: more DeepStack taps than LLM layers.")
    side = int(round(vision.num_position_embeddings**0.5))
    if side * side != vision.num_position_embeddings:
        raise ModelConfigError("config.json: vision_config.num_position_embeddings must be a square number.")
    return Qwen3VLMoeArgs(
        text=text,
        vision=vision,
        image_token_id=int(_get(cfg, "image_token_id", where="config")),
        video_token_id=int(_get(cfg, "video_token_id", where="config")),
        vision_start_token_id=int(_get(cfg, "vision_start_token_id", where="config")),
        vision_end_token_id=int(_get(cfg, "vision_end_token_id", where="config")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        hf_config=cfg,
    )


def load_hf_config(path: str | Path) -> dict:
    """Read config.json from a file or an HF directory."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ModelConfigError(f"{p} does not exist; pass an HF model directory (with its config.json).")
    try:
        with open(p) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"{p}: not a JSON config ({e}); pass an HF model directory or its config.json.") from None
    if not isinstance(config, dict):
        raise ModelConfigError(f"{p}: not a JSON object; pass an HF model directory or its config.json.")
    return config


def released_config_dict(config) -> dict:
    """Return ``config`` (a ``Qwen3VLMoeConfig``) as a dict spelled like the released ``config.json``.

    The released files come from transformers 4.57: ``text_config.num_experts`` (not ``num_local_experts``),
    ``text_config.rope_scaling`` = {rope_type, mrope_section, mrope_interleaved} plus ``text_config.rope_theta``
    (not ``rope_parameters``), no vision ``rope_parameters``, and ``vision_config.model_type`` "qwen3_vl_moe".
    transformers 5 reads this spelling back into an equal config.
    """
    if isinstance(config, dict):
        from transformers import Qwen3VLMoeConfig

        config = Qwen3VLMoeConfig(**copy.deepcopy(config))
    d = json.loads(config.to_json_string(use_diff=True))
    text = d["text_config"]
    if "num_local_experts" in text:
        text["num_experts"] = text.pop("num_local_experts")
    rope = dict(text.pop("rope_parameters", None) or {})
    if rope:
        text["rope_theta"] = rope.pop("rope_theta")
        text["rope_scaling"] = rope
    for key in ("sliding_window",):
        text.pop(key, None)
    vision = d["vision_config"]
    vision.pop("rope_parameters", None)
    vision["model_type"] = "qwen3_vl_moe"
    d["architectures"] = ["Qwen3VLMoeForConditionalGeneration"]
    dtype = d.pop("dtype", None) or text.get("dtype")
    if dtype is not None:
        text["dtype"] = str(dtype).replace("torch.", "")
    return d


def flavor_hf_config(name: str) -> dict:
    """The HF config dict of a named flavor: 'debug' (tiny, for tests and the demo) or a released preset."""
    if name == "debug":
        from qwenvl_mcore.models.qwen3_vl_moe.debug_assets import tiny_hf_config

        return tiny_hf_config().to_dict()
    if name not in FLAVORS:
        raise ModelConfigError(f"unknown model flavor {name!r}; choose one of {', '.join(FLAVORS)}.")
    return load_hf_config(FLAVOR_DIR / f"{name}.json")


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def _common_config_kwargs(layout, *, dtype: torch.dtype, init_std: float) -> dict:
    on_cpu = not torch.cuda.is_available()
    return dict(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=on_cpu,
        init_method_std=init_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # Batched p2p ends with torch.cuda.synchronize(); gloo on the CPU sends one tensor at a time instead.
        batch_p2p_comm=not on_cpu,
    )


def language_transformer_config(args: Qwen3VLMoeArgs, layout, *, dtype: torch.dtype = torch.float32, **overrides):
    """megatron TransformerConfig of the MoE language model (fp32 router, softmax-then-renormalised top-k), with
    this project's MoE setting `moe_local_dispatcher` (default True; see `moe_dispatcher`)."""
    from qwenvl_mcore.models.qwen3_vl_moe.dispatch import LanguageTransformerConfig

    t = args.text
    on_gpu = torch.cuda.is_available()
    kwargs = _common_config_kwargs(layout, dtype=dtype, init_std=t.initializer_range)
    kwargs.update(
        num_layers=t.num_hidden_layers,
        hidden_size=t.hidden_size,
        ffn_hidden_size=t.moe_intermediate_size,
        num_attention_heads=t.num_attention_heads,
        num_query_groups=t.num_key_value_heads,
        kv_channels=t.head_dim,
        # uneven pipeline stages (ParallelLayout.stage_layers follows megatron's placement of these)
        num_layers_in_first_pipeline_stage=layout.first_stage_layers if layout.pp > 1 else None,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers if layout.pp > 1 else None,
        normalization="RMSNorm",
        layernorm_epsilon=t.rms_norm_eps,
        qk_layernorm=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        sequence_parallel=layout.sequence_parallel,
        num_moe_experts=t.num_experts,
        moe_ffn_hidden_size=t.moe_intermediate_size,
        moe_router_topk=t.num_experts_per_tok,
        # top-k over logits then softmax over the k == softmax over all, top-k, renormalise (norm_topk_prob).
        moe_router_pre_softmax=False,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        # The aux loss follows transformers' formula and is computed by our router (layers.Qwen3VLRouter).
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        # Layers with EP = expert-TP = 1 use the project's dispatcher (moe_dispatcher below); the others megatron's:
        # alltoall needs CUDA streams; allgather (CPU) needs the same token count on every rank of an EP group,
        # i.e. micro-batches of one length on every data-parallel rank (the trainer pads to a fixed length).
        moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
        moe_local_dispatcher=True,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        # Pipeline stages exchange activation shapes first, so micro-batches may differ in length (alltoall only).
        variable_seq_lengths=layout.pp > 1 and on_gpu,
    )
    kwargs.update(overrides)
    return LanguageTransformerConfig(**kwargs)


def moe_dispatcher(config, ep_size: int, expert_tp_size: int) -> str:
    """The token dispatcher of an MoE layer: "local" (dispatch.LocalTokenDispatcher: no host sync, fixed shapes, no
    atomics) where `config.moe_local_dispatcher` is set, the layer's experts all live on its rank (expert-parallel
    and expert-tensor-parallel size 1, any attention TP/SP/CP) and no megatron feature it does not implement is on
    (drop-and-pad to capacity, shared-expert overlap); else megatron's `config.moe_token_dispatcher_type`."""
    if (getattr(config, "moe_local_dispatcher", False) and ep_size == 1 and expert_tp_size == 1
            and not config.moe_pad_expert_input_to_capacity and not config.moe_shared_expert_overlap):
        return "local"
    return config.moe_token_dispatcher_type


def vision_transformer_config(args: Qwen3VLMoeArgs, layout, *, dtype: torch.dtype = torch.float32, **overrides):
    """megatron TransformerConfig of the ViT blocks: LayerNorm, biased qkv/MLP, gelu(tanh); shares the LLM's TP.

    The ViT does not use sequence parallelism: its sequence (patches of this micro-batch's media) is replicated
    across TP ranks and each block's activations are reduced by the row-parallel layers.
    """
    from megatron.core.transformer import TransformerConfig

    v = args.vision
    if v.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
        raise ModelConfigError(f"config.json: vision_config.hidden_act={v.hidden_act!r} is not supported.")
    kwargs = _common_config_kwargs(layout, dtype=dtype, init_std=v.initializer_range)
    kwargs.update(
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1,
        expert_tensor_parallel_size=1,
        num_layers=v.depth,
        hidden_size=v.hidden_size,
        ffn_hidden_size=v.intermediate_size,
        num_attention_heads=v.num_heads,
        num_query_groups=v.num_heads,
        kv_channels=v.head_dim,
        normalization="LayerNorm",
        layernorm_epsilon=1e-6,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=_gelu_tanh if v.hidden_act == "gelu_pytorch_tanh" else torch.nn.functional.gelu,
        sequence_parallel=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
