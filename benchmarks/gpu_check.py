"""HILT's CUDA side, checked end to end and timed on the first GPU it meets: `make gpu-check`.

    make gpu-check                                         # the README's .venv; ~4 min on one H100 (estimated)
    make gpu-check PY=python3                              # a GPU image whose python3 already has CUDA torch
    .venv/bin/python benchmarks/gpu_check.py --cpu_smoke   # every step on the CPU with a tiny model (~1 min)

Seven steps, in order; the first failure stops the run with one line on stderr and exit status 1:

1. train     the demo model (`make demo`'s shape) on data.txt for a few hundred steps in bf16, in fp16 with the
             GradScaler and in fp32: the loss falls, and bf16 and fp16 end within 2% of fp32's val loss. A bf16 run
             SIGKILLed mid-run and resumed must match the uninterrupted one (see RESUME below).
2. kernels   SDPA's flash and memory-efficient kernels against its math kernel on the trained model; `--compile`:
             the first step's time and the steady step time against eager.
3. generate  greedy text with and without the KV cache is the same; tokens/s at batch 1.
4. engine    16 and 64 concurrent requests: tokens/s and the ratio to one request.
5. export    `hilt export`, loaded by transformers with device_map and with .to(device): greedy text equals
             `hilt generate`'s.
6. torchrun  one epoch on every GPU there (NCCL; world size 1 is fine); the checkpoint loads and scores its own
             val loss again.
7. bench     HILT (design ILTs and plain) against HF GPT-2 of benchmarks/bench.py's shape, bf16 autocast:
             tokens/s, MFU against the GPU's bf16 peak (GPU_PEAK_TFLOPS, or --peak_tflops) and peak memory.

It prints one table (GPU, torch and CUDA versions) and writes it, dated, to benchmarks/results/gpu_check.md.
Without a CUDA device it says so in one line and exits 0. `--cpu_smoke` runs the same code on the CPU with tiny
sizes (tests/test_gpu_check.py does), so the GPU run's code cannot rot unseen between GPUs.

RESUME. On the CPU resume is bit-exact and that is what passes. On CUDA some kernels are nondeterministic, so every
run of step 1 sets torch.use_deterministic_algorithms(True, warn_only=True) and CUBLAS_WORKSPACE_CONFIG; the row
says whether the result is bit-exact, and it passes when (a) the first step after the resume reproduces the loss
the killed run logged for that step (same weights, optimizer, data position and dropout RNG: relative 1e-5) and
(b) the final val loss is within 0.5% of the uninterrupted run's.

HILT runs through its CLI (``hilt.cli.main``: in this process, so no step pays torch's import again, or as a child
process where one must be killed or torchrun must start it) and its Python API; the few internals this script
needs are imported in one place, ``hilt_api``, for the package's coming refactor. Each step has a timeout,
scaled by --timeout_scale.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data.txt"
RESULTS = REPO / "benchmarks" / "results" / "gpu_check.md"
VOCAB = 50260  # GPT-2's 50,257 ids + HILT's <PAD>, <BOS>, <EOS>: bench.py's models
PROMPT = "ROMEO:"

# Dense bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s (the "with sparsity" figures halved); the first
# name fragment found in torch.cuda.get_device_name() wins, so the longer fragments come first.
GPU_PEAK_TFLOPS = (
    ("H100 NVL", 835.0),
    ("H100 PCIE", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # also GH200
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


def gpu_peak_tflops(name: str, override: float | None = None) -> float | None:
    """The bf16 peak of the GPU called ``name`` (None if the table does not know it); ``override`` wins."""
    if override is not None:
        return override
    upper = name.upper()
    return next((peak for fragment, peak in GPU_PEAK_TFLOPS if fragment in upper), None)


# --- sizes: the only things besides the device that differ between the GPU run and the CPU smoke run ------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    model: tuple[str, ...]  # `hilt train` flags of the model and batch
    epochs: int  # step 1's runs
    save_every: int
    kill_at: int  # step 1's killed run: SIGKILL once it has logged this step
    compile_steps: int  # step 2: the eager and compiled runs stop (SIGTERM) after this many steps
    compile_backend: str
    new_tokens: int  # step 3
    engine_levels: tuple[int, ...]  # step 4: concurrent requests (the first is the baseline, 1)
    engine_new_tokens: int
    check_tokens: int  # steps 4 and 5: greedy tokens compared
    bench_shape: dict  # step 7: ModelConfig / GPT2Config shape
    bench_batch: tuple[int, int]
    bench_steps: tuple[int, int]  # warm-up, timed
    timeout_scale: float
    threads: int | None  # torch's CPU threads, here and in the child processes (None: torch's choice)


GPU = Sizes(
    # make demo's model and batch; max_tokens 100,000 -> 87 batches an epoch, 348 steps in 4 epochs
    model=("--batch_size", "16", "--seq_len", "64", "--model_dim", "128", "--n_layers", "4", "--n_heads", "4",
           "--ilt_dim", "64", "--lr", "2e-3"),
    epochs=4,
    save_every=50,
    kill_at=140,
    compile_steps=60,
    compile_backend="inductor",
    new_tokens=128,
    engine_levels=(1, 16, 64),
    engine_new_tokens=64,
    check_tokens=40,
    bench_shape={"d_model": 256, "n_layers": 6, "n_heads": 8},
    bench_batch=(32, 256),
    bench_steps=(3, 20),
    timeout_scale=1.0,
    threads=None,
)  # fmt: skip

TINY = Sizes(
    # 1,800 training tokens -> 14 batches of 8 x 16 an epoch
    model=("--batch_size", "8", "--seq_len", "16", "--model_dim", "32", "--n_layers", "2", "--n_heads", "2",
           "--ilt_dim", "16", "--d_ff", "64", "--lr", "5e-3", "--max_tokens", "2000"),
    epochs=2,
    save_every=4,
    kill_at=9,
    compile_steps=6,
    # inductor's C++ build of even a tiny model takes minutes on 2 busy cores; dynamo's capture still runs
    compile_backend="eager",
    new_tokens=12,
    engine_levels=(1, 4, 8),
    engine_new_tokens=6,
    check_tokens=6,
    bench_shape={"d_model": 32, "n_layers": 2, "n_heads": 2, "ilt_dim": 16},
    bench_batch=(2, 16),
    bench_steps=(1, 2),
    timeout_scale=3.0,
    # tiny tensors gain nothing from a second thread, and its spinning slows every process of a busy machine
    threads=1,
)  # fmt: skip

TOLERANCE = {
    "precision": 0.02,  # bf16 / fp16 final val loss, relative to fp32's
    "falls": 0.9,  # final val loss at most this times the first step's loss
    "resume_step": 1e-5,  # CUDA: first resumed step's loss against the killed run's, relative
    "resume_final": 0.005,  # CUDA: final val loss against the uninterrupted run's, relative
    "sdpa": 0.05,  # logits and gradients of each SDPA kernel against the math kernel (both bf16), relative L2
    "compile": 0.02,  # compiled loss against eager at the last common step, relative
    "tie_fp32": 1e-3,  # greedy paths may part at a top-2 logit gap below this (fp32 logits) ...
    "tie_bf16": 0.25,  # ... or this when one side decodes in bf16
    "eval": 1e-3,  # `hilt eval --split val` against the checkpoint's val loss (printed to 4 decimals)
}


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    what: str
    estimate_s: int  # on one H100, for the GPU sizes
    timeout_s: int


STEPS = (
    Step("train", "bf16, fp16 + GradScaler and fp32 runs; SIGKILL mid-run and resume", 60, 180),
    Step("kernels", "SDPA flash / memory-efficient against math; --compile against eager", 90, 300),
    Step("generate", "greedy with and without the KV cache; tokens/s at batch 1", 10, 90),
    Step("engine", "concurrent requests: tokens/s against one request", 15, 120),
    Step("export", "hilt export -> transformers (device_map, .to) greedy = hilt generate", 20, 150),
    Step("torchrun", "one epoch under torchrun; the checkpoint loads", 30, 180),
    Step("bench", "HILT design / plain vs HF GPT-2, bf16: tokens/s, MFU, peak memory", 15, 120),
)


# --- the HILT internals this script uses, in one place ----------------------------------------------------------


@functools.cache
def hilt_api() -> SimpleNamespace:
    """Everything taken from inside the package (the CLI and the engine are public; the rest moves in the coming
    refactor, and then only this function changes)."""
    import hilt.device
    import hilt.training.run  # noqa: F401  (imports the trainer, whose autocast_dtype ``forced_autocast`` replaces)
    from hilt.checkpoint.store import load_model_and_tokenizer
    from hilt.cli import main as cli_main
    from hilt.generation.engine import Engine, SamplingParams
    from hilt.generation.generate import generate
    from hilt.model import HierarchicalTransformer, ModelConfig
    from hilt.model.flops import training_flops_per_token
    from hilt.training.loss import LanguageModelLoss
    from hilt.training.run import TrainConfig, build_optimizer

    return SimpleNamespace(
        cli_main=cli_main,
        autocast_dtype=hilt.device.autocast_dtype,
        load_model_and_tokenizer=load_model_and_tokenizer,
        Engine=Engine,
        SamplingParams=SamplingParams,
        training_flops_per_token=training_flops_per_token,
        generate=generate,
        LanguageModelLoss=LanguageModelLoss,
        HierarchicalTransformer=HierarchicalTransformer,
        ModelConfig=ModelConfig,
        TrainConfig=TrainConfig,
        build_optimizer=build_optimizer,
    )


def hilt_src() -> str:
    """The folder holding the imported ``hilt`` package, for the PYTHONPATH of child processes: they must run the
    same code as this one, installed or not."""
    return str(Path(importlib.util.find_spec("hilt").origin).parents[1])


# --- device helpers: CUDA-only calls behind one name, so the CPU run goes through the same lines ---------------


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_allocated(device) -> int | None:
    import torch

    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def peak_memory(device) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


# --- failures, timeouts, children ------------------------------------------------------------------------------


class CheckFailed(Exception):
    """A check did not hold; the message is the one line printed."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


_CHILDREN: list[subprocess.Popen] = []  # killed with their process groups when a step ends or times out
_CHILDREN_LOCK = threading.Lock()  # a timeout must not miss a child being started
_EXPECTED_SIGTERM = threading.Event()  # set while step 2 stops its own training runs with SIGTERM


def _on_sigterm(signum, frame) -> None:
    if not _EXPECTED_SIGTERM.is_set():
        raise SystemExit(128 + signum)


def kill_children() -> None:
    with _CHILDREN_LOCK:
        for proc in _CHILDREN:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        _CHILDREN.clear()


def child_env(**extra: str) -> dict:
    import torch

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([hilt_src(), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    # as many CPU threads as this process: CPU results are bit-exact only between runs that split the work alike
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env.update(extra)
    return env


def spawn(cmd: list[str], log_path: Path, **env: str) -> subprocess.Popen:
    """A child process in its own process group (so a timeout kills it with its children), output to log_path."""
    with open(log_path, "ab") as log, _CHILDREN_LOCK:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(**env), start_new_session=True, cwd=REPO
        )
        _CHILDREN.append(proc)
    return proc


# --- running `hilt ...` in this process ---------------------------------------------------------------------------


class _Capture(io.TextIOBase):
    """What a `hilt` command writes: into its log file, and with the time of each line (step 2 times the first
    training step from the line printed just before training starts); ``text`` keeps stdout's own text."""

    def __init__(self, log, lines: list | None, keep: bool):
        self.log, self.lines, self.keep = log, lines, keep
        self.text, self._partial = "", ""

    def write(self, s: str) -> int:
        self.log.write(s)
        if self.keep:
            self.text += s
        if self.lines is not None:
            self._partial += s
            *done, self._partial = re.split(r"[\r\n]", self._partial)
            now = time.time()
            self.lines.extend((now, line) for line in done if line)
        return len(s)

    def flush(self) -> None:
        self.log.flush()


@dataclasses.dataclass
class Run:
    rc: int
    out: str  # stdout
    lines: list  # (time, line) of stdout and stderr
    log: Path

    def line_time(self, prefix: str) -> float | None:
        return next((t for t, line in self.lines if line.startswith(prefix)), None)


@contextlib.contextmanager
def forced_autocast(dtype):
    """Makes every HILT module that asks ``autocast_dtype`` get ``dtype`` (None: leave them be). Training picks bf16
    wherever the hardware has it, so fp16 with its GradScaler, the path of GPUs without bf16, and bf16 on CPUs
    without it, are only reachable this way. Each run checks the precision it printed, so a refactor that moves
    the function cannot make this a silent no-op."""
    if dtype is None:
        yield
        return
    original = hilt_api().autocast_dtype

    def forced(device, use_amp: bool = True):
        return dtype if use_amp else None

    users = [
        m
        for name, m in list(sys.modules.items())
        if name.split(".")[0] == "hilt" and getattr(m, "autocast_dtype", None) is original
    ]
    for module in users:
        module.autocast_dtype = forced
    try:
        yield
    finally:
        for module in users:
            module.autocast_dtype = original


@contextlib.contextmanager
def deterministic(enabled: bool):
    """torch's deterministic kernels where they exist (a warning where they do not): step 1's resume check."""
    import torch

    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@contextlib.contextmanager
def compile_backend(backend: str | None):
    """`--compile` with another torch.compile backend than inductor (``nn.Module.compile`` calls
    ``torch.compile``): the CPU smoke run's, whose C++ build would take minutes."""
    import torch

    if backend in (None, "inductor"):
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)
    try:
        yield
    finally:
        torch.compile = original


def run_hilt(argv: list[str], log_path: Path, *, dtype=None, determinism=False, backend=None) -> Run:
    """`hilt ARGV` in this process, its output into log_path."""
    lines: list = []
    with open(log_path, "a") as log:
        log.write(f"$ hilt {' '.join(argv)}\n")
        out, err = _Capture(log, lines, keep=True), _Capture(log, lines, keep=False)
        with (
            forced_autocast(dtype),
            deterministic(determinism),
            compile_backend(backend),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            try:
                rc = hilt_api().cli_main(argv)
            except SystemExit as e:  # argparse's errors
                rc = e.code if isinstance(e.code, int) else 2
    return Run(rc, out.text, lines, log_path)


def spawn_hilt(argv: list[str], log_path: Path, *, dtype=None, determinism=False) -> subprocess.Popen:
    """`hilt ARGV` as a child process with the same settings as ``run_hilt``'s (``child_main``)."""
    flags = [
        *(["--_dtype", str(dtype).removeprefix("torch.")] if dtype else []),
        *(["--_deterministic"] * determinism),
    ]
    return spawn([sys.executable, str(Path(__file__).resolve()), "--_hilt", *flags, "--", *argv], log_path)


def child_main(argv: list[str]) -> int:
    import torch

    split = argv.index("--")
    own, hilt_argv = argv[:split], argv[split + 1 :]
    dtype = getattr(torch, own[own.index("--_dtype") + 1]) if "--_dtype" in own else None
    with forced_autocast(dtype), deterministic("--_deterministic" in own):
        return hilt_api().cli_main(hilt_argv)


def expect_ok(run: Run, what: str) -> None:
    check(run.rc == 0, f"{what} exited with status {run.rc}: {last_line(run.log)} (log: {run.log})")


# --- small readers ---------------------------------------------------------------------------------------------


def step_records(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    records = []
    for line in metrics.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # the line being written
            record = json.loads(line)
            if record.get("kind") == "step":
                records.append(record)
    return records


def last_logged_step(metrics: Path) -> int:
    records = step_records(metrics)
    return records[-1]["step"] if records else 0


def load_ckpt(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def printed_precision(run: Run) -> str:
    match = re.search(r"precision (torch\.\w+)", run.out)
    return match.group(1) if match else "?"


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def greedy_agreement(model, prompt: list[int], a: list[int], b: list[int], device, tie: float) -> str:
    """'identical', or where two greedy decodings of the same prompt part if the model's fp32 logits there have
    their top two within ``tie`` (rounding may then pick either); raises CheckFailed otherwise."""
    import torch

    k = first_difference(a, b)
    if k is None:
        return f"identical ({len(a)} tokens)"
    check(k < min(len(a), len(b)), f"one decoding stopped early at token {k} ({len(a)} vs {len(b)} tokens)")
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + a[:k]], device=device))[0, -1].float()
    top = logits.topk(2).values
    gap = (top[0] - top[1]).item()
    check(
        gap <= tie,
        f"they part at token {k} ({a[k]} vs {b[k]}) where the top-2 logit gap is {gap:.4f} > {tie}",
    )
    return f"identical up to a near-tie at token {k} of {len(a)} (fp32 top-2 gap {gap:.4f} <= {tie})"


def gib(n: int | None) -> str:
    return "n/a (CPU)" if n is None else f"{n / 2**30:.2f} GiB"


# --- the steps ---------------------------------------------------------------------------------------------------


class Checker:
    """Runs the steps on one device with one set of sizes; each step adds rows to ``rows``."""

    def __init__(self, device, sizes: Sizes, work: Path, args):
        import torch

        self.device, self.sizes, self.work, self.args = device, sizes, work, args
        self.dev = str(device)
        self.cuda = device.type == "cuda"
        self.amp = torch.bfloat16  # step 1, 2 and 7's precision (forced on CPUs without native bf16)
        self.rows: list[tuple[str, str, str]] = []
        self.step = ""

    def row(self, check_name: str, result: str) -> None:
        self.rows.append((self.step, check_name, result))
        print(f"    {check_name}: {result}", flush=True)

    def train_argv(self, out: str, *extra: str, epochs: int | None = None) -> list[str]:
        data = ["--text_file", str(self.args.text_file), "--cache_dir", str(self.work / "cache")]
        epochs_flag = ["--epochs", str(epochs or self.sizes.epochs)]
        return [
            "train",
            *data,
            "--device",
            self.dev,
            *self.sizes.model,
            *epochs_flag,
            "--out_dir",
            str(self.work / out),
            *extra,
        ]

    # --- 1 ---

    def train(self) -> None:
        import torch

        s = self.sizes
        # only the killed run needs mid-epoch checkpoints: saving reads the RNG state without drawing from it, so
        # the bf16 run without them is still its uninterrupted twin (on the CPU the bit-exact check proves it)
        saves = ["--save_every", str(s.save_every)]
        # the killed run trains alongside the others (a GPU has room), and is killed at kill_at
        killed = self.work / "killed"
        proc = spawn_hilt(
            self.train_argv("killed", *saves, "--overwrite"), self.work / "killed.log", dtype=self.amp,
            determinism=True,
        )  # fmt: skip
        killer = threading.Thread(
            target=kill_mid_run, args=(proc, killed, s.kill_at, s.save_every), daemon=True
        )
        killer.start()

        runs = {}
        for label, dtype, extra in (
            ("bf16", torch.bfloat16, []),
            ("fp16", torch.float16, []),
            ("fp32", None, ["--no_amp"]),
        ):
            run = run_hilt(
                self.train_argv(label, "--overwrite", *extra), self.work / f"{label}.log", dtype=dtype,
                determinism=True,
            )  # fmt: skip
            expect_ok(run, f"hilt train ({label})")
            want = str(dtype or torch.float32)
            check(
                printed_precision(run) == want,
                f"the {label} run trained in {printed_precision(run)}, not {want}",
            )
            runs[label] = run
        ckpts = {label: load_ckpt(self.work / label / "last_model.pt") for label in runs}
        fp32 = ckpts["fp32"]["val_loss"]
        for label, ckpt in ckpts.items():
            first = step_records(self.work / label / "metrics.jsonl")[0]["loss"]
            val = ckpt["val_loss"]
            check(
                val <= TOLERANCE["falls"] * first,
                f"{label}: the loss did not fall (first step {first:.4f}, final val {val:.4f})",
            )
            vs = ""
            if label != "fp32":
                rel = relative(val, fp32)
                check(
                    rel <= TOLERANCE["precision"],
                    f"{label} final val loss {val:.4f} is {rel:.2%} from fp32's {fp32:.4f} "
                    f"(tolerance {TOLERANCE['precision']:.0%})",
                )
                vs = f"; {rel:.2%} from fp32 (tolerance {TOLERANCE['precision']:.0%})"
            scaler = ckpt.get("scaler_state_dict") or {}
            if label == "fp16":
                check(
                    "scale" in scaler,
                    "fp16 trained without an enabled GradScaler (no scale in its checkpoint)",
                )
                vs += f"; GradScaler on, final scale {scaler['scale']:.0f}"
            self.row(
                f"{label} training ({ckpt['global_step']} steps)",
                f"loss {first:.4f} -> val {val:.4f}{vs}",
            )

        killer.join()
        check(
            proc.returncode == -signal.SIGKILL,
            f"the run to kill ended by itself (status {proc.returncode}) before step {s.kill_at}: "
            f"{last_line(self.work / 'killed.log')}",
        )
        at_kill = load_ckpt(killed / "last_model.pt")
        s0 = at_kill["global_step"]
        before = {r["step"]: r["loss"] for r in step_records(killed / "metrics.jsonl")}
        n_before = len(step_records(killed / "metrics.jsonl"))
        run = run_hilt(
            self.train_argv("killed", *saves, "--resume", str(killed / "last_model.pt")), self.work / "resume.log",
            dtype=self.amp, determinism=True,
        )  # fmt: skip
        expect_ok(run, "hilt train --resume")
        after = step_records(killed / "metrics.jsonl")[n_before:]
        check(bool(after) and after[0]["step"] == s0 + 1, f"the resumed run did not start at step {s0 + 1}")
        resumed, reference = load_ckpt(killed / "last_model.pt"), ckpts["bf16"]
        exact = resumed["history"] == reference["history"] and all(
            torch.equal(resumed["model_state_dict"][k], v) for k, v in reference["model_state_dict"].items()
        )
        step_note = "the killed run logged no step past its checkpoint"
        if s0 + 1 in before:
            a, b = after[0]["loss"], before[s0 + 1]
            same = a == b if not self.cuda else relative(a, b) <= TOLERANCE["resume_step"]
            check(same, f"resumed step {s0 + 1} has loss {a!r}, the killed run logged {b!r}")
            step_note = f"step {s0 + 1} loss {'=' if a == b else '~'} killed run's ({a:.6f})"
        val_a, val_b = resumed["val_loss"], reference["val_loss"]
        if not exact:
            diff = max(
                (resumed["model_state_dict"][k].float() - v.float()).abs().max().item()
                for k, v in reference["model_state_dict"].items()
            )
            check(self.cuda, f"resume is not bit-exact on the CPU (max weight difference {diff:.3g})")
            check(
                relative(val_a, val_b) <= TOLERANCE["resume_final"],
                f"resumed val loss {val_a:.5f} vs uninterrupted {val_b:.5f} (tolerance {TOLERANCE['resume_final']:.1%})",
            )
        verdict = "bit-exact (weights, history)" if exact else f"not bit-exact (max weight diff {diff:.3g})"
        self.row(
            f"SIGKILL at step {max(before, default=0)}, resume from step {s0}",
            f"{verdict}; val {val_a:.5f} vs uninterrupted {val_b:.5f}; {step_note}",
        )

    # --- 2 ---

    def kernels(self) -> None:
        self.sdpa_kernels()
        s = self.sizes
        timings = {}
        for label, extra, backend in (("eager", [], None), ("compiled", ["--compile"], s.compile_backend)):
            out = self.work / label
            argv = self.train_argv(label, "--ilt_stats_every", "0", "--overwrite", *extra, epochs=1)
            done = threading.Event()
            stopper = threading.Thread(
                target=stop_at_step, args=(out / "metrics.jsonl", s.compile_steps, done), daemon=True
            )
            stopper.start()
            try:
                run = run_hilt(argv, self.work / f"{label}.log", dtype=self.amp, backend=backend)
            finally:
                done.set()
                stopper.join()
                _EXPECTED_SIGTERM.clear()
            # 128 + SIGTERM: stopped by stop_at_step, before the epoch's end evaluates (a recompile for eval mode)
            check(
                run.rc in (0, 128 + signal.SIGTERM),
                f"hilt train {' '.join(extra)} exited with status {run.rc}: {last_line(run.log)} (log: {run.log})",
            )
            records = step_records(out / "metrics.jsonl")
            check(len(records) >= 4, f"{label}: only {len(records)} steps logged")
            start = run.line_time("Effective batch")
            check(start is not None, f"{label}: no 'Effective batch' line before training")
            times = [r["time"] for r in records]
            timings[label] = (times[0] - start, steady_step_time(times), records)
        (eager_first, eager_steady, eager_rec), (first, steady, rec) = timings["eager"], timings["compiled"]
        common = min(len(eager_rec), len(rec)) - 1
        a, b = rec[common]["loss"], eager_rec[common]["loss"]
        check(
            relative(a, b) <= TOLERANCE["compile"],
            f"compiled loss {a:.4f} at step {common + 1} is {relative(a, b):.2%} from eager's {b:.4f}",
        )
        graphs = compiled_graphs()
        check(graphs != 0, "--compile compiled no graph")
        self.row(
            f"--compile ({s.compile_backend}), first step",
            f"{first:.2f} s (eager {eager_first:.3f} s){'' if graphs is None else f'; {graphs} graphs'}",
        )
        self.row(
            "--compile, steady step",
            f"{steady * 1e3:.2f} ms vs eager {eager_steady * 1e3:.2f} ms ({eager_steady / steady:.2f}x); "
            f"loss at step {common + 1} {a:.4f} vs {b:.4f}",
        )

    def sdpa_kernels(self) -> None:
        """Logits and gradients of the trained model through each SDPA kernel against the math kernel, in bf16
        autocast (flash needs half precision on CUDA). The model's CPU speed paths are turned off, and SDPA's calls
        counted, so the kernels under test really run."""
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        api = hilt_api()
        trained = api.load_model_and_tokenizer(self.work / "bf16" / "last_model.pt", self.device)[0]
        model = api.HierarchicalTransformer(trained.config, cpu_kernels=False).to(
            self.device
        )  # the reference
        model.load_state_dict(trained.state_dict())
        model.eval()
        seq_len = int(self.sizes.model[self.sizes.model.index("--seq_len") + 1])
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (4, seq_len + 1), generator=g).to(self.device)
        backends = [SDPBackend.FLASH_ATTENTION] + ([SDPBackend.EFFICIENT_ATTENTION] if self.cuda else [])
        calls = []
        original = F.scaled_dot_product_attention

        def counted(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        def run(backend):
            model.zero_grad(set_to_none=True)
            F.scaled_dot_product_attention = counted
            try:
                with sdpa_kernel([backend]), torch.autocast(self.device.type, dtype=self.amp):
                    logits = model(ids[:, :-1])
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
                loss.backward()
            except RuntimeError as e:
                raise CheckFailed(f"SDPA's {backend.name} kernel failed on HILT's attention: {e}") from None
            finally:
                F.scaled_dot_product_attention = original
            grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
            return logits.float(), grads

        reference = run(SDPBackend.MATH)
        check(bool(calls), "HILT's attention never called SDPA")
        results = []
        for backend in backends:
            logits, grads = run(backend)
            errors = [
                ((x - r).norm() / r.norm()).item() for x, r in zip((logits, grads), reference, strict=True)
            ]
            check(
                max(errors) <= TOLERANCE["sdpa"],
                f"SDPA {backend.name}: logits {errors[0]:.2e}, gradients {errors[1]:.2e} from the math kernel's "
                f"(tolerance {TOLERANCE['sdpa']})",
            )
            results.append(f"{backend.name.lower()} logits {errors[0]:.1e}, grads {errors[1]:.1e}")
        model.zero_grad(set_to_none=True)
        self.row(
            f"SDPA kernels vs math ({len(calls) // (len(backends) + 1)} calls a pass)",
            "; ".join(results) + f" (relative L2, tolerance {TOLERANCE['sdpa']})",
        )

    # --- 3 ---

    def generate(self) -> None:
        import torch

        api, s = hilt_api(), self.sizes
        model, tok, _ = api.load_model_and_tokenizer(self.work / "bf16" / "last_model.pt", self.device)
        dtype = api.autocast_dtype(self.device)  # what `hilt generate` decodes in here
        prompt = tok.encode(PROMPT)
        ids = torch.tensor([prompt], device=self.device)

        def greedy(use_cache: bool, compute_dtype, n: int) -> tuple[list[int], float]:
            sync(self.device)
            t0 = time.perf_counter()
            out = api.generate(model, ids, n, temperature=0, use_cache=use_cache, compute_dtype=compute_dtype)
            sync(self.device)
            return out[0, len(prompt) :].tolist(), time.perf_counter() - t0

        name = str(dtype or torch.float32).removeprefix("torch.")
        for use_cache in (True, False):  # warm-up: the decoding copy of the weights, kernels' first calls
            greedy(use_cache, dtype, 4)
        cached, t_cached = greedy(True, dtype, s.new_tokens)
        uncached, t_uncached = greedy(False, dtype, s.new_tokens)
        tie = TOLERANCE["tie_bf16"] if dtype is not None else TOLERANCE["tie_fp32"]
        agreement = greedy_agreement(model, prompt, cached, uncached, self.device, tie)
        fp32 = greedy_agreement(
            model, prompt, greedy(True, None, s.new_tokens)[0], greedy(False, None, s.new_tokens)[0], self.device,
            TOLERANCE["tie_fp32"],
        )  # fmt: skip
        self.row(f"greedy, cache vs no cache ({name}; fp32)", f"{agreement}; fp32 {fp32}")
        self.row(
            f"batch 1, {s.new_tokens} new tokens ({name})",
            f"{s.new_tokens / t_cached:,.1f} tokens/s with the cache, {s.new_tokens / t_uncached:,.1f} without "
            f"({t_uncached / t_cached:.2f}x)",
        )

    # --- 4 ---

    def engine(self) -> None:
        import torch

        api, s = hilt_api(), self.sizes
        model, tok, _ = api.load_model_and_tokenizer(self.work / "bf16" / "last_model.pt", self.device)
        dtype = api.autocast_dtype(self.device)
        prompts = engine_prompts(self.args.text_file, tok, max(s.engine_levels))
        params = api.SamplingParams(max_new_tokens=s.engine_new_tokens, temperature=0, ignore_eos=True)
        rates = {}
        with api.Engine(model, tok, max_slots=max(s.engine_levels), compute_dtype=dtype) as engine:
            for request in [engine.submit(p, params) for p in prompts[:2]]:  # warm-up
                request.result()
            for n in s.engine_levels:
                t0 = time.perf_counter()
                results = [r.result() for r in [engine.submit(p, params) for p in prompts[:n]]]
                elapsed = time.perf_counter() - t0
                bad = [
                    r
                    for r in results
                    if len(r.token_ids) != s.engine_new_tokens or r.finish_reason != "length"
                ]
                check(not bad, f"{len(bad)} of {n} requests did not get exactly {s.engine_new_tokens} tokens")
                rates[n] = n * s.engine_new_tokens / elapsed
        # the rows decoded together give each request what it gets alone (fp32, where rounding cannot decide)
        k, n_check = min(4, len(prompts)), s.check_tokens
        fp32_params = api.SamplingParams(max_new_tokens=n_check, temperature=0, ignore_eos=True)
        with api.Engine(model, tok, max_slots=k, compute_dtype=None) as engine:
            together = [r.result().token_ids for r in [engine.submit(p, fp32_params) for p in prompts[:k]]]
        for prompt, got in zip(prompts[:k], together, strict=True):
            alone = api.generate(model, torch.tensor([prompt], device=self.device), n_check, temperature=0)
            greedy_agreement(
                model, prompt, got, alone[0, len(prompt) :].tolist(), self.device, TOLERANCE["tie_fp32"]
            )
        base = rates[s.engine_levels[0]]
        name = str(dtype or torch.float32).removeprefix("torch.")
        self.row(
            f"engine, {s.engine_new_tokens} new tokens a request ({name}, greedy)",
            ", ".join(f"{n}: {r:,.0f} tokens/s ({r / base:.2f}x)" for n, r in rates.items()),
        )
        self.row(f"{k} requests batched vs alone (fp32, {n_check} tokens)", "identical")

    # --- 5 ---

    def export(self) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()

        s, ckpt, folder = self.sizes, self.work / "bf16" / "last_model.pt", self.work / "hf"
        expect_ok(run_hilt(["export", "--model_path", str(ckpt), "--out_dir", str(folder)], self.work / "export.log"),
                  "hilt export")  # fmt: skip
        run = run_hilt(
            ["generate", "--model_path", str(ckpt), "--prompt", PROMPT, "--max_len", str(s.check_tokens),
             "--temperature", "0", "--no_amp", "--device", self.dev],
            self.work / "generate.log",
        )  # fmt: skip
        expect_ok(run, "hilt generate")
        check(run.out.startswith(PROMPT), f"hilt generate printed {run.out[:60]!r}, not the prompt first")
        expected = run.out[len(PROMPT) :].removesuffix("\n")

        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(self.device)
        fp32 = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}

        def moved():
            return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **fp32).to(
                self.device
            )

        def mapped():
            return AutoModelForCausalLM.from_pretrained(
                folder, trust_remote_code=True, device_map=self.device.type, **fp32
            )

        loads = {".to": moved}
        if importlib.util.find_spec("accelerate") is not None:
            loads["device_map"] = mapped
        else:
            # transformers needs accelerate for any device_map; a GPU check must cover it
            check(not self.cuda, "device_map needs the accelerate package: pip install accelerate")
        for how, load in loads.items():
            model = load().eval()
            where = {p.device.type for p in model.parameters()}
            check(where == {self.device.type}, f"loaded with {how}, the weights are on {where}")
            with torch.no_grad():
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.check_tokens, do_sample=False
                )
            text = tokenizer.decode(out[0, ids.size(1) :], skip_special_tokens=True)
            check(text == expected, f"transformers ({how}) greedy {text!r} != hilt generate's {expected!r}")
            del model
        missing = "" if "device_map" in loads else "; device_map skipped: accelerate is not installed"
        self.row(
            f"transformers {transformers.__version__}: {', '.join(loads)} (fp32)",
            f"greedy {s.check_tokens} tokens = hilt generate's ({expected[:24]!r}...){missing}",
        )

    # --- 6 ---

    def torchrun(self) -> None:
        import torch

        nproc = torch.cuda.device_count() if self.cuda else 1
        log = self.work / "torchrun.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "hilt", *self.train_argv("ddp", epochs=1)]  # fmt: skip
        proc = spawn(cmd, log, NCCL_DEBUG="VERSION")
        rc = proc.wait()
        check(rc == 0, f"torchrun exited with status {rc}: {last_line(log)} (log: {log})")
        text = log.read_text(errors="replace")
        backend = "gloo"
        if self.cuda:
            check("NCCL version" in text, "torchrun on CUDA: NCCL never started (no 'NCCL version' line)")
            backend = "nccl"
        match = re.search(r"x (\d+) process\(es\)", text)
        check(bool(match) and int(match.group(1)) == nproc, f"torchrun did not train on {nproc} process(es)")
        ckpt_path = self.work / "ddp" / "last_model.pt"
        saved = load_ckpt(ckpt_path)["val_loss"]
        run = run_hilt(
            ["eval", "--model_path", str(ckpt_path), "--split", "val", "--device", self.dev],
            self.work / "eval.log",
        )
        expect_ok(run, "hilt eval of the torchrun checkpoint")
        scored = float(re.search(r"Loss: (\S+)", run.out).group(1))
        check(
            abs(scored - saved) <= TOLERANCE["eval"],
            f"the torchrun checkpoint scores {scored:.4f} under hilt eval, it saved val loss {saved:.4f}",
        )
        self.row(
            f"torchrun, {nproc} process(es), {backend}",
            f"1 epoch; the checkpoint loads: hilt eval --split val {scored:.4f} = saved {saved:.4f}",
        )

    # --- 7 ---

    def bench(self) -> None:
        import torch
        import torch.nn.functional as F
        from transformers import GPT2Config, GPT2LMHeadModel

        api, s = hilt_api(), self.sizes
        batch, seq_len = s.bench_batch
        shape = s.bench_shape
        hilt_loss = lambda m, x, y: api.LanguageModelLoss(m)(x, y, progress=0.1)  # noqa: E731  # train's step
        hf_loss = lambda m, x, y: F.cross_entropy(  # noqa: E731  # as HF's own loss: fp32 logits
            m(input_ids=x, use_cache=False).logits.flatten(0, 1).float(), y.flatten()
        )
        plain = api.ModelConfig(vocab_size=VOCAB, n_layers_ilt=0, **shape)
        specs = [
            ("HILT, design ILTs", api.ModelConfig(vocab_size=VOCAB, **shape)),
            ("HILT, n_layers_ilt=0", plain),
            ("HF GPT-2", None),
        ]
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, VOCAB, (batch, seq_len + 1), generator=g).to(self.device)
        x, y = x[:, :-1], x[:, 1:]
        contestants = []
        for name, config in specs:
            torch.manual_seed(0)
            before = memory_allocated(self.device)
            reset_peak_memory(self.device)
            if config is None:
                hf = GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=shape["d_model"], n_layer=shape["n_layers"],
                                n_head=shape["n_heads"], tie_word_embeddings=True)  # fmt: skip
                model, loss_fn = GPT2LMHeadModel(hf), hf_loss
            else:
                model, loss_fn = api.HierarchicalTransformer(config), hilt_loss
            c = Contestant(name, model.to(self.device).train(), loss_fn, self.amp, self.device)
            c.flops = api.training_flops_per_token(config or plain, seq_len)  # HF: the plain model's matmuls
            c.step(x, y)  # its optimizer state exists from here on: the memory a training step holds
            peak = peak_memory(self.device)
            c.memory = None if peak is None else peak - before
            c.times.clear()
            contestants.append(c)
        warmup, steps = s.bench_steps
        for i in range(warmup + steps):  # in turns, so a drift in the machine's speed hits everyone alike
            for c in contestants:
                c.step(x, y)
                if i < warmup:
                    c.times.clear()
        peak_tflops = gpu_peak_tflops(device_name(self.device), self.args.peak_tflops)
        rates = {c.name: batch * seq_len / statistics.median(c.times) for c in contestants}
        for c in contestants:
            rate = rates[c.name]
            mfu = (
                "n/a (--peak_tflops)"
                if peak_tflops is None
                else f"{c.flops * rate / (peak_tflops * 1e12):.1%}"
            )
            self.row(
                f"{c.name}, bf16, batch {batch} x {seq_len}",
                f"{rate:,.0f} tokens/s ({rate / rates['HF GPT-2']:.2f}x HF), MFU {mfu}, peak memory {gib(c.memory)}",
            )
        if peak_tflops is not None:
            source = "--peak_tflops" if self.args.peak_tflops else "datasheet, GPU_PEAK_TFLOPS"
            self.row("MFU's peak", f"{peak_tflops:g} TFLOP/s bf16 ({source})")


class Contestant:
    """One model + its optimizer; ``step()`` is one timed forward + backward + clip + AdamW step as train.py's,
    synchronised on CUDA so the time is the GPU's, not the launch's."""

    def __init__(self, name, model, loss_fn, amp_dtype, device):
        api = hilt_api()
        self.name, self.model, self.loss_fn = name, model, loss_fn
        self.amp_dtype, self.device = amp_dtype, device
        self.optimizer = api.build_optimizer(model, api.TrainConfig(text_file="-"))
        self.times: list[float] = []
        self.flops = 0  # training FLOPs per token
        self.memory: int | None = None  # bytes a training step holds (CUDA)

    def step(self, x, y) -> None:
        import torch

        sync(self.device)
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.amp_dtype):
            loss = self.loss_fn(self.model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        self.times.append(time.perf_counter() - t0)


# --- helpers of the steps --------------------------------------------------------------------------------------


def kill_mid_run(proc: subprocess.Popen, out: Path, kill_at: int, save_every: int) -> None:
    """SIGKILL once the run has logged step ``kill_at`` or later and its last checkpoint is behind the last logged
    step (so the killed run has logged a step that the resumed one must reproduce)."""
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        step = last_logged_step(metrics)
        if step >= kill_at and step % save_every != 0 and (out / "last_model.pt").exists():
            proc.kill()
            break
        time.sleep(0.01)
    proc.wait()


def steady_step_time(times: list[float]) -> float:
    """The median gap between consecutive steps of the later half: compilation and warm-up stay out of it."""
    later = times[len(times) // 2 :]
    return statistics.median(b - a for a, b in zip(later[:-1], later[1:], strict=True))


def stop_at_step(metrics: Path, step: int, done: threading.Event) -> None:
    """SIGTERM to this process once ``step`` is logged: the trainer finishes the step, saves and stops."""
    while not done.wait(0.005):
        if last_logged_step(metrics) >= step:
            _EXPECTED_SIGTERM.set()
            os.kill(os.getpid(), signal.SIGTERM)
            return


def compiled_graphs() -> int | None:
    """Graphs dynamo has compiled in this process (None where torch keeps no such count)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # a private counter: its absence must not fail the check
        return None


def engine_prompts(text_file: Path, tok, n: int) -> list[list[int]]:
    """n prompts of 4-32 tokens, from the text's lines."""
    prompts = []
    for line in text_file.read_text(errors="replace").splitlines():
        ids = tok.encode(line.strip())[:32]
        if len(ids) >= 4:
            prompts.append(ids)
        if len(prompts) == n:
            break
    return prompts


def last_line(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = [ln.strip() for ln in re.split(r"[\r\n]", text) if ln.strip()]
    return lines[-1] if lines else "(no output)"


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next(
        (ln.partition(":")[2].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), ""
    )
    return f"CPU: {name or platform.processor() or 'unknown'}, {os.cpu_count()} cores"


def environment(device) -> str:
    import torch

    parts = [device_name(device)]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        parts[0] += (
            f" x {torch.cuda.device_count()} (compute {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
        )
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # no NCCL in this build, or an older torch's int
            nccl = "?"
        parts.append(f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}")
    parts.append(f"torch {torch.__version__}, Python {platform.python_version()}")
    return "; ".join(parts)


# --- the run -----------------------------------------------------------------------------------------------------


def render(env: str, rows: list, status: str, sizes_name: str) -> str:
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        f"# gpu_check: {status}",
        "",
        f"{date}: `benchmarks/gpu_check.py{' --cpu_smoke' if sizes_name == 'tiny' else ''}` on {env}.",
        "",
        "| step | check | result |",
        "| --- | --- | --- |",
        *(f"| {step} | {name} | {result} |" for step, name, result in rows),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_hilt"]:  # spawn_hilt's child
        return child_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu_smoke", action="store_true", help="run every step on the CPU with tiny sizes")
    p.add_argument("--text_file", type=Path, default=DATA, help="the training text (default data.txt)")
    p.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="the GPU's bf16 peak for MFU (default: GPU_PEAK_TFLOPS)",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help=f"where the table goes (default {RESULTS.relative_to(REPO)} on CUDA; with --cpu_smoke, the work folder)",
    )
    p.add_argument(
        "--work_dir", type=Path, default=None, help="parent of the run's scratch folder (default: /tmp)"
    )
    p.add_argument(
        "--keep_work", action="store_true", help="keep the scratch folder (kept anyway on a failure)"
    )
    p.add_argument("--timeout_scale", type=float, default=None, help="multiply every step's timeout by this")
    args = p.parse_args(argv)

    # before anything starts CUDA: cuBLAS reads it when it creates its handle (deterministic matmuls, step 1)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the export is local; a GPU machine may have no network
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (--cpu_smoke runs the same steps on the CPU, tiny)")
        return 0
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    sizes = TINY if args.cpu_smoke else GPU
    if sizes.threads is not None:
        torch.set_num_threads(sizes.threads)
    scale = args.timeout_scale if args.timeout_scale is not None else sizes.timeout_scale
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hilt_gpu_check_", dir=args.work_dir))
    results = args.results or (work / "gpu_check.md" if args.cpu_smoke else RESULTS)
    signal.signal(signal.SIGTERM, _on_sigterm)

    env = environment(device)
    print(f"gpu_check on {env}", flush=True)
    checker = Checker(device, sizes, work, args)
    started = time.perf_counter()
    for number, step in enumerate(STEPS, 1):
        timeout = step.timeout_s * scale
        estimate = f"H100 estimate {step.estimate_s} s, " if device.type == "cuda" else ""
        print(
            f"[{number}/{len(STEPS)}] {step.name}: {step.what} ({estimate}timeout {timeout:.0f} s)",
            flush=True,
        )
        checker.step = f"{number} {step.name}"
        t0 = time.perf_counter()
        failure = None
        watchdog = threading.Timer(
            timeout, _timed_out, args=(number, step, timeout, checker, env, results, work)
        )
        watchdog.daemon = True
        watchdog.start()
        try:
            getattr(checker, step.name)()
        except CheckFailed as e:
            failure = str(e)
        except Exception as e:  # a bug or a CUDA error: one line here, the traceback in the work folder
            (work / "traceback.txt").write_text(traceback.format_exc())
            failure = (
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
                f"(traceback: {work / 'traceback.txt'})"
            )
        finally:
            watchdog.cancel()
            kill_children()
        elapsed = time.perf_counter() - t0
        if failure is not None:
            return fail(number, step, failure, checker, env, results, work)
        checker.rows.append(
            (
                checker.step,
                "time",
                f"{elapsed:.1f} s" + (f" (estimate {step.estimate_s} s)" if estimate else ""),
            )
        )
        print(f"    time: {elapsed:.1f} s", flush=True)
    total = time.perf_counter() - started
    checker.rows.append(("all", "time", f"{total:.0f} s"))
    report = render(env, checker.rows, f"all {len(STEPS)} steps passed", "tiny" if args.cpu_smoke else "gpu")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(report)
    print("\n" + report)
    print(f"Written to {results}")
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def fail(number: int, step: Step, message: str, checker: Checker, env: str, results: Path, work: Path) -> int:
    line = f"FAIL [{number}/{len(STEPS)}] {step.name}: {message}"
    with contextlib.suppress(OSError):
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(render(env, checker.rows, line, "tiny" if checker.device.type == "cpu" else "gpu"))
    # the real streams: a step's `hilt` command may have sys.stdout/stderr redirected into its log right now
    print(line, file=sys.__stderr__, flush=True)
    print(f"(partial table in {results}; logs in {work})", file=sys.__stdout__, flush=True)
    return 1


def _timed_out(number, step, timeout, checker, env, results, work) -> None:
    kill_children()
    message = f"timed out after {timeout:.0f} s"
    if checker.device.type == "cuda":
        message += f" (H100 estimate {step.estimate_s} s)"
    fail(number, step, message, checker, env, results, work)
    os._exit(1)  # the step's own thread may be stuck in a kernel or a collective: no clean exit to wait for


if __name__ == "__main__":
    sys.exit(main())
