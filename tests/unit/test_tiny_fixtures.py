"""Tests of the tiny local Qwen3-VL MoE stand-ins in ``qwenvl_mcore.testing.tiny``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwenvl_mcore.testing import tiny
from qwenvl_mcore.testing.tiny import (
    EXPERT_LAYOUTS,
    QWEN_SPECIAL_TOKENS,
    SAMPLE_KINDS,
    build_processor,
    build_tiny_hf_model,
    build_tokenizer,
    hf_reference_forward,
    sample_inputs,
    save_tiny_hf_checkpoint,
    tiny_hf_config,
)

MERGE = 2


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return build_processor(tokenizer)


@pytest.fixture(scope="module")
def config(tokenizer):
    return tiny_hf_config(tokenizer)


@pytest.fixture(scope="module")
def model(config):
    return build_tiny_hf_model(config, seed=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """One saved checkpoint directory per expert layout (seed 0, fp32, default config)."""
    root = tmp_path_factory.mktemp("tiny_ckpt")
    return {
        layout: save_tiny_hf_checkpoint(root / layout, expert_layout=layout, tokenizer=tokenizer)
        for layout in EXPERT_LAYOUTS
    }


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ------------------------------------------------------------------------------------------------------------------


def test_tokenizer_roundtrip_and_atomic_special_tokens(tokenizer):
    """Text (ASCII, digits, unicode) round-trips; each special token is one id, also inside running text."""
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Numbers 0123 and 3.14, tabs\tand\nnewlines.",
        "Unicode: naïve café, 漢字, emoji 🙂!",
        "  leading and trailing spaces  ",
    ]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        assert tokenizer.decode(ids) == text
    for tok in QWEN_SPECIAL_TOKENS:
        ids = tokenizer(tok)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(tok)], tok
        embedded = tokenizer(f"a picture{tok}of a dog")["input_ids"]
        assert embedded.count(ids[0]) == 1
        assert tokenizer.decode(embedded) == f"a picture{tok}of a dog"
    # digits split one by one, as Qwen does
    assert tokenizer.tokenize("2025") == ["2", "0", "2", "5"]


def test_tokenizer_vocab_and_special_ids(tokenizer):
    """Vocab holds the 256 byte tokens + merges (400-1000 in all); pad/eos as Qwen; specials have the top ids."""
    vocab = tokenizer.get_vocab()
    assert 400 <= len(tokenizer) <= 1000
    from tokenizers import pre_tokenizers

    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token is None
    assert tokenizer.padding_side == "right"
    special_ids = [tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS]
    assert special_ids == list(range(len(tokenizer) - len(QWEN_SPECIAL_TOKENS), len(tokenizer)))
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    assert all(added.get(t) is True for t in QWEN_SPECIAL_TOKENS)
    ids = tokenizer("<|im_start|>user\nhi<|box_start|>x<|im_end|>")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhix"


def test_tokenizer_is_deterministic(tokenizer):
    """Retraining the BPE from scratch gives the identical tokenizer (vocab, merges, added tokens)."""
    retrained = tiny._tokenizer_json.__wrapped__()
    assert retrained == tiny._tokenizer_json()
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_chat_template_matches_qwen_format(tokenizer):
    """Chat template: `<|im_start|>{role}\\n{content}<|im_end|>\\n`, vision triples in place, generation prompt."""
    conv = [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Look at this and"},
                {"type": "video"},
                {"type": "text", "text": "."},
            ],
        },
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": "Thanks!"},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Look at this and"
        "<|vision_start|><|video_pad|><|vision_end|>.<|im_end|>\n"
        "<|im_start|>assistant\nA circle.<|im_end|>\n"
        "<|im_start|>user\nThanks!<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(conv, tokenize=False) == expected
    assert (
        tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        == expected + "<|im_start|>assistant\n"
    )
    labelled = tokenizer.apply_chat_template(conv[1:2], tokenize=False, add_vision_id=True)
    assert "Picture 1: <|vision_start|><|image_pad|>" in labelled
    assert "Video 1: <|vision_start|><|video_pad|>" in labelled


def test_processor_apply_chat_template_with_media(processor):
    """`processor.apply_chat_template(tokenize=True)` takes PIL images / numpy videos in the content items."""
    video = tiny.sample_video()
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": tiny.sample_image()},
                {"type": "video", "video": video},
                {"type": "text", "text": "What happens?"},
            ],
        }
    ]
    out = processor.apply_chat_template(
        conv,
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
        return_tensors="pt",
        processor_kwargs={"video_metadata": [tiny.sample_video_metadata(video)], "do_sample_frames": False},
    )
    ids = out["input_ids"][0]
    assert int((ids == processor.image_token_id).sum()) == int(out["image_grid_thw"].prod(-1).sum()) // MERGE**2
    assert int((ids == processor.video_token_id).sum()) == int(out["video_grid_thw"].prod(-1).sum()) // MERGE**2
    assert processor.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------------


def test_config_ids_equal_tokenizer_ids(config, tokenizer):
    """Config image/video/vision-start/end (and bos/eos) ids are the tokenizer's ids; vocab covers the tokenizer."""
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.eos_token_id == tokenizer.eos_token_id
    assert config.text_config.bos_token_id == tokenizer.pad_token_id
    vocab = config.text_config.vocab_size
    assert vocab >= len(tokenizer) and vocab % 64 == 0


def test_config_dimensions_are_distinct(config):
    """Tiny config values as documented; hidden, q width, kv width, moe width, 2*moe width and vocab all differ."""
    t, v = config.text_config, config.vision_config
    assert (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (48, 4, 2, 16)
    assert (t.moe_intermediate_size, t.num_experts, t.num_experts_per_tok, t.num_hidden_layers) == (40, 8, 2, 4)
    assert t.norm_topk_prob is True and t.mlp_only_layers == []
    rope = t.rope_parameters
    assert rope["mrope_section"] == [4, 2, 2] and sum(rope["mrope_section"]) == t.head_dim // 2
    assert rope["mrope_interleaved"] is True and rope["rope_theta"] == 10000.0
    dims = [t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim,
            t.moe_intermediate_size, 2 * t.moe_intermediate_size, t.vocab_size, t.num_experts]
    assert len(set(dims)) == len(dims), dims
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size) == (3, 32, 2, 56)
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size) == (16, 2, 2)
    assert v.num_position_embeddings == 64 and v.out_hidden_size == t.hidden_size
    assert list(v.deepstack_visual_indexes) == [0, 2] and v.hidden_act == "gelu_pytorch_tanh"
    assert config.tie_word_embeddings is False


def test_config_overrides_nested_and_top_level(tokenizer):
    """Overrides reach nested text/vision keys, merge nested dicts, and set top-level fields."""
    cfg = tiny_hf_config(
        tokenizer,
        text={"num_hidden_layers": 2, "rope_parameters": {"rope_theta": 500.0}},
        vision={"depth": 2, "deepstack_visual_indexes": [1]},
        tie_word_embeddings=True,
    )
    assert cfg.text_config.num_hidden_layers == 2
    assert cfg.text_config.rope_parameters["rope_theta"] == 500.0
    assert cfg.text_config.rope_parameters["mrope_section"] == [4, 2, 2]
    assert cfg.vision_config.depth == 2 and list(cfg.vision_config.deepstack_visual_indexes) == [1]
    assert cfg.tie_word_embeddings is True
    assert tiny_hf_config(tokenizer, num_hidden_layers=3).text_config.num_hidden_layers == 3


# ------------------------------------------------------------------------------------------------------------------
# Sample inputs through the reference model
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SAMPLE_KINDS)
def test_sample_kind_runs_through_hf_model(kind, processor, model, config):
    """Each sample kind gives finite [B, S, vocab] logits and as many pad tokens as its grids imply."""
    batch = sample_inputs(processor, kind)
    ids = batch["input_ids"]
    assert ids.shape == batch["attention_mask"].shape == batch["mm_token_type_ids"].shape
    assert ids.shape[1] < 200
    n_image = int((ids == config.image_token_id).sum())
    n_video = int((ids == config.video_token_id).sum())
    image_grid = batch.get("image_grid_thw")
    video_grid = batch.get("video_grid_thw")
    assert n_image == (0 if image_grid is None else int(image_grid.prod(-1).sum()) // MERGE**2)
    assert n_video == (0 if video_grid is None else int(video_grid.prod(-1).sum()) // MERGE**2)
    if image_grid is not None:
        assert batch["pixel_values"].shape[0] == int(image_grid.prod(-1).sum())
    if video_grid is not None:
        assert batch["pixel_values_videos"].shape[0] == int(video_grid.prod(-1).sum())
    # modality types agree with the placeholders
    assert torch.equal(batch["mm_token_type_ids"] == 1, ids == config.image_token_id)
    assert torch.equal(batch["mm_token_type_ids"] == 2, ids == config.video_token_id)

    expected = {"text": (0, 0), "image": (1, 0), "two_images": (2, 0), "video": (0, 1),
                "image_video": (1, 1), "padded_batch": (1, 0)}[kind]
    assert (0 if image_grid is None else len(image_grid), 0 if video_grid is None else len(video_grid)) == expected
    if kind == "two_images":
        assert not torch.equal(image_grid[0], image_grid[1])

    logits = hf_reference_forward(model, batch)
    assert logits.shape == (*ids.shape, config.text_config.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.3  # random weights give non-degenerate logits


@pytest.mark.parametrize("kind", ["video", "image_video"])
def test_video_sample_has_per_frame_timestamps(kind, processor, tokenizer):
    """Videos: >= 6 frames, one `<t seconds>` + vision block per temporal patch, times from the 4 fps metadata."""
    batch = sample_inputs(processor, kind)
    grid_t, grid_h, grid_w = (int(x) for x in batch["video_grid_thw"][0])
    assert grid_t * tiny.TEMPORAL_PATCH_SIZE >= 6
    text = tokenizer.decode(batch["input_ids"][0])
    fps, tp = tiny.SAMPLE_VIDEO_FPS, tiny.TEMPORAL_PATCH_SIZE
    stamps = [f"<{(i * tp + (i * tp + tp - 1)) / 2 / fps:.1f} seconds>" for i in range(grid_t)]
    frame = "<|vision_start|>" + "<|video_pad|>" * (grid_h * grid_w // MERGE**2) + "<|vision_end|>"
    assert "".join(s + frame for s in stamps) in text
    # reference layout: no extra vision_start/vision_end around the per-frame blocks
    assert f"<|vision_start|>{stamps[0]}" not in text
    raw = tokenizer.decode(sample_inputs(processor, kind, reference_video_layout=False)["input_ids"][0])
    assert f"<|vision_start|>{stamps[0]}" in raw  # what transformers 5.23 itself makes of the template


def test_padded_batch_is_right_padded(processor, tokenizer):
    """padded_batch: two samples of different lengths, right padding with <|endoftext|>, mask zeros at the end."""
    batch = sample_inputs(processor, "padded_batch")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 2
    lengths = mask.sum(-1)
    assert lengths[0] != lengths[1] and (mask == 0).any()
    for row in range(2):
        n = int(lengths[row])
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (ids[row, n:] == tokenizer.pad_token_id).all()
    assert (ids[0] == processor.image_token_id).any() and not (ids[1] == processor.image_token_id).any()


def test_padded_batch_logits_equal_single_samples(processor, model):
    """Each padded-batch sample's logits on its attended tokens equal those of the sample run alone."""
    batch = sample_inputs(processor, "padded_batch")
    logits = hf_reference_forward(model, batch)
    texts = [processor.apply_chat_template(c, tokenize=False) for c in tiny.sample_conversation("padded_batch")]
    singles = [
        processor(text=texts[0], images=[tiny.sample_image(96, 64, 4)], return_tensors="pt"),
        processor(text=texts[1], return_tensors="pt"),
    ]
    for row, single in enumerate(singles):
        n = int(batch["attention_mask"][row].sum())
        assert torch.equal(single["input_ids"][0], batch["input_ids"][row, :n])
        ref = hf_reference_forward(model, single)[0]
        torch.testing.assert_close(logits[row, :n], ref, rtol=1e-4, atol=1e-4)


def test_samples_are_deterministic(processor):
    """Two calls of sample_inputs give identical tensors (synthetic media are drawn deterministically)."""
    for kind in ("two_images", "image_video"):
        a, b = sample_inputs(processor, kind), sample_inputs(processor, kind)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------------


def _file_tensors(ckpt: Path) -> dict[str, tuple[list[int], str]]:
    from safetensors import safe_open

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(ckpt / fname), "pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == fname
                out[name] = (list(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
    assert set(out) == set(index["weight_map"])
    return out


def _expected_released_shapes(cfg) -> dict[str, list[int]]:
    """Tensor names / on-disk shapes of a released Qwen3-VL MoE checkpoint (checkpoint_layout.md), for ``cfg``."""
    t, v = cfg.text_config, cfg.vision_config
    H, V, E, I = t.hidden_size, t.vocab_size, t.num_experts, t.moe_intermediate_size
    q, kv, d = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim, t.head_dim
    C, M, O = v.hidden_size, v.intermediate_size, v.out_hidden_size
    C4 = C * v.spatial_merge_size**2
    lm = "model.language_model"
    shapes = {f"{lm}.embed_tokens.weight": [V, H], "lm_head.weight": [V, H], f"{lm}.norm.weight": [H]}
    for n in range(t.num_hidden_layers):
        p = f"{lm}.layers.{n}"
        shapes.update({
            f"{p}.input_layernorm.weight": [H],
            f"{p}.post_attention_layernorm.weight": [H],
            f"{p}.self_attn.q_proj.weight": [q, H],
            f"{p}.self_attn.k_proj.weight": [kv, H],
            f"{p}.self_attn.v_proj.weight": [kv, H],
            f"{p}.self_attn.o_proj.weight": [H, q],
            f"{p}.self_attn.q_norm.weight": [d],
            f"{p}.self_attn.k_norm.weight": [d],
            f"{p}.mlp.gate.weight": [E, H],
            f"{p}.mlp.experts.gate_up_proj": [E, H, 2 * I],
            f"{p}.mlp.experts.down_proj": [E, I, H],
        })
    vis = "model.visual"
    shapes.update({
        f"{vis}.patch_embed.proj.weight": [C, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size],
        f"{vis}.patch_embed.proj.bias": [C],
        f"{vis}.pos_embed.weight": [v.num_position_embeddings, C],
    })
    for b in range(v.depth):
        p = f"{vis}.blocks.{b}"
        for name, shape in {
            "norm1.weight": [C], "norm1.bias": [C], "norm2.weight": [C], "norm2.bias": [C],
            "attn.qkv.weight": [3 * C, C], "attn.qkv.bias": [3 * C],
            "attn.proj.weight": [C, C], "attn.proj.bias": [C],
            "mlp.linear_fc1.weight": [M, C], "mlp.linear_fc1.bias": [M],
            "mlp.linear_fc2.weight": [C, M], "mlp.linear_fc2.bias": [C],
        }.items():
            shapes[f"{p}.{name}"] = shape
    mergers = {f"{vis}.merger": C} | {
        f"{vis}.deepstack_merger_list.{i}": C4 for i in range(len(v.deepstack_visual_indexes))
    }
    for p, norm_width in mergers.items():
        shapes.update({
            f"{p}.norm.weight": [norm_width], f"{p}.norm.bias": [norm_width],
            f"{p}.linear_fc1.weight": [C4, C4], f"{p}.linear_fc1.bias": [C4],
            f"{p}.linear_fc2.weight": [O, C4], f"{p}.linear_fc2.bias": [O],
        })
    return shapes


def test_released_layout_names_and_shapes(checkpoints, config):
    """Released-layout files hold exactly the documented tensor names, with released on-disk shapes, sharded."""
    ckpt = checkpoints["released"]
    files = _file_tensors(ckpt)
    expected = _expected_released_shapes(config)
    assert set(files) == set(expected)
    assert {name: shape for name, (shape, _) in files.items()} == expected
    assert {dtype for _, dtype in files.values()} == {"F32"}
    assert len(list(ckpt.glob("model-*-of-*.safetensors"))) >= 3


def test_transformers5_layout_has_transposed_experts(checkpoints, config):
    """transformers5-layout files: same names, experts [E, 2I, H] / [E, H, I], everything else as released."""
    files = _file_tensors(checkpoints["transformers5"])
    expected = _expected_released_shapes(config)
    assert set(files) == set(expected)
    for name, (shape, _) in files.items():
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            e, a, b = expected[name]
            assert shape == [e, b, a], name
        else:
            assert shape == expected[name], name
    assert len(list(checkpoints["transformers5"].glob("model-*-of-*.safetensors"))) >= 3


@pytest.mark.parametrize("layout", EXPERT_LAYOUTS)
def test_checkpoint_reloads_exactly(layout, checkpoints, model):
    """`from_pretrained` of either layout reproduces the in-memory model's parameters bit for bit."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    loaded = Qwen3VLMoeForConditionalGeneration.from_pretrained(checkpoints[layout])
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for name, tensor in ref.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def test_checkpoint_reload_bf16_tied(tmp_path, tokenizer):
    """bf16 + tied embeddings + overrides: both layouts reload exactly, lm_head stays tied and is not written."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    overrides = {"tie_word_embeddings": True, "text": {"num_hidden_layers": 2}, "vision": {"depth": 2}}
    ref = build_tiny_hf_model(tiny_hf_config(tokenizer, **overrides), seed=7, dtype=torch.bfloat16)
    for layout in EXPERT_LAYOUTS:
        ckpt = save_tiny_hf_checkpoint(tmp_path / layout, seed=7, expert_layout=layout, dtype=torch.bfloat16,
                                       tokenizer=tokenizer, **overrides)
        assert "lm_head.weight" not in _file_tensors(ckpt)
        loaded = Qwen3VLMoeForConditionalGeneration.from_pretrained(ckpt)
        assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
        got = loaded.state_dict()
        assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())


def test_released_config_spelling_loads_equal(checkpoints, config):
    """Released-layout config.json uses the 4.57 key names and loads back into an equal config."""
    from transformers import AutoConfig

    raw = json.loads((checkpoints["released"] / "config.json").read_text())
    text = raw["text_config"]
    assert text["num_experts"] == 8 and "num_local_experts" not in text
    assert text["rope_theta"] == 10000.0 and "rope_parameters" not in text
    assert text["rope_scaling"] == {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    assert raw["architectures"] == ["Qwen3VLMoeForConditionalGeneration"]
    loaded = AutoConfig.from_pretrained(checkpoints["released"]).to_dict()
    ref = config.to_dict()
    assert loaded["text_config"]["dtype"] == "float32"  # recorded as the released files do
    for d in (loaded, ref):
        d.pop("_name_or_path", None)
        d.pop("architectures", None)
        d["text_config"].pop("dtype", None)
    assert loaded == ref


def test_checkpoint_processor_reloads(checkpoints, processor):
    """AutoProcessor.from_pretrained(checkpoint) rebuilds a processor giving identical sample inputs."""
    from transformers import AutoProcessor

    ckpt = checkpoints["released"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "video_preprocessor_config.json", "processor_config.json", "config.json"):
        assert (ckpt / name).is_file(), name
    reloaded = AutoProcessor.from_pretrained(ckpt)
    assert reloaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    for kind in ("image_video", "padded_batch"):
        a, b = sample_inputs(reloaded, kind), sample_inputs(processor, kind)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), kind


def test_weights_are_seeded(config):
    """Same seed gives identical weights; another seed differs; norms are randomised around 1."""
    a = build_tiny_hf_model(config, seed=0).state_dict()
    b = build_tiny_hf_model(config, seed=0).state_dict()
    c = build_tiny_hf_model(config, seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.language_model.norm.weight"], c["model.language_model.norm.weight"])
    norm = a["model.language_model.layers.0.self_attn.q_norm.weight"]
    assert not torch.equal(norm, torch.ones_like(norm)) and (norm - 1).abs().max() < 1.0
