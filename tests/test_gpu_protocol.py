"""The GPU protocol runs end to end on CPU in its dry mode, every item, from a checkout where lowmem is
not installed and PYTHONPATH is unset (as on the lent GPU machine), so it does not rot while no GPU
is lent."""

from __future__ import annotations

import importlib.util
import json
import os
import site
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest
from conftest import write_corpus

from lowmem.data import open_source, train_bpe

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_protocol.py"
ITEMS = ["environment", "methods", "distributed", "peak-memory", "resume", "gradient-release", "large", "compile",
         "optimizer-steps"]


def _belongs_to_lowmem(entry: Path) -> bool:
    """lowmem's package, metadata or editable-install finder, or a .pth file that puts it on the path."""
    if "lowmem" in entry.name.lower():
        return True
    if entry.suffix == ".pth":
        text = entry.read_text(errors="replace")
        return "lowmem" in text or str(ROOT / "src") in text
    return False


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """An interpreter with this environment's packages (torch, tokenizers, ...) but without lowmem:
    a venv whose site-packages links every entry of this one's except lowmem's own (its package, its
    metadata, and the .pth hook of an editable install)."""
    target = tmp_path_factory.mktemp("bare-venv")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(target)
    python = target / "bin" / "python"
    bare_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    for directory in site.getsitepackages():
        for entry in Path(directory).iterdir():
            if not _belongs_to_lowmem(entry) and not (bare_site / entry.name).exists():
                (bare_site / entry.name).symlink_to(entry)
    return str(python)


def _environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1"}


def test_the_bare_interpreter_cannot_import_lowmem(bare_python):
    proc = subprocess.run([bare_python, "-c", "import torch, tokenizers; import lowmem"], capture_output=True,
                          text=True, env=_environment(), cwd="/", timeout=120)
    assert proc.returncode != 0 and "No module named 'lowmem'" in proc.stderr, proc.stderr[-2000:]


def test_gpu_protocol_dry_run_runs_every_item_without_an_install(tmp_path, bare_python):
    corpus = write_corpus(tmp_path / "corpus")
    tokenizer = tmp_path / "tokenizer.json"
    train_bpe(open_source(str(corpus), "train"), 300, tokenizer)
    # One real method and one that cannot start: a failed method is recorded and the rest still runs.
    proc = subprocess.run([bare_python, str(SCRIPT), "--dry", "--methods", "scale,no-such-method",
                           "--data", str(corpus), "--tokenizer", str(tokenizer), "--output", str(tmp_path / "runs"),
                           "--report-dir", str(tmp_path / "report")],
                          capture_output=True, text=True, env=_environment(), cwd=tmp_path, timeout=900)
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    items = {item["name"]: item for item in results["items"]}
    assert list(items) == ITEMS, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = {name: item["status"] for name, item in items.items()}
    assert status == {**dict.fromkeys(ITEMS, "ok"), "methods": "failed"}, json.dumps(items, indent=1)[-6000:]
    assert proc.returncode == 1  # not every item passed

    # Every child imported lowmem from this checkout's src/, which only the script's PYTHONPATH offers.
    source = str(ROOT / "src" / "lowmem" / "__init__.py")
    for item in items.values():
        assert item["lowmem_imported_from"] == [source], item["name"]

    scale = items["methods"]["data"]["scale"]
    assert scale["steady"]["tokens_per_second"] > 0 and scale["steady"]["first_step"] == 4
    assert scale["mfu"] > 0 and scale["peak_bytes"] > 0 and scale["val_perplexity"] > 1
    assert "no-such-method" in items["methods"]["data"]["no-such-method"]["error"]

    distributed = items["distributed"]["data"]
    assert set(distributed) == {"plain", "ddp", "fsdp2"}
    steps = results["settings"]["distributed_steps"]
    assert all(len(run["losses"]) == steps and run["max_rel_diff"] <= results["loss_rtol"] for run in distributed.values())

    losses = {record["loss"] for record in items["peak-memory"]["data"]["records"]}
    assert losses == {"full logits", "chunked (1024 tokens)"}
    assert all(r["estimate_total_bytes"] > 0 and r["chunked_loss"] in ("off", "on")
               for r in items["peak-memory"]["data"]["records"])

    resume = items["resume"]["data"]
    # Steps 1-2 kept from before the checkpoint, 3-4 trained again after the resume: all equal on CPU.
    assert resume["bitwise"] and resume["resumed"] == resume["whole"] and len(resume["whole"]) == 4

    release = items["gradient-release"]["data"]
    assert [r["release"] for r in release["records"]] == [True, False]
    assert all(r["peak_bytes"] > 0 and r["estimate_peak_bytes"] > 0 and r["steps"] == 5 for r in release["records"])
    assert release["records"][0]["gradient_high_water_bytes"] > 0

    large = items["large"]["data"]["cpu-micro"]
    assert large["peak_bytes"] > 0 and large["estimate_total_bytes"] > 0

    compiled = items["compile"]["data"]
    assert list(compiled) == ["eager", "compiled blocks", "compiled blocks + step"]
    assert all(v["ratio_to_eager"] > 0 and v["first_step_seconds"] > 0 and v["val_perplexity"] > 1
               for v in compiled.values())

    steps = items["optimizer-steps"]["data"]["lines"]
    assert [line.split()[0] for line in steps if "ms/step" in line] == ["muon-batched", "galore-batched",
                                                                         "adamw-compiled", "galore-compiled",
                                                                         "scale-compiled"]
    # Batched Newton-Schulz and batched low-rank Adam: the per-matrix bits on the CPU.
    assert sum("-batched" in line and "max relative difference 0," in line for line in steps) == 2

    report = (tmp_path / "report" / "report.md").read_text()
    for name in ITEMS:
        assert f"## {name}:" in report
    assert "| scale |" in report and "full logits" in report


def test_gpu_protocol_names_the_missing_corpus_and_how_to_fill_it(tmp_path, bare_python):
    proc = subprocess.run([bare_python, str(SCRIPT), "--dry", "--data", str(tmp_path / "nothing")],
                          capture_output=True, text=True, env=_environment(), timeout=120)
    assert proc.returncode != 0 and "--prepare" in proc.stderr and "tokenizer" in proc.stderr


def test_each_item_is_recorded_as_it_ends_and_a_failed_or_stuck_item_does_not_stop_the_rest(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_protocol", SCRIPT)
    gp = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_protocol", gp)  # dataclasses look their module up there
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts src/ on it
    spec.loader.exec_module(gp)

    seen_by_the_last_item = {}

    def fine(p):
        return gp.Result(True, "fine", ["a"], [[1]])

    def broken(p):
        raise RuntimeError("broken item")

    def stuck(p):
        p.run_child(["sleep", "60"], tmp_path / "sleep.log")

    def last(p):
        # What is on disk before this item ends: every earlier item's outcome.
        results = json.loads((tmp_path / "results.json").read_text())
        seen_by_the_last_item.update({item["name"]: item["status"] for item in results["items"]})
        return gp.Result(True, "last", ["a"], [[2]])

    items = [gp.Item("fine", "ok", fine, 30), gp.Item("broken", "raises", broken, 30),
             gp.Item("stuck", "outlives its limit", stuck, 1), gp.Item("last", "ok", last, 30)]
    protocol = gp.Protocol(gp.Settings(), tmp_path, tmp_path / "tokenizer.json", tmp_path, ("scale",), 989.0)
    started = time.monotonic()
    assert not gp.run_items(protocol, items, tmp_path, {"mode": "test", "started": "now"})
    assert time.monotonic() - started < 30  # the sleeping child was killed at its item's limit
    results = json.loads((tmp_path / "results.json").read_text())
    assert [item["status"] for item in results["items"]] == ["ok", "failed", "timeout", "ok"]
    assert "broken item" in results["items"][1]["error"]
    assert seen_by_the_last_item == {"fine": "ok", "broken": "failed", "stuck": "timeout", "last": "pending"}
    assert "## stuck: outlives its limit — timeout" in (tmp_path / "report.md").read_text()
