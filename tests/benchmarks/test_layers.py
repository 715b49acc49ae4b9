"""`blockstate bench layers`: runs end to end on tiny layers, writes its files, refuses bad flags in one line."""

import json

import pytest
import torch

from blockstate.benchmarks import layers as bench
from blockstate.cli.main import main

TINY = ["--dim", "32", "--heads", "4", "--block", "8", "--state", "4", "--repeats", "1"]


def run_tiny(tmp_path, names: str, *extra: str) -> None:
    assert main(["bench", "layers", "--layers", names, "--lengths", "16,32", "--out", str(tmp_path), *TINY,
                 *extra]) == 0


def test_bench_layers_writes_table_json_and_png(tmp_path, capsys):
    names = "bst-sh-s4,bst-mf-s4,bst-mh-unstructured,brect,slide,block,full"
    run_tiny(tmp_path, names, "--no-memory")
    out = capsys.readouterr().out
    assert "forward, median ms" in out and "peak extra memory" in out and "torch" in out
    payload = json.loads((tmp_path / "layers-cpu.json").read_text())
    assert (tmp_path / "layers-cpu.png").stat().st_size > 0
    assert payload["lengths"] == [16, 32] and payload["machine"]["device"]
    for name in names.split(","):
        result = payload["results"][name]
        for mode in ("forward", "backward"):
            assert set(result[mode]) == {"16", "32"}
            t = result[mode]["32"]
            assert 0 < t["min"] <= t["median"] <= t["max"]
    assert "bst-sh-s4 t(L)/t(L/2)" in payload["ratios"]
    # a saved result re-renders without running anything
    assert main(["bench", "layers", "--report", str(tmp_path / "layers-cpu.json")]) == 0
    again = capsys.readouterr().out
    assert "## goals" in again and "BST:SH forward vs full" in again


def test_memory_column_grows_with_length(tmp_path):
    run_tiny(tmp_path, "bst-sh-s4,full")
    payload = json.loads((tmp_path / "layers-cpu.json").read_text())
    for name in ("bst-sh-s4", "full"):
        memory = payload["results"][name]["memory"]
        assert 0 < memory["16"] < memory["32"], (name, memory)


def test_peak_bytes_sees_a_temporary_allocation_and_its_release():
    def step():
        t = torch.ones(16 * 2**20)  # 64 MiB, freed before the call returns: only the peak sees it
        u = t[: 2**20] + 1  # a new 4 MiB tensor while t is alive
        del t, u

    assert bench.peak_bytes(step, torch.device("cpu")) == 68 * 2**20
    tracker = bench.PeakTensorMemory()
    with tracker:
        step()
    assert tracker.current == 0


def test_time_limit_stops_a_layer_and_says_so(tmp_path):
    s = bench.Setting(dim=32, heads=4, block=8, state=4)
    grid = bench.run_grid(["block", "full"], [16, 32], s, torch.device("cpu"), repeats=1, time_limit=0.0,
                          memory=False, log=lambda _: None)
    assert set(grid["stopped"]) == {"block", "full"} and "at 16" in grid["stopped"]["full"]
    assert 32 not in grid["results"]["full"]["forward"]


def test_every_layer_maps_the_input_shape_to_itself():
    s = bench.Setting(dim=32, heads=4, block=8, state=4)
    x = torch.randn(2, 20, 32)
    for name in bench.LAYERS:
        if name == "peer-brect" and not bench.peer_available():
            continue
        assert bench._call(bench.build(name, s, 20), x).shape == x.shape, name


@pytest.mark.parametrize("argv, message", [
    (["--layers", "bst-sh-s9"], "--layers"),
    (["--lengths", "4k,x"], "--lengths"),
    (["--dim", "30", "--heads", "4"], "divisible"),
    (["--batch", "0"], "--batch"),
    (["--report", "/nonexistent/layers-cpu.json"], "--report"),
])
def test_bad_flags_get_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert main(["bench", "layers", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_lengths_parse_like_the_paper():
    assert bench.parse_lengths("1k,65k,4096,2k") == [1024, 2048, 4096, 65536]
