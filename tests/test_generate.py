"""Hugging Face generate() through the streaming cache."""

import pytest
import torch
from conftest import small_config

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


def test_stream_ids_greedy_equals_generate_and_fallback(model):
    from blockstate.generation import SamplingConfig, stream_ids

    prompt = torch.randint(1, 61, (9,)).tolist()
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    streamed = list(stream_ids(model, prompt, cfg))
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert streamed == hf[0, 9:].tolist()

    class NoCache(torch.nn.Module):  # any causal LM without a streaming cache: parallel fallback
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(ids)

    assert list(stream_ids(NoCache(model), prompt, cfg)) == streamed


def test_sampling_filters():
    from blockstate.generation import SamplingConfig, next_token

    logits = torch.tensor([0.0, 5.0, 4.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    picks = {next_token(logits, torch.tensor([], dtype=torch.long), SamplingConfig(top_k=2), gen) for _ in range(50)}
    assert picks == {1, 2}
    picks = {next_token(logits, torch.tensor([], dtype=torch.long), SamplingConfig(top_p=0.1), gen) for _ in range(20)}
    assert picks == {1}
    greedy = SamplingConfig(temperature=0, repetition_penalty=2.0)
    assert next_token(logits, torch.tensor([1]), greedy, gen) == 2  # 5.0 / 2 < 4.9
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=1.5).validate()
