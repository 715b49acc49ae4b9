"""Hugging Face generate() through the streaming cache."""

import pytest
import torch
from helpers.models import small_config

from blockstate import BlockStateForCausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BlockStateForCausalLM(small_config("mf", "s4d", attend_previous_block=True)).eval()


def test_greedy_generate_equals_manual_parallel_loop(model):
    ids = torch.randint(1, 61, (2, 11))
    out = model.generate(ids, max_new_tokens=14, do_sample=False, pad_token_id=0)
    x = ids
    with torch.no_grad():
        for _ in range(14):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, x)


def test_beam_search_with_cache_equals_without(model):
    ids = torch.randint(1, 61, (2, 10))
    kwargs = dict(max_new_tokens=9, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_left_padded_generate_equals_rows_alone(model):
    rows = [torch.randint(1, 61, (n,)) for n in (12, 5)]
    prompt = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for b, r in enumerate(rows):
        prompt[b, 12 - len(r) :] = r
        mask[b, 12 - len(r) :] = 1
    out = model.generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    for b, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(out[b, 12:], alone[0, len(r) :])


def test_sampling_options_and_eos(model):
    ids = torch.randint(1, 61, (3, 6))
    torch.manual_seed(1)
    out = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=5, top_p=0.9,
                         repetition_penalty=1.3, pad_token_id=0, num_return_sequences=2)
    assert out.shape == (6, 14)
    first = model.generate(ids[:1], max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1].item()
    stopped = model.generate(ids[:1], max_new_tokens=8, do_sample=False, eos_token_id=first, pad_token_id=0)
    assert stopped.shape[1] == 7  # stops right after emitting EOS


def test_generate_text_is_hf_generate_streamed(model):
    """The one generation path: generate_text = HF generate() after an EOS, streamed piece by piece."""
    from blockstate.data import BytesTokenizer
    from blockstate.generation import SamplingConfig, generate_text

    class Small(BytesTokenizer):  # the test model has 61 ids: "bytes" 0-59, EOS 60
        vocab_size, eos_id = 61, 60

        def decode(self, ids):
            return super().decode(i for i in ids if i != 60)

    tok = Small()
    pieces: list[str] = []
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    text = generate_text(model, tok, "!#$", cfg, write=pieces.append)
    hf = model.generate(torch.tensor([[60, 33, 35, 36]]), max_new_tokens=12, do_sample=False, eos_token_id=60,
                        pad_token_id=60)
    new = [i for i in hf[0, 4:].tolist() if i != 60]
    assert text == "".join(pieces) == tok.decode(new)
    sampled = [generate_text(model, tok, "!", SamplingConfig(max_new_tokens=10, seed=s)) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # seeded
    state = torch.get_rng_state()
    generate_text(model, tok, "!", SamplingConfig(max_new_tokens=5, seed=3))
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG stream is untouched


def test_generate_stops_at_the_configured_eos(model):
    from blockstate.generation import SamplingConfig, generate_ids, set_token_ids

    ids = torch.randint(1, 61, (1, 6))
    first = model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1].item()
    set_token_ids(model, first)
    try:
        assert model.config.eos_token_id == model.generation_config.eos_token_id == first
        assert model.generate(ids, max_new_tokens=8, do_sample=False).shape[1] == 7  # no eos_token_id passed
        assert generate_ids(model, ids[0].tolist(), SamplingConfig(max_new_tokens=8, temperature=0), first) == []
    finally:
        set_token_ids(model, 0)


def test_utf8_streamer_holds_back_partial_characters():
    from blockstate.data import BytesTokenizer
    from blockstate.generation import Utf8Streamer

    pieces: list[str] = []
    streamer = Utf8Streamer(BytesTokenizer().decode, pieces.append)
    streamer.put(torch.tensor([[256, 100]]))  # the prompt: skipped
    for b in "é🙂a".encode():
        streamer.put(torch.tensor([b]))
    streamer.put(torch.tensor([0xFF]))  # an invalid byte: shown (as U+FFFD) when generation ends
    streamer.end()
    assert pieces == ["é", "🙂", "a", "\ufffd"]


def test_sampling_config_checks_values():
    from blockstate.generation import SamplingConfig

    for bad, flag in [(dict(top_p=1.5), "--top-p"), (dict(temperature=-1), "--temperature"),
                      (dict(top_k=-1), "--top-k"), (dict(repetition_penalty=0), "--repetition-penalty")]:
        with pytest.raises(ValueError, match=flag):
            SamplingConfig(**bad).validate()
    greedy = SamplingConfig(temperature=0).generation_config(5)
    assert greedy.do_sample is False and greedy.eos_token_id == 5
    sampled = SamplingConfig(top_k=None).generation_config(5)
    assert sampled.do_sample and sampled.top_k == 0 and sampled.top_p == 1.0  # no model default leaks in
