"""Two revisions of HILT, timed taking turns: is a refactor free? Each revision runs in its own worker process
(its own ``src/`` on the path) and the driver asks them for one measurement at a time, alternating, so a drift in
the machine's speed hits both alike. Both build the same models from the same seed.

    git worktree add /tmp/before <rev>
    .venv/bin/python benchmarks/ab_revisions.py /tmp/before/src src            # ~6 min on 2 cores

Measured per revision: bench.py's training contestants at the default shape (the design's HILT, n_layers_ilt=0,
ilt_kind depth and x0; batch 16 x 128, the precision train.py would use, freed memory kept as train.py does) and
batch-1 cached decoding of the design's model (48 greedy tokens, bf16 where training autocasts; a model no step
trains, so its decoding copy is built once, as in bench.py's generation rows). ``--fp32``: all
of it in fp32, as on a CPU without native bf16; ``--prompt_tokens``: decoding after a longer prompt. Prints
medians and new/old ratios. The worker finds each piece where either layout keeps it (the flat modules before the
package was split by concern, the folders after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from hilt.device import autocast_dtype
from hilt.memory import freed_memory_kept
from hilt.model import HierarchicalTransformer, ModelConfig
try:
    from hilt.generation.generate import generate
    from hilt.training.config import TrainConfig
    from hilt.training.loss import LanguageModelLoss
    from hilt.training.trainer import build_optimizer
except ImportError:  # the flat layout
    from hilt.generate import generate
    from hilt.loss import LanguageModelLoss
    from hilt.train import TrainConfig, build_optimizer

dtype = None if sys.argv[2] == "fp32" else autocast_dtype(torch.device("cpu"), True)
x = torch.randint(0, 50260, (16, 129), generator=torch.Generator().manual_seed(0))
prompt = torch.randint(0, 50260, (1, int(sys.argv[3])), generator=torch.Generator().manual_seed(1))
jobs = {}
kinds = (("hilt", {}), ("plain", {"n_layers_ilt": 0}), ("depth", {"ilt_kind": "depth"}), ("x0", {"ilt_kind": "x0"}))
for name, ilt in kinds:
    torch.manual_seed(0)
    model = HierarchicalTransformer(ModelConfig(vocab_size=50260, **ilt))
    jobs[name] = (model, LanguageModelLoss(model), build_optimizer(model, TrainConfig(text_file="-")))

def train_step(name):
    model, loss_fn, opt = jobs[name]
    model.train()
    with freed_memory_kept(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        loss_fn(x[:, :-1], x[:, 1:], 0.055).backward()  # modulation_scale at mid-training, in either revision
    opt.step()
    opt.zero_grad(set_to_none=True)

torch.manual_seed(0)
decoder = HierarchicalTransformer(ModelConfig(vocab_size=50260)).eval()  # never trained: one decoding copy, kept

def decode():
    return generate(decoder, prompt, 48, temperature=0, compute_dtype=dtype)

for line in sys.stdin:
    what = line.strip()
    t0 = time.perf_counter()
    decode() if what == "decode" else train_step(what)
    print(json.dumps({"what": what, "seconds": time.perf_counter() - t0}), flush=True)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old_src", help="the src/ folder of the revision to compare against")
    p.add_argument("new_src", help="the src/ folder of the revision under test")
    p.add_argument("--rounds", type=int, default=12, help="timed rounds per measurement (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per worker")
    p.add_argument(
        "--fp32",
        action="store_true",
        help="train and decode in fp32 everywhere (what train.py and hilt generate do without native bf16)",
    )
    p.add_argument(
        "--prompt_tokens", type=int, default=8, help="decode's prompt length (default 8; up to 976)"
    )
    p.add_argument(
        "--tasks",
        default="hilt,plain,depth,x0,decode",
        help="which of hilt, plain, depth, x0, decode to time (default all five)",
    )
    args = p.parse_args()
    workers = {}
    for label, src in (("old", args.old_src), ("new", args.new_src)):
        env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
        workers[label] = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                str(args.threads),
                "fp32" if args.fp32 else "default",
                str(args.prompt_tokens),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
    times: dict[tuple[str, str], list[float]] = {}
    tasks = tuple(args.tasks.split(","))
    for r in range(args.warmup + args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for task in tasks:
            for label in order:
                w = workers[label]
                w.stdin.write(task + "\n")
                w.stdin.flush()
                seconds = json.loads(w.stdout.readline())["seconds"]
                if r >= args.warmup:
                    times.setdefault((label, task), []).append(seconds)
        print(f"round {r + 1}/{args.warmup + args.rounds}", file=sys.stderr, flush=True)
    for w in workers.values():
        w.stdin.close()
        w.wait()
    print("| measurement | old | new | new / old |\n| --- | --- | --- | --- |")
    names = {
        "hilt": "training step, HILT (s)",
        "plain": "training step, n_layers_ilt=0 (s)",
        "depth": "training step, ilt_kind depth (s)",
        "x0": "training step, ilt_kind x0 (s)",
        "decode": f"48 greedy tokens after {args.prompt_tokens}, batch 1, cached (s)",
    }
    for task in tasks:
        old, new = (statistics.median(times[(label, task)]) for label in ("old", "new"))
        print(f"| {names[task]} | {old:.4f} | {new:.4f} | {new / old:.3f} |")
    if {"hilt", "plain"} <= set(tasks):
        ratio = {
            label: statistics.median(times[(label, "hilt")]) / statistics.median(times[(label, "plain")])
            for label in ("old", "new")
        }
        print(f"| ILT cost (HILT / plain step) | {ratio['old']:.3f} | {ratio['new']:.3f} | |")
    paired = [n / o for o, n in zip(times[("old", tasks[0])], times[("new", tasks[0])], strict=True)]
    print(f"\n{tasks[0]}: new/old per round: {', '.join(f'{r:.3f}' for r in paired)}")


if __name__ == "__main__":
    main()
