"""LM head + cross-entropy over row chunks at tensor parallelism 1: per-token losses without the full logits.

The unchunked head (megatron's ColumnParallelLinear, then torch's cross-entropy on `logits.float()`) holds, for a
4,096-token micro-batch at Qwen3-VL's 151,936-token vocabulary, the logits in the parameter dtype (1.2 GB in bf16),
their fp32 copy and fp32 log-softmax (2.5 GB each) and as much again for their gradients. `token_losses` computes
the same per-token losses a chunk of `chunk_tokens` rows at a time (logits in the parameter dtype, fp32
log-softmax, loss; chunks of near-equal size, see `row_chunks`) and keeps for the backward, besides the hidden
states, the weight and the targets, two fp32 numbers per token: the row's largest logit and the log of its softmax
normaliser.

Backward recomputes the logits (one extra GEMM: 4 instead of 3) over vocabulary slices of about the same number of
elements as a forward chunk (`chunk_tokens * V / N` columns for N tokens), so that:
- it is exact for any upstream gradient (the gradient of the logits is `g * (softmax - onehot)` per token, with
  the softmax `exp((x - max) - log_normaliser)` evaluated as torch's log-softmax evaluates its output; in fp32 on
  the CPU it differs from torch's log-softmax backward only by its exp, about 3e-8 relative);
- each slice of the weight gradient is one GEMM over all N tokens, written once (no [V, h] accumulator read and
  written per chunk, and the same single rounding as the unchunked wgrad GEMM); only the hidden gradient [N, h] is
  summed over slices, in fp32.
Computing the gradient in the forward instead (for a unit upstream gradient) saves that GEMM but must hold the
[V, h] weight gradient and the [N, h] hidden gradient from the forward to the backward, accumulate the weight
gradient over row chunks, and is correct only for an upstream gradient uniform over the loss tokens (true for
`training.schedule.per_token_loss`, which sums the losses, but a property to assert on the device).

The weight gradient is returned to autograd, which puts it in `weight.grad` exactly as megatron's
ColumnParallelLinear does without gradient-accumulation fusion (megatron's DDP hooks then add it into `main_grad`);
a weight tied to the token embedding gets both gradients summed by autograd. A frozen weight (LoRA, frozen
language model) gets none and costs no wgrad GEMM. Nothing here reads a device value on the host.
"""

from __future__ import annotations

import torch

# Tokens per forward chunk: their fp32 logits at Qwen3-VL's 151,936-token vocabulary are 223 MiB (a multiple of
# 128 rows under 256 MiB). 0 in `model.loss_chunk_tokens` means the unchunked head.
DEFAULT_CHUNK_TOKENS = 384


def token_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Per-token cross-entropy of the LM head `weight` [V, h] on `hidden` [s, b, h] for `labels` [s, b]: fp32
    [s, b], 0 where the label is `ignore_index`; equal to `cross_entropy(matmul(hidden, weight.t()).float())`
    token by token, and differentiable in `hidden` and `weight`."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1 (tokens per LM-head chunk), got {chunk_tokens}.")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2] or weight.dim() != 2 \
            or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"hidden [s, b, h], labels [s, b] and weight [V, h] expected, got {tuple(hidden.shape)}, "
                         f"{tuple(labels.shape)} and {tuple(weight.shape)}.")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and the output weight ({weight.dtype}) must share a dtype.")
    ignore = labels == ignore_index
    target = labels.masked_fill(ignore, 0)
    loss = _ChunkedLMLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1),
                                ignore.reshape(-1), chunk_tokens)
    return loss.view(labels.shape)


def row_chunks(n: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """[start, end) of ceil(n / chunk_tokens) chunks of near-equal size (differing by at most one row, none above
    `chunk_tokens`): no small tail chunk, whose GEMM a BLAS may run with another kernel (on the CPU, MKL sums a
    product of a few rows in another order than the same rows of a larger one)."""
    count = max(1, -(-n // chunk_tokens))
    size, extra = divmod(n, count)
    bounds, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


class _ChunkedLMLoss(torch.autograd.Function):
    """hidden [N, h], weight [V, h], target [N] (0 where ignored), ignore [N] bool -> fp32 losses [N].

    Single-chunk and single-slice calls skip the slicing and concatenation (fewer ops per call on the host)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, ignore, chunk_tokens: int):
        bounds = row_chunks(hidden.shape[0], chunk_tokens)
        whole = len(bounds) == 1
        weight_t = weight.t()
        losses, maxima, norms = [], [], []
        for start, end in bounds:
            logits = torch.mm(hidden if whole else hidden[start:end], weight_t)  # [c, V], parameter dtype
            # fp32 log-softmax of the logits, as cross_entropy(logits.float()) computes it (the dtype argument
            # spares the fp32 copy where the kernel converts on the fly)
            logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            losses.append(torch.nn.functional.nll_loss(logp, target if whole else target[start:end],
                                                       reduction="none"))
            top, where = logits.max(dim=1, keepdim=True)
            del logits
            maxima.append(top)
            # log-softmax evaluates (x - max) - log_norm, so at a largest logit its output is -log_norm exactly
            norms.append(logp.gather(1, where).neg_())
            del logp
        loss, row_max, log_norm = (parts[0] if whole else torch.cat(parts) for parts in (losses, maxima, norms))
        if row_max.dtype != torch.float32:
            row_max = row_max.float()  # exact
        loss.masked_fill_(ignore, 0.0)
        ctx.save_for_backward(hidden, weight, target, ignore, row_max, log_norm)  # row_max, log_norm: [N, 1] fp32
        ctx.chunk_tokens = chunk_tokens
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, target, ignore, row_max, log_norm = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_hidden or need_weight):
            return None, None, None, None, None
        n, vocab = hidden.shape[0], weight.shape[0]
        low = weight.dtype != torch.float32
        # the losses of ignored tokens are constants (0): no gradient flows through them
        g = grad_loss.masked_fill(ignore, 0.0).unsqueeze(1)  # fp32, as the losses
        neg_g = g.neg()
        cols = max(1, ctx.chunk_tokens * vocab // max(n, 1))  # the forward chunk's element count, over all tokens
        slices = [(v0, min(v0 + cols, vocab)) for v0 in range(0, vocab, cols)]
        whole = len(slices) == 1
        if whole:
            col = target.unsqueeze(1)
        else:  # each target's slice and its column there
            slot = torch.div(target, cols, rounding_mode="floor").unsqueeze(1)
            col = torch.remainder(target, cols).unsqueeze(1)
        grad_weight = torch.empty_like(weight) if need_weight and not whole else None
        grad_hidden = None
        for i, (v0, v1) in enumerate(slices):
            w = weight if whole else weight[v0:v1]
            # d loss / d logits = g * (softmax - onehot(target)) in torch's log-softmax backward's op order:
            # exp((x - max) - log_norm) * g, then g subtracted at the target
            d = torch.mm(hidden, w.t())  # the logits of this slice again, parameter dtype
            d = d - row_max if low else d.sub_(row_max)  # fp32
            d.sub_(log_norm).exp_().mul_(g)
            if whole:
                d.scatter_add_(1, col, neg_g)
            else:  # 0 added in the rows whose target lies in another slice
                d.scatter_add_(1, col if v1 - v0 == cols else col.clamp(max=v1 - v0 - 1),
                               torch.where(slot == i, neg_g, 0.0))
            if low:
                d = d.to(weight.dtype)
            if need_weight:
                if whole:
                    grad_weight = torch.mm(d.t(), hidden)
                else:
                    torch.mm(d.t(), hidden, out=grad_weight[v0:v1])
            if need_hidden:  # summed over the slices in fp32
                if grad_hidden is None:
                    grad_hidden = torch.mm(d, w).float() if low else torch.mm(d, w)
                elif low:
                    grad_hidden += torch.mm(d, w)
                else:
                    grad_hidden.addmm_(d, w)
        if need_hidden and low:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None
