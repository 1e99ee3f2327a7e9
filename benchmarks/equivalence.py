"""Is a refactor free of behaviour changes? A fingerprint of one revision of HILT that another revision must
reproduce bit for bit:

- the whole model's logits, and every parameter's gradient, for each ILT kind and the plain model, windows 2 and 3,
  fp32 and bf16 autocast, training mode (dropout on, seeded) and eval mode;
- a fixed-seed `hilt train` of the design and of ilt_kind depth, in fp32 and in bf16: every metrics.jsonl loss and
  a hash of the final weights;
- greedy and seeded `hilt generate` text from each of those checkpoints.

Each revision runs with its own ``src/`` first on the path (the layout of either works: the script drives the
``hilt`` command and ``hilt.model``, whose names both keep):

    git worktree add /tmp/before <rev>
    PYTHONPATH=/tmp/before/src .venv/bin/python benchmarks/equivalence.py /tmp/before.json    # ~10 min, 2 cores
    PYTHONPATH=src .venv/bin/python benchmarks/equivalence.py /tmp/after.json
    .venv/bin/python benchmarks/equivalence.py --compare /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def model_fingerprint() -> dict:
    import torch

    from hilt.model import HierarchicalTransformer, ModelConfig

    out = {}
    for kind in ("design", "depth", "dense", "x0", "plain"):
        for window in (2, 3):
            torch.manual_seed(0)
            arch = {"n_layers_ilt": 0} if kind == "plain" else {"ilt_kind": kind}
            config = ModelConfig(
                vocab_size=100, d_model=32, n_layers=4, n_heads=2, ilt_dim=16, ilt_window=window, **arch
            )
            model = HierarchicalTransformer(config)
            idx = torch.randint(0, 100, (2, 7))
            for amp in (False, True):
                model.train()
                torch.manual_seed(1)
                with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                    logits = model(idx, progress=0.3)
                logits.float().sum().backward()
                grads = [p.grad for p in model.parameters()]
                out[f"{kind} w{window} {'bf16' if amp else 'fp32'} train"] = digest([logits, *grads])
                model.zero_grad()
                model.eval()
                with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=amp):
                    out[f"{kind} w{window} {'bf16' if amp else 'fp32'} eval"] = digest([model(idx)])
    return out


def hilt(*args: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "hilt", *args], capture_output=True, text=True, env=dict(os.environ)
    )
    if run.returncode:
        sys.exit(f"hilt {args[0]} failed:\n{run.stderr[-3000:]}")
    return run.stdout


def training_fingerprint(tmp: Path) -> dict:
    import torch

    text = tmp / "text.txt"
    text.write_text((REPO / "data.txt").read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    out = {}
    for kind in ("design", "depth"):
        for precision in ("fp32", "bf16"):
            run = tmp / f"{kind}_{precision}"
            hilt(
                "train", "--text_file", str(text), "--epochs", "1", "--batch_size", "8", "--seq_len", "32",
                "--model_dim", "64", "--n_layers", "3", "--n_heads", "4", "--ilt_dim", "32", "--max_tokens", "6000",
                "--out_dir", str(run), "--ilt_kind", kind, "--seed", "3", "--ilt_stats_every", "0",
                "--cache_dir", str(tmp / "cache"), *(["--no_amp"] if precision == "fp32" else []),
            )  # fmt: skip
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            state = torch.load(run / "best_model.pt", map_location="cpu", weights_only=True)[
                "model_state_dict"
            ]
            sample = (
                "generate",
                "--model_path",
                str(run / "best_model.pt"),
                "--prompt",
                "ROMEO:",
                "--max_len",
                "40",
            )
            out[f"{kind} {precision}"] = {
                "losses": [{k: v for k, v in row.items() if "loss" in k} for row in rows],
                "weights": digest(state[k] for k in sorted(state)),
                "greedy": hilt(*sample, "--temperature", "0"),
                "seeded": hilt(*sample, "--temperature", "1", "--seed", "5"),
            }
            print(kind, precision, out[f"{kind} {precision}"]["weights"][:12], file=sys.stderr, flush=True)
    return out


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    differ = [key for key in a if a[key] != b.get(key)]
    for key in a:
        print(f"{key}: {'DIFFERENT' if key in differ else 'identical'}")
    return 1 if differ else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", help="JSON fingerprint to write")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two fingerprints")
    args = p.parse_args()
    if args.compare:
        return compare(*map(Path, args.compare))
    if not args.out:
        p.error("give the JSON file to write, or --compare BEFORE AFTER")
    fingerprint = {"model": model_fingerprint()}
    with tempfile.TemporaryDirectory() as tmp:
        fingerprint.update(training_fingerprint(Path(tmp)))
    Path(args.out).write_text(json.dumps(fingerprint, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
