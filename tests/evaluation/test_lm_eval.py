"""``blockstate lm-eval``: lm-eval-harness's command line on a task defined here (jsonl + task YAML through
``--include_path``, offline), checked against the project's own evaluation of the same text."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from blockstate.data import BytesTokenizer, TokenizedSplit  # noqa: E402
from blockstate.evaluation.evaluate import evaluate  # noqa: E402
from blockstate.registry import create_model  # noqa: E402

MAX_LENGTH = 40  # lm-eval's window of predictions
# lm-eval's last rolling window takes extra context to fill MAX_LENGTH predictions, where the project's last segment
# is shorter: lengths that are multiples of MAX_LENGTH (or fit one window) make the two protocols the same
TEXTS = [
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\nprint(add(1, 2), sub(3, 4))\n",
    "import os\nimport sys\n\nfor name in sorted(os.listdir('.')):\n    print(name, file=sys.stderr)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
]
DOCS = [(text * 2)[:n] for text, n in zip(TEXTS, (80, 120, 37))]
CHOICES = [  # short enough that context + continuation fit in one window: no truncation
    {"context": "def add(a, b):\n    return", "choices": [" a + b\n", " a - b\n", " b\n"], "label": 0},
    {"context": "import os\nimport", "choices": [" sys\n", " os\n"], "label": 0},
    {"context": "class", "choices": [" Point:\n", " Line:\n", " x"], "label": 0},
]
PROMPTS = [{"prompt": "def add(a, b):\n", "target": "    return a + b"}, {"prompt": "import", "target": " os"},
           {"prompt": "class Point:\n    def", "target": " __init__(self, x, y):"}]
TASKS = {
    "bs_rolling": ("docs.jsonl", [{"text": d} for d in DOCS], """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""),
    "bs_choice": ("choices.jsonl", CHOICES, """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""),
    "bs_generate": ("prompts.jsonl", PROMPTS, """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
"""),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small BST fitted for a few steps to the documents above, so its predictions depend on the context (a
    model at init scores every byte about alike, and a one-token misalignment would go unnoticed)."""
    root = tmp_path_factory.mktemp("lm-eval") / "model"
    torch.manual_seed(0)
    tok = BytesTokenizer()
    model = create_model("bst-sh-s4", size="tiny", vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, block_size=16, max_train_length=64)
    rows = [torch.tensor([tok.eos_id, *tok.encode(d)]) for d in DOCS]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=tok.eos_id) for r in rows])
    labels = torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=-100) for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(root)
    tok.save(root / "tokenizer")
    return root


def write_tasks(root: Path) -> Path:
    for name, (data_file, rows, body) in TASKS.items():
        (root / data_file).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                           f"    test: {root / data_file}\ntest_split: test\n{body}")
    return root


def project_nll(model, texts: list[str], length: int) -> list[float]:
    """Summed NLL of each text read as a document (after the separator), by ``blockstate eval``'s evaluate."""
    tok = BytesTokenizer()
    out = []
    for text in texts:
        split = TokenizedSplit.from_documents([torch.tensor(tok.encode(text)).numpy()], [len(text.encode())],
                                              tok.eos_id, tok.vocab_size)
        out.append(evaluate(model, split, length, positions=False).nll)
    return out


def samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def harness_run(checkpoint, tmp_path_factory) -> tuple[Path, str]:
    """One ``blockstate lm-eval`` process over the three tasks, batched (rows of different lengths together)."""
    root = tmp_path_factory.mktemp("lm-eval-run")
    (root / "tasks").mkdir()
    tasks = write_tasks(root / "tasks")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(root / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "blockstate", "lm-eval", "--model", "blockstate", "--model_args",
           f"pretrained={checkpoint},max_length={MAX_LENGTH},device=cpu", "--tasks", ",".join(TASKS),
           "--include_path", str(tasks), "--batch_size", "4", "--output_path", str(root / "out"), "--log_samples"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "out", res.stdout


def test_prints_the_result_table(harness_run):
    _, stdout = harness_run
    assert "blockstate (" in stdout
    for name in TASKS:
        assert f"|{name}" in stdout.replace(" ", "") or name in stdout, stdout


def test_rolling_loglikelihood_equals_the_projects_evaluation(harness_run, checkpoint):
    """lm-eval's disjoint windows of MAX_LENGTH predictions are the project's segments of MAX_LENGTH + 1 tokens:
    the same numbers, document by document, and the same bits per byte."""
    from transformers import AutoModelForCausalLM

    out, _ = harness_run
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ours = project_nll(model, DOCS, MAX_LENGTH + 1)
    theirs = [-float(s["resps"][0][0]) for s in samples(out, "bs_rolling")]  # JSON holds strings
    assert len(theirs) == len(DOCS)
    for a, b in zip(ours, theirs):
        assert abs(a - b) < 1e-4 * abs(a), (ours, theirs)
    assert sum(ours) / sum(len(d) for d in DOCS) < 0.5 * math.log(257)  # the fitted model is far from uniform
    (results,) = out.rglob("results_*.json")
    bpb = json.loads(results.read_text())["results"]["bs_rolling"]["bits_per_byte,none"]
    assert abs(bpb - sum(ours) / (math.log(2) * sum(len(d.encode()) for d in DOCS))) < 1e-5


def test_choice_loglikelihoods_equal_the_projects_evaluation(harness_run, checkpoint):
    """log P(choice | context) = NLL(context) - NLL(context + choice), both read after the separator."""
    from transformers import AutoModelForCausalLM

    out, _ = harness_run
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    rows = samples(out, "bs_choice")
    assert len(rows) == len(CHOICES)
    for item, row in zip(CHOICES, rows):
        (context,) = project_nll(model, [item["context"]], 64)
        full = project_nll(model, [item["context"] + c for c in item["choices"]], 64)
        theirs = [float(r[0]) for r in row["filtered_resps"]]
        assert len(theirs) == len(full)
        for f, t in zip(full, theirs):
            assert abs((context - f) - t) < 1e-4 * max(1.0, abs(t)), (context, full, theirs)


def test_generation_equals_greedy_generate(harness_run, checkpoint):
    """Batched (left-padded) generation through the harness = one prompt at a time through generate()."""
    from transformers import AutoModelForCausalLM

    out, _ = harness_run
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tok = BytesTokenizer()
    rows = samples(out, "bs_generate")
    assert len(rows) == len(PROMPTS)
    for item, row in zip(PROMPTS, rows):
        ids = torch.tensor([[tok.eos_id, *tok.encode(item["prompt"])]])
        new = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_id,
                             pad_token_id=tok.eos_id)[0, ids.shape[1]:].tolist()
        if tok.eos_id in new:
            new = new[: new.index(tok.eos_id)]
        expected = tok.decode(new).split("\n")[0]
        assert row["resps"][0][0] == expected, (row["resps"], expected)


def test_help_shows_the_command(capsys):
    from blockstate.cli.main import main

    assert main(["lm-eval", "--help"]) == 0
    assert "--model blockstate" in capsys.readouterr().out


class Request:  # what lm-eval hands a model: ``args`` of one request
    def __init__(self, *args):
        self.args = args


@pytest.mark.parametrize("name", ["gss-hybrid", "brect"])
def test_other_models_in_process(name, tmp_path):
    """The wrapper on a baseline with its own inference path (GSS's recurrence; BRecT, whose cache takes no
    padding, so its prompts are batched by length): batched scores and generations equal one request at a time."""
    from blockstate.evaluation.lm_eval import BlockStateLM

    torch.manual_seed(0)
    tok = BytesTokenizer()
    overrides = {"gss-hybrid": dict(gss_hidden_size=64, gss_narrow_size=8, attention_layers=[1]),
                 "brect": dict(num_state_vectors=4, recurrent_layers=[1])}[name]
    model = create_model(name, size="tiny", vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, block_size=8, max_train_length=32, **overrides)
    model.eval().save_pretrained(tmp_path)
    tok.save(tmp_path / "tokenizer")
    lm = BlockStateLM(str(tmp_path), device="cpu", batch_size=3, max_length=MAX_LENGTH)
    one = BlockStateLM(str(tmp_path), device="cpu", batch_size=1, max_length=MAX_LENGTH)
    pairs = [Request(c["context"], choice) for c in CHOICES for choice in c["choices"]]
    batched, alone = lm.loglikelihood(pairs), one.loglikelihood(pairs)
    assert max(abs(a[0] - b[0]) for a, b in zip(batched, alone)) < 1e-4
    (context,) = project_nll(lm.model, [CHOICES[0]["context"]], 64)
    (full,) = project_nll(lm.model, [CHOICES[0]["context"] + CHOICES[0]["choices"][0]], 64)
    assert abs((context - full) - batched[0][0]) < 1e-4
    gen = [Request(p["prompt"], {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}) for p in PROMPTS]
    assert lm.generate_until(gen) == one.generate_until(gen)
