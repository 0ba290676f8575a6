"""The trainer's guards, on the tiny model from one converted checkpoint (2 gloo ranks, plain DP2, unless noted):

- a step whose loss or gradient is not finite (NaN pixels in one sample) is skipped: logged as skipped with no grad
  norm, counted, and it changes nothing (weights, Adam state, LR schedule): the run retraces, bit for bit, a run on
  the same data without those steps;
- K skipped steps in a row stop the run with "bad_steps" and a checkpoint holding the last good (here: initial)
  weights;
- model.freeze_vision and optim.merger_lr=0: the ViT and the mergers stay bit for bit, the LLM trains;
- activation recompute (full, selective) changes neither loss, aux loss nor grad norm (one rank);
- checkpoints and the run directory (tests/multirank/_checkpoint_checks.py): a second run on a trainer.dir in use
  is refused; leftovers of killed saves are removed; a finished run exits at once; `latest` never names a missing
  directory; a damaged newest checkpoint is named (checkpoint.fallback=true resumes from an intact one); a full
  disk is named and its partial save removed; crafted pickles in a checkpoint are refused, never run.

Two launches (tests/multirank/_guard_checks.py): one at DP2 runs checks 1-3 and 5, one rank check 4; the
tests assert on the numbers they return.
"""

from __future__ import annotations

import math
import re

import pytest

from qwenvl_mcore.testing import tiny
from qwenvl_mcore.testing.dist import run_on_ranks

from _guard_checks import RECOMPUTE_MODES, SKIP_BAD, SKIP_STEPS, SKIPPED_STEPS, guard_checks, recompute_checks

RECOMPUTE_REL_TOL = 1e-6


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory) -> str:
    """A tiny HF checkpoint (seed 0) converted to megatron: the known initial weights of every run."""
    from qwenvl_mcore.conversion.convert import hf_to_mcore

    root = tmp_path_factory.mktemp("guards_init")
    hf = tiny.save_tiny_hf_checkpoint(root / "hf", seed=0)
    hf_to_mcore(str(hf), str(root / "mcore"), progress=False)
    return str(root / "mcore")


@pytest.fixture(scope="module")
def guards(init_ckpt, tmp_path_factory) -> list[dict]:
    return run_on_ranks(guard_checks, 2, str(tmp_path_factory.mktemp("guards")), init_ckpt)


@pytest.fixture(scope="module")
def recompute(init_ckpt, tmp_path_factory) -> dict:
    return run_on_ranks(recompute_checks, 1, str(tmp_path_factory.mktemp("recompute")), init_ckpt)[0]


def _no_error(results: list[dict], name: str) -> None:
    errors = [f"rank {r}:\n{res[name + '_error']}" for r, res in enumerate(results) if name + "_error" in res]
    assert not errors, "\n".join(errors)


def _part(key: str) -> str:
    """The part of a stored model tensor, by its key (independent of the trainer's parameter_part)."""
    if key.startswith(("vision.merger.", "vision.deepstack_mergers.")):
        return "merger"
    return "vit" if key.startswith("vision.") else "language"


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


# -- 1. skipped steps --------------------------------------------------------------------------------------------
def test_non_finite_steps_are_skipped_and_counted(guards):
    """Steps 2 and 4 (one NaN-pixel sample each, on rank 0 and rank 1) and only they are logged as skipped with no
    grad norm and a non-finite loss; the counter reads 0,1,1,2,2; the LR does not advance over a skipped step; the
    run completes with finite losses after them."""
    _no_error(guards, "skip")
    assert [r["skip_status"] for r in guards] == ["completed", "completed"]
    r = guards[0]
    assert r["skip_bad_have_media"] == [True] * len(SKIP_BAD)  # the NaN really went into pixels
    m = r["skip_metrics"]
    assert [x["step"] for x in m] == list(range(1, SKIP_STEPS + 1))
    assert [x["step"] for x in m if x["skipped"]] == list(SKIPPED_STEPS)
    for x in m:
        bad = x["step"] in SKIPPED_STEPS
        assert (x["grad_norm"] is None) == bad, x
        assert _finite(x["loss"]) != bad, x
        assert bad or _finite(x["grad_norm"]) and _finite(x["aux_loss"]), x
    assert [x["skipped_steps"] for x in m] == [0, 1, 1, 2, 2]
    assert [x["consumed_samples"] for x in m] == [4, 8, 12, 16, 20]  # a skipped step still consumes its batch
    lr = [x["lr"] for x in m]
    assert lr[0] != lr[1] == lr[2] != lr[3] == lr[4], lr  # the schedule moves on good steps only


def test_skipped_steps_change_nothing(guards):
    """Every stored tensor (model and Adam state) is bit for bit the same across each skipped step and changes
    across each good one; run A (5 steps, 2 skipped) equals run B (the same data without A's skipped batches, 3
    steps) in every logged loss, aux loss, grad norm and LR and in every tensor of the final checkpoint."""
    _no_error(guards, "skip")
    assert [r["clean_status"] for r in guards] == ["completed", "completed"]
    r = guards[0]
    assert r["skip_checkpoints"] == {"steps": [f"step_{s:07d}" for s in range(1, SKIP_STEPS + 1)],
                                     "latest": f"step_{SKIP_STEPS:07d}"}
    keys = r["skip_keys"]["a"]
    assert keys == r["skip_keys"]["b"]
    assert any(re.match(r"^chained_\d+\.optimizer\.state\.exp_avg\.", k) for k in keys)  # Adam state compared
    assert len([k for k in keys if "optimizer" not in k]) == 45
    for step, diffs in r["across_skip"].items():
        changed = {k: d for k, d in diffs.items() if d != 0}
        assert sorted(diffs) == keys and not changed, (step, changed)
    for step, diffs in r["across_good"].items():
        unchanged = [k for k, d in diffs.items() if not d > 0]
        assert sorted(diffs) == keys and not unchanged, (step, unchanged)
    differ = {k: d for k, d in r["a_vs_b_final"].items() if d != 0}
    assert sorted(r["a_vs_b_final"]) == keys and not differ, differ
    good = [x for x in r["skip_metrics"] if not x["skipped"]]
    clean = r["clean_metrics"]
    assert len(good) == len(clean) == SKIP_STEPS - len(SKIPPED_STEPS) and not any(x["skipped"] for x in clean)
    for key in ("loss", "aux_loss", "grad_norm", "lr"):
        assert [x[key] for x in good] == [x[key] for x in clean], key


# -- 2. K skipped steps in a row stop the run --------------------------------------------------------------------
def test_consecutive_non_finite_steps_stop_the_run(guards):
    """Every sample NaN, trainer.max_consecutive_skips=3, 10 steps asked for: "bad_steps" after exactly 3 skipped
    steps, one checkpoint step_0000003 (named by `latest`) whose model tensors equal the converted initial
    checkpoint's bit for bit, key for key."""
    _no_error(guards, "stop")
    assert [r["stop_status"] for r in guards] == ["bad_steps", "bad_steps"]
    r = guards[0]
    assert r["stop_have_media"]
    m = r["stop_metrics"]
    assert [x["step"] for x in m] == [1, 2, 3]
    assert all(x["skipped"] and x["grad_norm"] is None for x in m), m
    assert [x["skipped_steps"] for x in m] == [1, 2, 3]
    assert r["stop_checkpoints"] == {"steps": ["step_0000003"], "latest": "step_0000003"}
    assert r["stop_keys"]["init"] == r["stop_keys"]["saved"] and len(r["stop_keys"]["init"]) == 45
    differ = {k: d for k, d in r["stop_vs_init"].items() if d != 0}
    assert not differ, differ


# -- 3. freezing and per-part LRs --------------------------------------------------------------------------------
def test_frozen_vit_and_zero_merger_lr_keep_them_bit_for_bit(guards):
    """model.freeze_vision=true, optim.merger_lr=0.0, 3 steps: every ViT and merger tensor of the final checkpoint
    equals the initial one bit for bit, every LLM tensor changed; the optimizer holds no ViT parameter, and every
    merger parameter has a nonzero Adam first moment (it got gradients; only its LR kept it still); the trainable
    split trainer.freeze reports is (ViT 0, merger numel, LLM numel) by the stored shapes."""
    _no_error(guards, "frozen")
    assert [r["frozen_status"] for r in guards] == ["completed", "completed"]
    r = guards[0]
    m = r["frozen_metrics"]
    assert len(m) == 3 and not any(x["skipped"] for x in m) and all(_finite(x["loss"]) for x in m)
    diffs = r["frozen_vs_init"]
    parts = {p: {k: d for k, d in diffs.items() if _part(k) == p} for p in ("vit", "merger", "language")}
    assert len(parts["vit"]) == 15 and len(parts["merger"]) == 18 and len(parts["language"]) == 12, \
        {p: len(v) for p, v in parts.items()}
    assert {k: d for k, d in parts["vit"].items() if d != 0} == {}
    assert {k: d for k, d in parts["merger"].items() if d != 0} == {}
    assert [k for k, d in parts["language"].items() if not d > 0] == []
    exp_avg = r["frozen_exp_avg"]
    assert [k for k in exp_avg if _part(k) == "vit"] == []
    assert sorted(k for k in exp_avg if _part(k) == "merger") == sorted(parts["merger"])
    assert [k for k in parts["merger"] if not exp_avg[k] > 0] == []
    numel = r["frozen_numel"]
    expected = {"vision": 0, "merger": sum(numel[k] for k in parts["merger"]),
                "language": sum(numel[k] for k in parts["language"])}
    for rank_result in guards:  # DP2: every rank holds the whole model
        assert rank_result["frozen_trainable"] == [expected]


# -- 4. activation recompute -------------------------------------------------------------------------------------
def test_recompute_changes_no_loss_or_gradient(recompute):
    """One rank, 3 steps from the converted checkpoint at model.recompute=none|full|selective: megatron's
    checkpoint function really runs (forward and backward recomputation) under full and selective and not under
    none, and per-step loss, aux loss and grad norm agree with none within 1e-6 relative."""
    errors = {mode: r["error"] for mode, r in recompute.items() if r["status"] != "completed"}
    assert not errors, "\n".join(f"model.recompute={m}:\n{e}" for m, e in errors.items())
    assert recompute["none"]["calls"] == {}
    for mode in ("full", "selective"):
        calls = recompute[mode]["calls"]
        assert calls.get("forward", 0) > 0 and calls.get("backward", 0) == calls["forward"], (mode, calls)
    # full checkpoints whole layers, selective only core attention: different functions
    assert recompute["full"]["functions"] != recompute["selective"]["functions"]
    ref = recompute["none"]["metrics"]
    assert len(ref) == 3 and all(_finite(x["loss"]) and _finite(x["grad_norm"]) for x in ref)
    worst = {}
    for mode in RECOMPUTE_MODES[1:]:
        ours = recompute[mode]["metrics"]
        assert [x["step"] for x in ours] == [1, 2, 3]
        for key in ("loss", "aux_loss", "grad_norm"):
            rel = max(abs(a[key] - b[key]) / abs(b[key]) for a, b in zip(ours, ref, strict=True))
            worst[(mode, key)] = rel
    assert all(v <= RECOMPUTE_REL_TOL for v in worst.values()), worst


# -- 5. checkpoints and the run directory (issue 16 items 5-9, 11) -----------------------------------------------
def _checkpoints(guards, *steps: str) -> list[dict]:
    """The launch's results once the check ran and its `steps` (_checkpoint_checks.checkpoint_checks) raised
    nothing."""
    _no_error(guards, "checkpoints")
    for step in steps:
        _no_error(guards, f"ck_{step}")
    return guards


def test_second_run_on_a_trainer_dir_in_use_is_refused_on_every_rank(guards):
    """Rank 0 holds the run directory's lock: train() raises on both ranks (exit 2: ConfigError) naming the
    holder's pid and host, and writes nothing."""
    r0, r1 = _checkpoints(guards, "lock")
    for r in (r0, r1):
        assert r["lock_error"] and r["lock_error"].startswith("ConfigError: "), r["lock_error"]
        assert f"pid {r0['lock_pid']} on {r0['lock_host']}" in r["lock_error"], r["lock_error"]
        assert r["lock_wrote"] is False


def test_leftovers_of_killed_saves_are_removed(guards):
    """`.step_N.incomplete` and `.step_N.old-*` directories under checkpoint.dir are gone after a run starts;
    names not of that form are kept."""
    r0 = _checkpoints(guards, "base")[0]
    assert r0["base_status"] == "completed"
    assert r0["base_listing"] == [".step_keep.incomplete", "latest", "notes", "step_0000001", "step_0000002"]


def test_finished_run_exits_at_once_without_saving(guards):
    """The same command again after the run reached trainer.steps: "completed" on every rank, the checkpoint's
    files untouched (same inode and mtime) and no step logged."""
    guards = _checkpoints(guards, "base", "finished")
    assert [r["finished_status"] for r in guards] == ["completed", "completed"]
    assert [r["finished_same"] for r in guards] == [True, True]


def test_latest_never_names_a_missing_directory(guards):
    """A fresh start (checkpoint.resume=false) replacing step 2, which `latest` names: after each rename of the
    save `latest` names an existing directory, and finally the new step 2."""
    r0 = _checkpoints(guards, "base", "fresh")[0]
    assert r0["fresh_status"] == "completed"
    assert r0["fresh_renames"], "the save renamed nothing"
    assert [x for x in r0["fresh_renames"] if not x[2]] == [], r0["fresh_renames"]
    assert r0["fresh_latest"] == "step_0000002"


def test_damaged_newest_checkpoint_is_named_and_fallback_resumes(guards):
    """A truncated data file or a garbage .metadata in the newest checkpoint: a CheckpointError (exit 2) on every
    rank naming the file and the override checkpoint.fallback=true; with it the run resumes from step 1."""
    guards = _checkpoints(guards, "base", "damaged")
    for r in guards:
        assert r["truncated_error"].startswith("CheckpointError: "), r["truncated_error"]
        assert "step_0000002/__0_0.distcp is truncated" in r["truncated_error"], r["truncated_error"]
        assert r["garbage_error"].startswith("CheckpointError: "), r["garbage_error"]
        assert "step_0000002/.metadata is damaged" in r["garbage_error"], r["garbage_error"]
        for key in ("truncated_error", "garbage_error"):
            assert "step_0000001 (step 1): pass checkpoint.fallback=true" in r[key], r[key]
        assert r["fallback_status"] == "completed"
    assert guards[0]["fallback_steps"] == [2, 3]
    assert guards[0]["fallback_listing"] == ["latest", "step_0000001", "step_0000002", "step_0000003"]


def test_full_disk_during_a_save_is_named_and_the_partial_save_removed(guards):
    """ENOSPC in one rank's writer: every rank raises a CheckpointError naming ENOSPC and the checkpoint
    directory; no step directory and no partial `.step_N.incomplete` remains."""
    guards = _checkpoints(guards, "enospc")
    for r in guards:
        assert r["enospc_error"].startswith("CheckpointError: "), r["enospc_error"]
        assert "(ENOSPC)" in r["enospc_error"] and "ck_full/checkpoints" in r["enospc_error"], r["enospc_error"]
    assert guards[0]["enospc_listing"] == []


def test_crafted_pickles_in_a_checkpoint_are_refused_not_run(guards):
    """model.init_from with a crafted .metadata, and a resume from a checkpoint with a crafted .metadata, legacy
    common.pt or RNG ShardedObject: a CheckpointError on every rank naming the file and the refused global
    (os.system); no marker file was created."""
    guards = _checkpoints(guards, "base", "unsafe")
    where = {"init_metadata": "evil_init/.metadata", "metadata": "step_0000002/.metadata",
             "common": "step_0000002/common.pt", "rng": "step_0000002/__crafted.distcp (object rng_state/"}
    for r in guards:
        for kind, error in r["unsafe_errors"].items():
            assert error and error.startswith("CheckpointError: "), (kind, error)
            assert where[kind] in error and "posix.system" in error and "refused" in error, (kind, error)
        assert r["unsafe_markers"] == []
