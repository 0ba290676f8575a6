"""The datasets a `data:` config describes, for the trainer and for tools/data (the same code path, so what a
user inspects is what the run trains on)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from qwenvl_mcore.data.mixing import MixedDataset, dataset_specs
from qwenvl_mcore.data.synthetic import SyntheticConversations

__all__ = ["datasets_from_config", "processor_from_config", "render_options"]


def render_options(d: DictConfig):
    """data.* rendering settings as render.RenderOptions."""
    from qwenvl_mcore.data.render import RenderOptions

    return RenderOptions(
        train_on=d.train_on, system_prompt=d.system_prompt, image_min_pixels=d.image_min_pixels,
        image_max_pixels=d.image_max_pixels, video_fps=d.video_fps, video_min_frames=d.video_min_frames,
        video_max_frames=d.video_max_frames, video_min_pixels=d.video_min_pixels, video_max_pixels=d.video_max_pixels)


def datasets_from_config(d: DictConfig, processor):
    """(train, valid or None): the files of data.train / data.valid mixed by weight and rendered by ``processor``,
    or, with data.train unset, data.num_samples / data.valid_samples synthetic conversations."""
    if d.train is None:
        kinds = list(d.kinds)
        train = SyntheticConversations(processor, d.num_samples, seed=d.seed, kinds=kinds)
        valid = SyntheticConversations(processor, d.valid_samples, seed=d.seed + 1, kinds=kinds) \
            if d.valid_samples else None
        return train, valid
    from qwenvl_mcore.data.render import Renderer

    renderer = Renderer(processor, render_options(d))
    plain = OmegaConf.to_container(d, resolve=True)

    def mix(key):
        return MixedDataset(dataset_specs(plain[key], f"data.{key}"), renderer, seed=d.seed, strict=d.strict,
                            frames_fps=d.frames_fps)

    return mix("train"), (mix("valid") if d.valid is not None else None)


def processor_from_config(cfg: DictConfig):
    """The processor a run of ``cfg`` renders with, found without starting the run: data.processor, else the
    hf/ directory of model.init_from, else (flavor debug) the tiny local one."""
    from transformers import AutoProcessor

    if cfg.data.processor:
        return AutoProcessor.from_pretrained(cfg.data.processor)
    if cfg.model.init_from:
        from qwenvl_mcore.checkpoint import model_io

        return AutoProcessor.from_pretrained(model_io.init_source(cfg.model.init_from).hf_dir)
    if cfg.model.flavor == "debug":
        from qwenvl_mcore.models.qwen3_vl_moe import debug_assets

        return debug_assets.build_processor(debug_assets.build_tokenizer())
    raise ValueError(f"model.flavor={cfg.model.flavor} needs data.processor=<dir> or model.init_from=<checkpoint> "
                     "to know the tokenizer and processor.")
