"""One typed parallel layout, validated up front against the world size and the layer count.

Every impossible combination fails here, before any process group or parameter exists, with a message that
names the field and the fix. The model and trainer only ever read a validated layout. The layout knows parallel
sizes only: the model checks that its own dimensions divide by them (models/qwen3_vl_moe/layout_checks.py).

`ParallelLayout.stage_layers` is the one place that says which LLM layers a pipeline stage holds (even or uneven
stages, with or without virtual stages); everything that needs a stage's layers asks it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qwenvl_mcore.parallel import context_parallel


class LayoutError(ValueError):
    """A parallel layout that cannot run; the message names the field and the fix."""


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of each parallel dimension. Data parallelism is whatever the world size leaves.

    tp: tensor parallel (LLM and ViT); pp: pipeline stages; vpp: virtual stages per pipeline rank (interleaved
    schedule); ep: expert parallel; etp: expert tensor parallel; cp: context parallel;
    sequence_parallel: shard activations along the sequence inside TP regions (required by MoE when tp > 1);
    first_stage_layers / last_stage_layers: LLM layers on the first / last pipeline stage (megatron's
    num_layers_in_first/last_pipeline_stage); null = that stage takes an even share; the other stages split
    the rest evenly.
    """

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    etp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def uneven(self) -> bool:
        return self.first_stage_layers is not None or self.last_stage_layers is not None

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def expert_data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.etp * self.ep * self.pp)

    def validate(self, world_size: int | None = None, num_layers: int | None = None) -> "ParallelLayout":
        """Raise LayoutError naming the field and the fix; return self when the layout can run (on `world_size`
        ranks, and splitting `num_layers` LLM layers over its pipeline stages, when given)."""
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
        for name in ("first_stage_layers", "last_stage_layers"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LayoutError(f"parallel.{name}={value!r}: must be a positive number of LLM layers or null "
                                  "(an even share).")
            if self.pp < 2:
                raise LayoutError(f"parallel.{name}={value} needs pipeline parallelism: set parallel.pp >= 2 or "
                                  f"parallel.{name}=null.")
        cp_problem = context_parallel.layout_problem(self.cp)
        if cp_problem:
            raise LayoutError(cp_problem)
        if self.sequence_parallel and self.tp == 1:
            raise LayoutError("parallel.sequence_parallel=true needs parallel.tp > 1; set it to false at tp=1.")
        if world_size is not None:
            self._validate_world(world_size)
        if num_layers is not None:
            self.stage_sizes(num_layers)
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

    # -- pipeline stages --------------------------------------------------------------------------------------------
    def _uneven_fields(self) -> str:
        return " and ".join(f"parallel.{n}={getattr(self, n)}" for n in ("first_stage_layers", "last_stage_layers")
                            if getattr(self, n) is not None)

    def stage_sizes(self, num_layers: int) -> tuple[int, ...]:
        """LLM layers held by each pipeline rank (all its virtual stages together), first rank first; LayoutError
        naming the fields and the fix when `num_layers` cannot be split so."""
        self.validate()  # the fields themselves first (positive counts, pp >= 2 for uneven stages)
        vpp = self.vpp or 1
        if not self.uneven:
            stages = self.pp * vpp
            if num_layers % stages:
                raise LayoutError(
                    f"{num_layers} LLM layers do not split evenly over pp*vpp = {stages} stages: "
                    "change parallel.pp / parallel.vpp, or give the first and last stages their own counts "
                    "(parallel.first_stage_layers / parallel.last_stage_layers)."
                )
            return (num_layers // self.pp,) * self.pp
        first, last = self.first_stage_layers, self.last_stage_layers
        middle_stages = self.pp - (first is not None) - (last is not None)
        rest = num_layers - (first or 0) - (last or 0)
        fields = self._uneven_fields()
        if middle_stages == 0 and rest != 0:
            raise LayoutError(
                f"{fields} sum to {num_layers - rest} LLM layers, but the model has {num_layers} and pp={self.pp} "
                f"has no other stage: make them sum to {num_layers} (e.g. parallel.last_stage_layers="
                f"{num_layers - first}) or set one of them to null."
            )
        if middle_stages and (rest < middle_stages or rest % middle_stages):
            what = "leave no layer" if rest < 1 else f"leave {rest} layers"
            names = " and ".join(f"parallel.{n}" for n in ("first_stage_layers", "last_stage_layers")
                                 if getattr(self, n) is not None)
            raise LayoutError(
                f"{fields} {what} of the model's {num_layers} LLM layers for the other {middle_stages} pipeline "
                f"stage(s), which must share them evenly: choose {names} so that the {num_layers} layers minus "
                f"them are a positive multiple of {middle_stages} (the stage sizes must sum to the layer count), "
                "or change parallel.pp."
            )
        share = rest // middle_stages if middle_stages else 0
        sizes = [share] * self.pp
        if first is not None:
            sizes[0] = first
        if last is not None:
            sizes[-1] = last
        if vpp > 1 and middle_stages == 0:
            # megatron-core 0.19's get_transformer_layer_offset divides by the number of other stages here
            raise LayoutError(
                f"parallel.vpp={vpp} with {fields} leaves no other pipeline stage, which megatron-core's interleaved "
                f"placement cannot handle: set parallel.last_stage_layers=null (the last stage then takes the "
                f"{num_layers - first} remaining layers) or parallel.vpp=null."
            )
        if vpp > 1:
            bad = [(rank, size) for rank, size in enumerate(sizes) if size % vpp]
            if bad:
                listing = ", ".join(f"rank {r}: {s}" for r, s in bad)
                raise LayoutError(
                    f"parallel.vpp={vpp} cuts every pipeline rank's layers into {vpp} virtual stages, but with "
                    f"{fields} the stages hold {list(sizes)} of {num_layers} LLM layers ({listing} not a multiple of "
                    f"{vpp}): make every stage's count a multiple of {vpp} (parallel.first_stage_layers / "
                    "parallel.last_stage_layers and the even share of the others) or change parallel.vpp."
                )
        return tuple(sizes)

    def stage_layers(self, num_layers: int, pp_rank: int, vp_stage: int | None = None) -> range:
        """The global indexes of the LLM layers that pipeline rank `pp_rank` holds in virtual stage `vp_stage`
        (None: without parallel.vpp, the rank's only chunk). Megatron's placement: virtual stage v of every rank
        holds 1/vpp of that rank's layers, and layers run rank by rank within v, then v + 1. Everything that needs a
        stage's layers asks here (the memory planner; the model's layers are megatron's, placed the same way: a unit
        test compares the two on every split)."""
        sizes = self.stage_sizes(num_layers)
        if not 0 <= pp_rank < self.pp:
            raise ValueError(f"pp_rank={pp_rank} outside 0..{self.pp - 1}")
        vpp = self.vpp or 1
        if vp_stage is None:
            if vpp == 1:
                return self.stage_layers(num_layers, pp_rank, 0)
            raise ValueError("with parallel.vpp > 1 a rank's layers are not contiguous: pass vp_stage")
        if not 0 <= vp_stage < vpp:
            raise ValueError(f"vp_stage={vp_stage} outside 0..{vpp - 1}")
        start = vp_stage * (num_layers // vpp) + sum(s // vpp for s in sizes[:pp_rank])
        return range(start, start + sizes[pp_rank] // vpp)

    def rank_layers(self, num_layers: int, pp_rank: int) -> list[range]:
        """The layers of each virtual stage (model chunk) of pipeline rank `pp_rank`, chunk 0 first."""
        return [self.stage_layers(num_layers, pp_rank, v) for v in range(self.vpp or 1)]
