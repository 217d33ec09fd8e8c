"""The GPU protocol script runs end to end on CPU in its dry mode, so it does not rot while no GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import write_corpus

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_protocol_dry_run_reports_every_method(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_protocol.py"), "--dry", "--methods", "adamw,scale",
                           "--data", str(corpus), "--cache", str(tmp_path / "cache"), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["method"] for r in records] == ["adamw", "scale"]
    for r in records:
        assert r["tokens_per_second"] > 0 and r["mfu"] > 0 and r["peak_bytes"] > 0 and r["val_perplexity"] > 1
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| scale |" in report and "peak-memory benchmark" in report and "failed" not in report


def test_gpu_protocol_names_the_missing_corpus_and_how_to_fill_it(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_protocol.py"), "--dry",
                           "--data", str(tmp_path / "nothing")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=120)
    assert proc.returncode != 0 and "--prepare" in proc.stderr
