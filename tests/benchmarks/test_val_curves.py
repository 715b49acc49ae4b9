"""scripts/val_curves.py: validation bits/byte by training tokens for several runs (table, JSON, PNG)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "val_curves.py"


def load():
    spec = importlib.util.spec_from_file_location("val_curves", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(path: Path, lr: float, bpbs: list[float]) -> Path:
    path.mkdir(parents=True)
    records = [{"kind": "train", "step": 1, "loss": 3.0, "tokens": 10}]
    records += [{"kind": "eval", "step": 10 * (i + 1), "val_bpb": b, "tokens": 1000 * (i + 1)} for i, b in
                enumerate(bpbs)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "results.json").write_text(json.dumps({"config": {"lr": lr, "model": "m"}}))
    return path


def test_curves_table_json_and_plot(tmp_path):
    a = fake_run(tmp_path / "a", 2e-3, [3.0, 2.5])
    b = fake_run(tmp_path / "b", 4e-3, [2.9, 2.6, 2.4])
    out = tmp_path / "out"
    assert load().main([f"bst={a}", f"gss={b}", "--out", str(out)]) == 0
    payload = json.loads((out / "val-curves.json").read_text())
    assert [p["bpb"] for p in payload["curves"]["gss"]["points"]] == [2.9, 2.6, 2.4]
    assert payload["curves"]["bst"]["lr"] == 2e-3
    table = (out / "val-curves.md").read_text()
    assert "| 10 | 1,000 | 3.0000 | **2.9000** |" in table and "| 30 | 3,000 | - | **2.4000** |" in table
    assert (out / "val-curves.png").stat().st_size > 0


def test_a_directory_without_metrics_is_named(tmp_path):
    with pytest.raises(SystemExit, match="metrics.jsonl not found"):
        load().main([f"x={tmp_path}", "--out", str(tmp_path / "o")])
