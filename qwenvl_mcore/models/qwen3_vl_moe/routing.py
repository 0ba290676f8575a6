"""Router statistics of a forward-backward pass: transformers' load-balancing loss, exact under sequence and
pipeline parallelism and activation recompute, and the per-layer expert load.

transformers' loss over a batch is  aux = E * sum_e (C_e / N) * (S_e / N),  with C_e the top-k assignments to
expert e and S_e the summed router probabilities, both over every layer and valid (non-padding) token, and
N = layers x valid tokens. C is not differentiable, so the gradient of aux with respect to one token's
probabilities in any layer is E * C_e / N^2: a constant of the whole micro-batch, known once its forward has passed
every layer of every pipeline stage, which always happens before its backward. So each router records its
layer's (C, S, N) and attaches a backward hook that reads the micro-batch totals; each pipeline-stage chunk sums its
layers, adds them over the sequence-parallel ranks (in step) and posts an asynchronous sum over the pipeline stages
(every stage posts the same sequence of sums, so they match up). The first backward waits for it. A recomputed layer
records the same values again under the same key and attaches the same hook.

Everything stays on the device (no host read) up to what the step reports: `RoutingStats.aux_loss_total` and
`layer_counts` are device tensors, read once each by training/step.py. Only the pipeline exchange goes through the
host (its group is gloo).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class MicroBatchRouting:
    """Routing statistics of one micro-batch on this rank (all of its pipeline chunks)."""

    def __init__(self, num_experts: int, coeff_scale: float):
        self.num_experts = num_experts
        self.coeff_scale = coeff_scale  # weight of d(aux) in the gradient (0: statistics only)
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # layer -> (C, S, N) local
        self._pending: list[tuple[object | None, torch.Tensor]] = []
        self._totals: torch.Tensor | None = None

    def record(self, layer_number: int, counts: torch.Tensor, prob_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        """One layer's statistics over this rank's valid tokens (detached). Idempotent: recompute records again."""
        self.layers[layer_number] = (counts.detach().float(), prob_sum.detach().float(), tokens.detach().float())

    def publish(self, layer_numbers, *, sp_group=None, pp_group=None) -> None:
        """Sum one chunk's layers; add over sequence-parallel ranks now and over pipeline stages asynchronously."""
        parts = [self.layers[n] for n in layer_numbers if n in self.layers]
        if not parts:
            return
        vec = torch.cat([torch.stack([p[0] for p in parts]).sum(0), torch.stack([p[1] for p in parts]).sum(0),
                         torch.stack([p[2] for p in parts]).sum().reshape(1)])
        if sp_group is not None and dist.get_world_size(sp_group) > 1:
            dist.all_reduce(vec, group=sp_group)
        work = None
        if pp_group is not None and dist.get_world_size(pp_group) > 1:
            vec = vec.cpu()  # the exchange group is gloo (see parallel.distributed.pipeline_stats_group)
            work = dist.all_reduce(vec, group=pp_group, async_op=True)
        self._pending.append((work, vec))
        self._totals = None

    def totals(self) -> torch.Tensor:
        """[C (E), S (E), N] over the whole model and micro-batch (waits for the pipeline exchange)."""
        if self._totals is None:
            if not self._pending:
                raise RuntimeError("routing totals requested before any chunk published its statistics")
            for work, _ in self._pending:
                if work is not None:
                    work.wait()
            self._totals = torch.stack([v for _, v in self._pending]).sum(0)
        return self._totals

    def aux_loss_tensor(self) -> torch.Tensor:
        """transformers' load_balancing_loss_func value for this micro-batch: a float64 scalar where the statistics
        live (no host read)."""
        t = self.totals().double()
        e = self.num_experts
        n = t[2 * e].clamp_min(1.0)
        return e * torch.sum((t[:e] / n) * (t[e:2 * e] / n))

    def aux_loss(self) -> float:
        """transformers' load_balancing_loss_func value for this micro-batch (read on the host)."""
        return float(self.aux_loss_tensor())

    def valid_tokens(self) -> torch.Tensor:
        """Valid tokens of the micro-batch over every layer (float64 scalar, where the statistics live)."""
        return self.totals()[2 * self.num_experts].double()

    def score_gradient(self, device, dtype) -> torch.Tensor:
        """d(coeff_scale * aux) / d(probability of expert e at one valid token, any layer): [E]."""
        t = self.totals()
        e = self.num_experts
        n = t[2 * e].clamp_min(1.0)
        return (self.coeff_scale * e * t[:e] / (n * n)).to(device=device, dtype=dtype)


class RoutingStats:
    """The routing statistics of one call of the forward-backward schedule, one entry per micro-batch."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.micro: dict[int, MicroBatchRouting] = {}

    def for_microbatch(self, index: int) -> MicroBatchRouting:
        if index not in self.micro:
            self.micro[index] = MicroBatchRouting(self.num_experts, coeff_scale=0.0)  # the model sets it
        return self.micro[index]

    def aux_losses(self) -> list[float]:
        """transformers' aux value of each micro-batch that had tokens (an all-padding micro-batch, which only fills
        a rank up to the agreed micro-batch count, has no load-balancing loss). Read on the host, one value at a
        time: for tests and tools; the step uses `aux_loss_total`."""
        return [mb.aux_loss() for _, mb in sorted(self.micro.items()) if float(mb.valid_tokens()) > 0]

    def aux_loss_total(self, device=None) -> torch.Tensor:
        """[sum of the aux values of the micro-batches that had tokens, their number] (float64 on `device`, default
        `stats_device()`), computed without a host read: the sum and count `aux_losses` would give."""
        device = stats_device() if device is None else device
        parts = []
        for _, mb in sorted(self.micro.items()):
            has_tokens = mb.valid_tokens() > 0
            # where(), not a product: an all-padding micro-batch adds 0 even if its value were not finite
            parts.append(torch.stack([torch.where(has_tokens, mb.aux_loss_tensor(), 0.0), has_tokens.double()]))
        if not parts:
            return torch.zeros(2, dtype=torch.float64, device=device)
        return torch.stack(parts).sum(0).to(device)

    def layer_counts(self, num_layers: int, device=None) -> torch.Tensor:
        """[num_layers, E] assignments per layer summed over the micro-batches, for this rank's layers and tokens
        (zeros for layers of other stages): float64 on `device` (default `stats_device()`; the step passes the
        model's), no host read."""
        device = stats_device() if device is None else device
        out = torch.zeros(num_layers, self.num_experts, dtype=torch.float64, device=device)
        for mb in self.micro.values():
            for layer_number, (counts, _, _) in mb.layers.items():
                out[layer_number - 1] += counts.to(device=device, dtype=torch.float64)
        return out


def stats_device() -> torch.device:
    """Where the step's routing statistics meet for their collectives: the current GPU when there is one, else the
    CPU. The same on every rank, whatever this rank recorded (a rank without statistics still joins the sums)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class AuxLossGradient(torch.autograd.Function):
    """Identity on the router's `probs`; its backward adds d(coeff_scale * aux)/d(scores) into `scores`
    (softmax probabilities [tokens, E]) at the valid tokens, from the micro-batch totals."""

    @staticmethod
    def forward(ctx, probs, scores, valid, record: MicroBatchRouting):
        ctx.save_for_backward(valid)
        ctx.record = record
        ctx.scores_meta = (scores.shape, scores.device, scores.dtype)
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        (valid,) = ctx.saved_tensors
        shape, device, dtype = ctx.scores_meta
        per_expert = ctx.record.score_gradient(device, dtype)
        grad_scores = valid.to(dtype).reshape(-1, 1) * per_expert.reshape(1, -1)
        return grad_probs, grad_scores.expand(shape), None, None
