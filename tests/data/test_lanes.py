"""Lane spans (``lane_span=K``): bounded runs of consecutive segments from random starts for models that carry
state: resets every K segments or at a document's end, document coverage close to shuffled training, sharding
and exact resume; the trainer flag."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from helpers.data import EOS, doc_of, unique_split
from helpers.training import TINY_YAML, one_line_error, write_corpus

from blockstate.cli.main import main
from blockstate.data import IGNORE_INDEX, DataError, SegmentLoader

LENGTHS = [1, 3, 7, 8, 9, 15, 16, 17, 40, 2, 0, 5, 31, 64, 12, 100, 57]  # L=8: stride 7, so 1..15 segments


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def real_tokens(row: torch.Tensor) -> list[int]:
    return [int(t) for t in row if t not in (EOS, 0)]


@pytest.mark.parametrize("span", [1, 3, 5])
def test_lanes_reset_every_k_segments_or_at_a_document_end(span):
    data = unique_split(LENGTHS * 2)
    lanes = 4
    loader = SegmentLoader(data, 8, lanes, seed=2, contiguous=True, lane_span=span)
    run_len = [0] * lanes
    last: list[int | None] = [None] * lanes
    doc: list[int | None] = [None] * lanes
    ended_at_doc_end = ended_at_span = 0
    for step in range(300):
        batch = next(loader)
        assert set(batch) == {"input_ids", "labels", "reset"}
        for j in range(lanes):
            x, reset = batch["input_ids"][j], bool(batch["reset"][j])
            real = real_tokens(x)
            docs = {doc_of(data, t) for t in real}
            assert len(docs) <= 1  # a segment never mixes documents
            if step == 0:
                assert reset
            if reset:
                if step:
                    # the previous run ended after exactly `span` segments, or earlier only at its document's end
                    at_end = last[j] == int(data.document(doc[j])[-1])
                    assert run_len[j] == span or (run_len[j] < span and at_end), (step, j, run_len[j])
                    ended_at_span += run_len[j] == span
                    ended_at_doc_end += run_len[j] < span
                run_len[j] = 0
                doc[j] = docs.pop() if docs else None
            else:
                assert run_len[j] < span
                assert int(x[0]) == last[j]  # the next segment of the same document (overlap of one token)
                assert docs <= {doc[j]}
            run_len[j] += 1
            nonpad = x[x != 0]
            last[j] = int(nonpad[-1]) if len(nonpad) else None
    if span > 1:
        assert ended_at_span and ended_at_doc_end  # both ways of ending a run happen


def test_runs_start_anywhere_in_a_document_at_segment_aligned_offsets():
    data = unique_split([200] * 6)  # 29 segments of stride 7 per document
    loader = SegmentLoader(data, 8, 3, seed=0, contiguous=True, lane_span=4)
    starts = set()
    for _ in range(200):
        b = next(loader)
        for j in np.flatnonzero(b["reset"].numpy()):
            first = int(b["input_ids"][j, 0])
            if first == EOS:  # segment 0 starts at the document's leading EOS
                starts.add(0)
                continue
            d = doc_of(data, first)
            pos = int(np.flatnonzero(data.tokens == first)[0]) - int(data.offsets[d])  # EOS included
            assert pos % 7 == 0  # segment k starts at k * (L - overlap)
            starts.add(pos // 7)
    assert len(starts) > 15  # not only at the start of documents


def distinct_documents(loader, data, steps: int) -> int:
    seen = set()
    for _ in range(steps):
        b = next(loader)
        for t in b["labels"][b["labels"] != IGNORE_INDEX].tolist():
            seen.add(doc_of(data, t))
    return len(seen)


def test_lane_spans_see_about_as_many_documents_as_shuffled_training():
    """100 documents of 50 segments, batch 4, 200 steps: shuffled segments reach nearly every document;
    whole-document lanes walk through 4 x 200 / 50 = 16; runs of K=4 draw 200 run starts, which reach ~86."""
    data = unique_split([351] * 100)  # 50 segments of L=8 each
    steps = 200
    shuffled = distinct_documents(SegmentLoader(data, 8, 4, seed=1), data, steps)
    lanes = distinct_documents(SegmentLoader(data, 8, 4, seed=1, contiguous=True), data, steps)
    spans = distinct_documents(SegmentLoader(data, 8, 4, seed=1, contiguous=True, lane_span=4), data, steps)
    print(f"distinct documents over {steps} steps: shuffled {shuffled}, lanes {lanes}, spans of 4 {spans}")
    assert shuffled >= 95 and lanes <= 20
    assert spans >= 0.8 * shuffled


def test_spans_are_deterministic_shard_like_one_process_and_resume_exactly():
    data = unique_split(LENGTHS * 3)
    kw = dict(seed=7, contiguous=True, lane_span=3)
    single = SegmentLoader(data, 8, 6, **kw)
    ranks = [SegmentLoader(data, 8, 2, rank=r, world_size=3, **kw) for r in range(3)]
    reference = []
    for _ in range(40):
        full = next(single)
        reference.append(full)
        parts = [next(r) for r in ranks]
        for k in full:
            assert torch.equal(full[k], torch.cat([p[k] for p in parts]))
    again = take(SegmentLoader(data, 8, 6, **kw), 40)
    assert all(same(a, b) for a, b in zip(again, reference))
    other = take(SegmentLoader(data, 8, 6, **{**kw, "seed": 8}), 40)
    assert not all(same(a, b) for a, b in zip(other, reference))
    for k in (1, 5, 23):
        loader = SegmentLoader(data, 8, 6, **kw)
        take(loader, k)
        state = json.loads(json.dumps(loader.state_dict()))  # plain JSON
        assert state["mode"] == "spans" and state["lane_span"] == 3
        resumed = SegmentLoader(data, 8, 6, **kw)
        resumed.load_state_dict(state)
        assert all(same(a, b) for a, b in zip(take(resumed, 40 - k), reference[k:]))


def test_resume_refuses_another_span_or_whole_document_lanes():
    data = unique_split(LENGTHS)
    state = SegmentLoader(data, 8, 2, contiguous=True, lane_span=3).state_dict()
    with pytest.raises(DataError, match="lane_span=3 .*this loader: 4"):
        SegmentLoader(data, 8, 2, contiguous=True, lane_span=4).load_state_dict(state)
    with pytest.raises(DataError, match="mode='spans'"):
        SegmentLoader(data, 8, 2, contiguous=True).load_state_dict(state)
    old = SegmentLoader(data, 8, 2, contiguous=True).state_dict()
    assert "lane_span" not in old  # whole-document lanes save exactly what they saved before lane spans
    with pytest.raises(DataError, match="contiguous=True"):
        SegmentLoader(data, 8, 2, lane_span=2)
    with pytest.raises(DataError, match="lane_span must be an integer"):
        SegmentLoader(data, 8, 2, contiguous=True, lane_span=-1)


# -- the trainer --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lanes")
    corpus = write_corpus(root / "corpus", n_docs=12)
    (root / "tiny.yaml").write_text(TINY_YAML + f"precision: fp32\nfinal_eval: false\ndata: {corpus}\n"
                                                f"cache_dir: {root / 'cache'}\n")
    return root


def test_train_lane_span_resets_carry_on_jumps_and_resumes_exactly(env, tmp_path, monkeypatch):
    import blockstate.training.steps as steps_mod
    from blockstate.training.metrics import read_metrics

    real, resets, stop_at = steps_mod.step_nll, [], [0]

    def spy(model, batch, device, autocast, carry=None, stateful=False):
        resets.append(batch["reset"].tolist())
        if len(resets) == stop_at[0]:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer checkpoints after this step and stops
        return real(model, batch, device, autocast, carry, stateful)

    monkeypatch.setattr(steps_mod, "step_nll", spy)
    slide = tmp_path / "slide.yaml"  # without BST's S, which slide has not
    slide.write_text((env / "tiny.yaml").read_text().replace(",\n             num_context_states: 4}", "}"))
    base = ["train", "--config", str(slide), "--model", "slide", "--lane-span", "2", "--steps", "6",
            "--save-every", "0"]
    ref = tmp_path / "ref"
    assert main([*base, "--output", str(ref)]) == 0
    assert resets[0] == [True] * 4
    for j in range(4):  # no lane runs more than 2 segments without a reset (a jump to a new start)
        at = [i for i, r in enumerate(resets) if r[j]]
        assert max(np.diff([*at, len(resets)])) <= 2, at
    assert json.loads((ref / "results.json").read_text())["config"]["lane_span"] == 2

    run = tmp_path / "run"
    resets.clear()
    stop_at[0] = 3
    assert main([*base, "--output", str(run)]) == 130
    state = json.loads((run / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())
    assert state["loader"]["mode"] == "spans" and state["loader"]["lane_span"] == 2
    stop_at[0] = 0
    assert main(["train", "--resume", str(run)]) == 0

    def losses(r):
        return {m["step"]: m["loss"] for m in read_metrics(r / "metrics.jsonl") if m["kind"] == "train"}

    assert losses(run) == losses(ref)


def test_train_lane_span_errors(env, tmp_path, capsys):
    base = ["train", "--config", str(env / "tiny.yaml"), "--steps", "1", "--output", str(tmp_path / "r")]
    err = one_line_error(capsys, [*base, "--lane-span", "4"])  # bst-sh-s4 carries no state
    assert "--lane-span" in err and "carry state" in err
    assert not (tmp_path / "r" / "run.json").exists()
    err = one_line_error(capsys, [*base, "--model", "slide", "--lane-span", "-1"])
    assert "--lane-span" in err
