"""scripts/decode_back_to_back.py: two trees' decoding latency, interleaved in two worker processes."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "decode_back_to_back.py"


def load():
    spec = importlib.util.spec_from_file_location("decode_back_to_back", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_same_tree_twice_gives_both_medians(tmp_path, capsys):
    out = tmp_path / "b2b.json"
    src = str(ROOT / "src")
    load().main([src, src, "--context", "40", "--rounds", "2", "--steps", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [len(t) for t in result["times_ms"]] == [2, 2]  # every round timed both trees
    assert result["first_ms"] > 0 and result["second_ms"] > 0
    assert result["first_over_second"] == pytest.approx(result["first_ms"] / result["second_ms"])
    assert "first / second" in capsys.readouterr().out


def test_a_folder_without_the_package_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load().main([str(tmp_path), str(ROOT / "src"), "--rounds", "1"])
    assert "holds no blockstate package" in capsys.readouterr().err
