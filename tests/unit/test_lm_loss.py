"""The chunked LM-head cross-entropy (qwenvl_mcore/models/qwen3_vl_moe/lm_loss.py) against the unchunked head it
replaces at TP=1 (megatron's `matmul(hidden, weight.t())`, then `cross_entropy(logits.float())`, 0 where ignored):
per-token losses and hidden and weight gradients within 1e-6 relative (fp32, CPU), for any upstream gradient; and the
model's LM head both ways (one 1-rank launch). The losses are often bitwise equal, but not always: a BLAS may sum
a chunk's rows in another order than the same rows of the whole product (MKL on an AMD EPYC with AVX-512 differs
by about 1e-7 relative in two of the cases below), so they are held to the same 1e-6 as the gradients."""

from __future__ import annotations

import pytest
import torch

from qwenvl_mcore.models.qwen3_vl_moe.lm_loss import DEFAULT_CHUNK_TOKENS, token_losses
from qwenvl_mcore.testing.dist import run_on_ranks

IGNORE = -100
GRAD_TOL = 1e-6
LOSS_TOL = 1e-6


def _unchunked(hidden, weight, labels):
    """Today's path at TP=1 (model.py before chunking), [s, b] losses."""
    logits = torch.matmul(hidden, weight.t())
    ignore = labels == IGNORE
    target = labels.masked_fill(ignore, 0)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(),
                                             reduction="none").view_as(target)
    return loss.masked_fill(ignore, 0.0)


def _relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _same_losses(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """Per-token losses within LOSS_TOL of the largest, and exactly 0 wherever the reference is (ignored tokens)."""
    return ours.shape == ref.shape and _relative(ours, ref) <= LOSS_TOL and bool(((ours == 0) == (ref == 0)).all())


def _case(s, b, h, vocab, *, seed=0, ignore_every=5, dtype=torch.float32, weight_std=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, b, h, generator=g).to(dtype)
    weight = (torch.randn(vocab, h, generator=g) * weight_std).to(dtype)
    labels = torch.randint(0, vocab, (s, b), generator=g)
    labels[::ignore_every] = IGNORE
    labels[1, 0] = IGNORE
    upstream = torch.rand(s, b, generator=g)  # not uniform: the Function must be right for any upstream gradient
    return hidden, weight, labels, upstream


def _losses_and_grads(fn, hidden, weight, labels, upstream, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, labels, **kw)
    (loss * upstream).sum().backward()
    return loss.detach(), h.grad, w.grad


def _chunked(chunk):
    return lambda h, w, labels: token_losses(h, w, labels, IGNORE, chunk)


# (s, b, h, V, chunk): chunks that do not divide the rows, one row per chunk, one chunk for everything, b > 1, and
# backward vocabulary slices that do not divide V (chunk * V / N columns)
CASES = [(37, 3, 24, 1000, 7), (64, 1, 32, 513, 64), (50, 2, 16, 300, 1000), (129, 1, 40, 2000, 40), (9, 2, 8, 77, 3)]


@pytest.mark.parametrize("s,b,h,vocab,chunk", CASES)
def test_losses_bitwise_and_gradients_match_unchunked(s, b, h, vocab, chunk):
    hidden, weight, labels, upstream = _case(s, b, h, vocab)
    ref = _losses_and_grads(_unchunked, hidden, weight, labels, upstream)
    ours = _losses_and_grads(_chunked(chunk), hidden, weight, labels, upstream)
    assert ours[0].dtype == torch.float32 and ours[0].shape == (s, b)
    assert _same_losses(ours[0], ref[0])
    assert bool((ours[0][labels == IGNORE] == 0).all()) and bool((ours[0][labels != IGNORE] > 0).all())
    assert _relative(ours[1], ref[1]) <= GRAD_TOL
    assert _relative(ours[2], ref[2]) <= GRAD_TOL


def test_gradients_within_1e6_of_float64():
    """Against the float64 head: the chunked gradients stay within 1e-6 on every seed. (The unchunked fp32 path is
    not always: its hidden gradient, one GEMM over the whole vocabulary, is 1.45e-6 off float64 at seed 3, so the
    two fp32 paths can differ by about that; the chunked one sums the vocabulary in slices and is 3e-7 off.)"""
    for seed in range(5):
        hidden, weight, labels, upstream = _case(37, 3, 24, 1000, seed=seed, weight_std=0.1)
        exact = _losses_and_grads(_unchunked, hidden.double(), weight.double(), labels, upstream.double())
        ours = _losses_and_grads(_chunked(7), hidden, weight, labels, upstream)
        assert _relative(ours[0].double(), exact[0]) <= GRAD_TOL
        assert _relative(ours[1].double(), exact[1]) <= GRAD_TOL and _relative(ours[2].double(), exact[2]) <= GRAD_TOL


def test_uniform_upstream_gradient_as_the_schedule_sums():
    """per_token_loss sums the losses (uniform upstream gradient); gradients scale with it."""
    hidden, weight, labels, _ = _case(33, 2, 16, 400, seed=1)
    for upstream in (torch.ones(33, 2), torch.full((33, 2), 1 / 57)):
        ref = _losses_and_grads(_unchunked, hidden, weight, labels, upstream)
        ours = _losses_and_grads(_chunked(10), hidden, weight, labels, upstream)
        assert _same_losses(ours[0], ref[0])
        assert _relative(ours[1], ref[1]) <= GRAD_TOL and _relative(ours[2], ref[2]) <= GRAD_TOL


def test_every_label_ignored_gives_zero_losses_and_gradients():
    hidden, weight, labels, upstream = _case(12, 2, 8, 50)
    labels = torch.full_like(labels, IGNORE)
    loss, gh, gw = _losses_and_grads(_chunked(5), hidden, weight, labels, upstream)
    assert not loss.any() and not gh.any() and not gw.any()


def test_tied_weight_gets_embedding_and_head_gradients_summed():
    """A weight that is also the token embedding (tied): autograd sums both gradients into weight.grad, as with
    megatron's ColumnParallelLinear."""
    g = torch.Generator().manual_seed(3)
    vocab, h, s, b = 300, 24, 21, 2
    weight = torch.randn(vocab, h, generator=g) * 0.3
    ids = torch.randint(0, vocab, (s, b), generator=g)
    labels = torch.randint(0, vocab, (s, b), generator=g)
    labels[::4] = IGNORE
    mix = torch.randn(h, h, generator=g) * 0.2
    upstream = torch.rand(s, b, generator=g)

    def run(fn):
        w = weight.clone().requires_grad_()
        hidden = torch.tanh(torch.nn.functional.embedding(ids, w) @ mix)  # [s, b, h], a function of the weight
        loss = fn(hidden, w, labels)
        (loss * upstream).sum().backward()
        return loss.detach(), w.grad

    ref, ours = run(_unchunked), run(_chunked(4))
    assert _same_losses(ours[0], ref[0])
    assert _relative(ours[1], ref[1]) <= GRAD_TOL


def test_gradient_accumulates_into_weight_grad_over_calls():
    """Two micro-batches: weight.grad holds the sum, as DDP's hooks expect from param.grad."""
    cases = [_case(20, 1, 16, 200, seed=k) for k in (4, 5)]
    weight = cases[0][1]
    grads = []
    for fn in (_unchunked, _chunked(6)):
        w = weight.clone().requires_grad_()
        for hidden, _, labels, upstream in cases:
            (fn(hidden, w, labels) * upstream).sum().backward()
        grads.append(w.grad)
    assert _relative(grads[1], grads[0]) <= GRAD_TOL


def test_frozen_weight_and_no_grad():
    """A frozen head (LoRA, model.freeze_language) gets no gradient; without grad the losses are the same."""
    hidden, weight, labels, upstream = _case(15, 2, 8, 60)
    h = hidden.clone().requires_grad_()
    (token_losses(h, weight, labels, IGNORE, 4) * upstream).sum().backward()
    ref = _losses_and_grads(_unchunked, hidden, weight, labels, upstream)
    assert weight.grad is None and _relative(h.grad, ref[1]) <= GRAD_TOL
    with torch.no_grad():
        assert _same_losses(token_losses(hidden, weight, labels, IGNORE, 4), ref[0])


def test_bf16_logits_in_parameter_dtype_and_fp32_losses():
    """bf16 parameters: logits in bf16 (as the unchunked head), log-softmax and losses in fp32, gradients in bf16;
    losses equal the unchunked ones, gradients agree to bf16 precision."""
    hidden, weight, labels, upstream = _case(40, 2, 32, 500, dtype=torch.bfloat16)
    ref = _losses_and_grads(_unchunked, hidden, weight, labels, upstream)
    ours = _losses_and_grads(_chunked(16), hidden, weight, labels, upstream)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == torch.bfloat16
    assert _same_losses(ours[0], ref[0])
    assert _relative(ours[1].float(), ref[1].float()) <= 2e-2
    assert _relative(ours[2].float(), ref[2].float()) <= 2e-2


def test_bad_input_is_refused_with_the_fix():
    hidden, weight, labels, _ = _case(6, 1, 8, 20)
    with pytest.raises(ValueError, match="chunk_tokens must be at least 1"):
        token_losses(hidden, weight, labels, IGNORE, 0)
    with pytest.raises(ValueError, match=r"weight \[V, h\]"):
        token_losses(hidden, weight[:, :4], labels, IGNORE, 2)
    with pytest.raises(ValueError, match="share a dtype"):
        token_losses(hidden, weight.double(), labels, IGNORE, 2)


def test_default_chunk_is_the_config_default_and_fits_256_mib_at_the_real_vocabulary():
    from qwenvl_mcore.training.config import ModelConf

    assert ModelConf().loss_chunk_tokens == DEFAULT_CHUNK_TOKENS
    assert DEFAULT_CHUNK_TOKENS * 151_936 * 4 <= 256 * 2**20


def test_negative_chunk_setting_is_a_config_error():
    from qwenvl_mcore.training.config import ConfigError, compose

    assert compose(["model.loss_chunk_tokens=0"]).model.loss_chunk_tokens == 0  # 0: the unchunked head
    with pytest.raises(ConfigError, match=r"model.loss_chunk_tokens=-1: must be 0 or more \(tokens per LM-head"):
        compose(["model.loss_chunk_tokens=-1"])


# -- the model's LM head, chunked vs unchunked (one 1-rank launch) ---------------------------------------------------

def _model_checks(rank: int, world: int) -> dict:
    from qwenvl_mcore.lora.layers import enable_lora
    from qwenvl_mcore.models.qwen3_vl_moe.config import args_from_hf_config
    from qwenvl_mcore.models.qwen3_vl_moe.model import MultimodalInputs, build_model_chunks
    from qwenvl_mcore.parallel import ParallelLayout, init_distributed
    from qwenvl_mcore.testing.tiny import tiny_hf_config

    layout = ParallelLayout()
    init_distributed(layout, seed=11)
    g = torch.Generator().manual_seed(5)
    out = {}
    for tied in (False, True):
        args = args_from_hf_config(tiny_hf_config(tie_word_embeddings=tied, num_hidden_layers=2))
        (model,) = build_model_chunks(args, layout)
        seen = {}

        def keep_grad(module, inputs, output):  # the final hidden states, the head's input
            output.retain_grad()
            seen["hidden"] = output

        model.decoder.register_forward_hook(keep_grad)
        text_vocab = min(args.image_token_id, args.video_token_id, args.vision_start_token_id)

        def ids(*shape):
            return torch.randint(0, text_vocab, shape, generator=g)

        labels = ids(2, 19)
        labels[:, -1] = IGNORE
        labels[0, :4] = IGNORE
        mask = torch.ones(2, 19, dtype=torch.long)
        mask[1, 15:] = 0  # right padding of the second row
        padded_labels = labels.clone()
        padded_labels[1, 14:] = IGNORE
        packed_labels = ids(1, 24)
        packed_labels[0, [6, 15, 19]] = IGNORE  # the last token of each sample
        packed_labels[0, 20:] = IGNORE  # padding
        batches = {
            "b2_unpadded": MultimodalInputs(input_ids=ids(2, 19), labels=labels),
            "b2_padded": MultimodalInputs(input_ids=ids(2, 19), attention_mask=mask, labels=padded_labels),
            "packed": MultimodalInputs(input_ids=ids(1, 24), labels=packed_labels,
                                       cu_seqlens=torch.tensor([0, 7, 16, 20], dtype=torch.int32)),
        }
        for name, batch in batches.items():
            upstream = torch.rand(batch.input_ids.shape, generator=g)
            results = {}
            for chunk in (0, 5):  # 5 divides none of the rows
                model.loss_chunk_tokens = chunk
                model.zero_grad(set_to_none=True)
                loss = model(batch)
                (loss * upstream).sum().backward()
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
                grads["<head input>"] = seen["hidden"].grad
                results[chunk] = (loss.detach(), grads)
            (ref, ref_grads), (ours, grads) = results[0], results[5]
            head = "embedding.weight" if tied else "output_layer.weight"
            out[(tied, name)] = {
                "losses_equal": _same_losses(ours, ref),
                "zero_where_ignored": bool((ours[batch.labels == IGNORE] == 0).all()),
                "same_params": sorted(grads) == sorted(ref_grads),
                "has_head_grad": head in grads,
                "head_rel": max(_relative(grads[n], ref_grads[n]) for n in (head, "<head input>")),
                "worst_rel": max((_relative(grads[n], ref_grads[n]), n) for n in ref_grads),
            }
        model.loss_chunk_tokens = DEFAULT_CHUNK_TOKENS
        chunked = model._chunked_loss()
        enable_lora(model.output_layer, rank=2, scale=1.0, dropout=0.0)  # adapters on the head: megatron's path
        out[(tied, "path")] = {"default_chunked": chunked, "with_adapters_chunked": model._chunked_loss()}
    return out


@pytest.fixture(scope="module")
def model_results():
    return run_on_ranks(_model_checks, 1)[0]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", ["b2_unpadded", "b2_padded", "packed"])
def test_model_head_chunked_equals_unchunked(model_results, tied, name):
    r = model_results[(tied, name)]
    assert r["losses_equal"] and r["zero_where_ignored"] and r["same_params"] and r["has_head_grad"], r
    assert r["head_rel"] <= GRAD_TOL, r
    # the head-input gradient's fp32 rounding difference, carried back through the layers (RMSNorm weights and the
    # router sum over many tokens): the same order, a few times larger at most
    assert r["worst_rel"][0] <= 10 * GRAD_TOL, r


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_model_takes_megatron_path_with_adapters_on_the_head(model_results, tied):
    assert model_results[(tied, "path")] == {"default_chunked": True, "with_adapters_chunked": False}


def test_lm_head_benchmark_runs_on_the_cpu(tmp_path):
    """tools/bench/lm_head.py (the GPU figure, chunked vs unchunked) at a tiny size: the chunked settings give the
    unchunked losses and gradients (fp32)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "lm_head.json"
    proc = subprocess.run([sys.executable, "tools/bench/lm_head.py", "--tokens", "300", "--hidden", "32", "--vocab",
                           "1000", "--chunks", "0,64,384", "--iters", "1", "--warmup", "0", "--json", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| 384 |"), proc.stdout[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["loss_chunk_tokens"] for r in rows] == [0, 64, 384]
    for r in rows:
        assert r["fwd_bwd_ms"] > 0 and r["fwd_ms"] > 0 and r["peak_extra_gib"] is None  # no device memory figure
        assert r["loss_rel_diff"] == 0.0
        assert r["hidden_grad_rel_diff"] <= GRAD_TOL and r["weight_grad_rel_diff"] <= GRAD_TOL
