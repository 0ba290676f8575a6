"""One typed parallel layout, validated up front against the world size and the model.

Every impossible combination fails here, before any process group or parameter exists, with a message that
names the field and the fix. The model and trainer only ever read a validated layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from qwenvl_mcore.parallel import context_parallel

if TYPE_CHECKING:  # pragma: no cover
    from qwenvl_mcore.models.qwen3_vl_moe.config import Qwen3VLMoeArgs


class LayoutError(ValueError):
    """A parallel layout that cannot run; the message names the field and the fix."""


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of each parallel dimension. Data parallelism is whatever the world size leaves.

    tp: tensor parallel (LLM and ViT); pp: pipeline stages; vpp: virtual stages per pipeline rank (interleaved
    schedule); ep: expert parallel; etp: expert tensor parallel; cp: context parallel;
    sequence_parallel: shard activations along the sequence inside TP regions (required by MoE when tp > 1).
    """

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    etp: int = 1
    cp: int = 1
    sequence_parallel: bool = False

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def expert_data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.etp * self.ep * self.pp)

    def validate(self, world_size: int | None = None, model: "Qwen3VLMoeArgs | None" = None) -> "ParallelLayout":
        """Raise LayoutError naming the field and the fix; return self when the layout can run."""
        for name in ("tp", "pp", "ep", "etp", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"parallel.{name}={value!r}: must be a positive integer.")
        if self.vpp is not None:
            if self.vpp < 1:
                raise LayoutError(f"parallel.vpp={self.vpp}: must be >= 1 or null.")
            if self.vpp > 1 and self.pp < 2:
                raise LayoutError(
                    f"parallel.vpp={self.vpp} needs pipeline parallelism: set parallel.pp >= 2 or parallel.vpp=null."
                )
        cp_problem = context_parallel.layout_problem(self.cp)
        if cp_problem:
            raise LayoutError(cp_problem)
        if self.sequence_parallel and self.tp == 1:
            raise LayoutError("parallel.sequence_parallel=true needs parallel.tp > 1; set it to false at tp=1.")
        if world_size is not None:
            self._validate_world(world_size)
        if model is not None:
            self._validate_model(model)
        return self

    def _validate_world(self, world_size: int) -> None:
        if world_size % self.model_parallel_size:
            raise LayoutError(
                f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp}: "
                "change parallel.tp/pp/cp or the number of ranks."
            )
        expert_mp = self.etp * self.ep * self.pp
        if world_size % expert_mp:
            raise LayoutError(
                f"world size {world_size} is not divisible by etp*ep*pp = {self.etp}*{self.ep}*{self.pp}: "
                "change parallel.ep/etp or the number of ranks."
            )

    def _validate_model(self, model: "Qwen3VLMoeArgs") -> None:
        text, vision = model.text, model.vision
        if text.num_attention_heads % self.tp:
            raise LayoutError(
                f"parallel.tp={self.tp} does not divide the LLM's {text.num_attention_heads} attention heads: "
                "choose a tp that divides it."
            )
        if text.num_key_value_heads % self.tp:
            raise LayoutError(
                f"parallel.tp={self.tp} does not divide the LLM's {text.num_key_value_heads} KV heads "
                f"(text_config.num_key_value_heads): choose tp in "
                f"{[d for d in range(1, text.num_key_value_heads + 1) if text.num_key_value_heads % d == 0]}."
            )
        if vision.num_heads % self.tp:
            raise LayoutError(
                f"parallel.tp={self.tp} does not divide the ViT's {vision.num_heads} heads "
                "(vision_config.num_heads): choose a tp that divides it."
            )
        for what, size in (
            ("ViT MLP width (vision_config.intermediate_size)", vision.intermediate_size),
            ("merger width (4*vision hidden)", vision.hidden_size * vision.spatial_merge_size**2),
            ("vocabulary (text_config.vocab_size)", text.vocab_size),
        ):
            if size % self.tp:
                raise LayoutError(f"parallel.tp={self.tp} does not divide the {what} {size}: choose a tp that divides it.")
        if text.num_experts % self.ep:
            raise LayoutError(
                f"parallel.ep={self.ep} does not divide the {text.num_experts} experts (text_config.num_experts): "
                "choose an ep that divides it."
            )
        if text.moe_intermediate_size % self.etp:
            raise LayoutError(
                f"parallel.etp={self.etp} does not divide moe_intermediate_size={text.moe_intermediate_size}: "
                "choose an etp that divides it."
            )
        if self.tp > 1 and not self.sequence_parallel:
            raise LayoutError(
                f"parallel.tp={self.tp} with MoE layers needs sequence parallelism (megatron's MoE layer requires it): "
                "set parallel.sequence_parallel=true."
            )
        stages = self.pp * (self.vpp or 1)
        if text.num_hidden_layers % stages:
            raise LayoutError(
                f"{text.num_hidden_layers} LLM layers do not split evenly over pp*vpp = {stages} stages: "
                "change parallel.pp / parallel.vpp."
            )
        per_stage = text.num_hidden_layers // stages
        n_deepstack = len(vision.deepstack_visual_indexes)
        if n_deepstack > per_stage:
            raise LayoutError(
                f"DeepStack adds visual features after LLM layers 0..{n_deepstack - 1}, which must all sit on the first "
                f"pipeline stage, but pp*vpp={stages} leaves only {per_stage} layers there: use fewer stages "
                f"(at most {text.num_hidden_layers // n_deepstack})."
            )
