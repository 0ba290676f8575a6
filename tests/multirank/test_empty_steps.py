"""A step without any loss token (every sample of the global batch skipped) changes nothing, is counted and logged;
a run whose data gives no usable sample stops with a DataError (exit 2) naming the skips (issue 16, item 10).

One rank, the debug model from its seed, a JSONL file of two good and two bad records read in order two at a time:
step 2 has no usable sample. Before the fix such a step ran Adam anyway (momentum and weight decay moved the
weights), and a run on all-bad data trained to the end with loss 0 and exit 0."""

from __future__ import annotations

import pytest

from qwenvl_mcore.testing.dist import run_on_ranks

from _empty_step_checks import empty_step_checks


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    return run_on_ranks(empty_step_checks, 1, str(tmp_path_factory.mktemp("empty_steps")))[0]


def test_a_step_without_loss_tokens_changes_nothing(result):
    assert result["status"] == "completed"
    assert result["keys"] > 50  # model and Adam tensors
    changed = {k: d for k, d in result["across_empty"].items() if d != 0.0}
    assert not changed, changed  # bit for bit, weights and optimizer state
    assert sum(d > 0 for d in result["across_good"].values()) > 50  # a good step after it trains
    assert result["scheduler_steps"] == {1: 1, 2: 1, 3: 2}  # no LR step for the empty one


def test_it_is_counted_and_logged(result):
    train = [m for m in result["metrics"] if m["kind"] == "train"]
    assert [m["empty"] for m in train] == [False, True, False]
    assert [m["empty_steps"] for m in train] == [0, 1, 1]
    assert train[1]["loss"] is None and train[1]["loss_tokens"] == 0 and not train[1]["skipped"]
    assert train[1]["data_skips_step"] == {"bad_json": 2}
    assert train[2]["lr"] == train[1]["lr"]  # the schedule did not advance over the empty step
    assert [result["trainer_state"][s]["empty_steps"] for s in (1, 2, 3)] == [0, 1, 1]


def test_a_run_without_usable_data_stops_naming_the_skips(result):
    assert "bad_status" not in result, result.get("bad_status")
    kind, message, trace = result["bad_error"]
    assert kind == "DataError", trace
    # three bad lines and two samples a step: the second step completes the first epoch
    assert message.startswith("no usable sample in the first 2 steps (a whole epoch of 3 entries)"), message
    assert "4 bad_json" in message and "data_skips.jsonl" in message and "inspect.py" in message
    assert not result["bad_checkpoints"]  # nothing trained, nothing saved
