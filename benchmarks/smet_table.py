"""The perplexity table of docs/results.md (SMET section) from a finished configs/smet-cpu.yaml grid.

    python benchmarks/smet_table.py runs/smet-cpu

One row per run: density, optimizer, growth (SET = random, RigL = gradient), SMET's density_lr, final
validation perplexity (token-weighted), its ratio to the dense AdamW run, and the optimizer state the
run measured (bytes of optimizer.state tensors).
"""
import json, sys
from pathlib import Path
import yaml
root = Path(sys.argv[1])
rows = []
dense = json.loads((root / "adamw-dense/lr0.001/summary.json").read_text())["val_perplexity"]
for s in sorted(root.glob("*/lr*/summary.json")):
    summary = json.loads(s.read_text())
    cfg = yaml.safe_load((s.parent / "config.yaml").read_text())
    model = cfg["model"]
    structure = model.get("structure") if isinstance(model, dict) else None
    d = structure["density"] if structure else 1.0
    topo = [i for i in cfg["optim"].get("interventions", []) if i["name"] == "topology"]
    grow = {"random": "SET", "gradient": "RigL"}[topo[0]["grow"]] if topo else "—"
    rule = cfg["optim"]["hparams"].get("density_lr", "—")
    rows.append((d, s.parent.parent.name, cfg["optim"]["name"], grow, rule, summary["val_perplexity"],
                 summary["memory"]["optimizer_state_bytes"], summary["tokens"]))
rows.sort(key=lambda r: (-r[0], r[5]))
print("| run | d | optimizer | growth | density_lr | val ppl | vs dense AdamW | optimizer state (measured) |")
print("|---|---|---|---|---|---|---|---|")
for d, name, opt, grow, rule, ppl, state, tokens in rows:
    print(f"| {name} | {d} | {opt} | {grow} | {rule} | {ppl:.2f} | {ppl / dense:.3f} | {state / 2**20:.2f} MiB |")
print(f"\ntokens per run: {sorted({r[7] for r in rows})}")
