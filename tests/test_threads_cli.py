"""`hilt generate` and `hilt serve` without --threads, as a user runs them (torch's own default of one thread per
core): on busy cores the decode thread keeps off the second thread, the count it picks shows in /metrics, and the
text is what an explicit --threads writes. Only the commands are imported, so these run against any version."""

import http.client
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import save_untrained_checkpoint

linux_proc = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_untrained_checkpoint(tmp_path_factory.mktemp("threads"))


# `hilt generate` as a user runs it (torch's own default of one thread per core), with each decoding step's
# thread count recorded on the engine's decode thread
GENERATE = textwrap.dedent(
    """
    import sys, torch, hilt.generation.engine
    seen = []
    real = hilt.generation.engine.Engine._step
    def step(engine):
        seen.append(torch.get_num_threads())
        real(engine)
    hilt.generation.engine.Engine._step = step
    from hilt.cli import main
    code = main(["generate", *sys.argv[1:]])
    print("STEPS", sorted(set(seen)), len(seen), file=sys.stderr)
    sys.exit(code)
    """
)
PROMPT = "ROMEO: What light"


def generate(checkpoint: str, *flags: str) -> tuple[str, set[int], int]:
    args = ["--model_path", checkpoint, "--prompt", PROMPT, "--temperature", "0", "--max_len", "200", *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "HILT_API_KEY")}
    done = subprocess.run(
        [sys.executable, "-c", GENERATE, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    counts, steps = re.search(r"STEPS \[([\d, ]*)\] (\d+)", done.stderr).groups()
    return done.stdout, {int(c) for c in counts.split(",") if c.strip()}, int(steps)


class BusyCores:
    """One busy-loop process per core for the duration of the block: the cores are taken."""

    def __enter__(self):
        code = "import time\nend = time.monotonic() + 300\nwhile time.monotonic() < end: pass"
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 1)]
        time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


needs_two_threads = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: nothing to choose")


@pytest.mark.slow
@linux_proc
@needs_two_threads
def test_generate_on_busy_cores_decodes_on_one_thread_by_default_and_an_explicit_count_still_wins(
    checkpoint, capsys, monkeypatch
):
    # in this process, to spare two start-ups on busy cores; torch set as its own default would be here
    import hilt.generation.engine
    from hilt.cli import main

    seen = []
    real = hilt.generation.engine.Engine._step

    def step(engine):
        seen.append(torch.get_num_threads())  # on the engine's decode thread
        real(engine)

    monkeypatch.setattr(hilt.generation.engine.Engine, "_step", step)
    base = ["generate", "--model_path", checkpoint, "--prompt", PROMPT, "--temperature", "0"]
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count())
    try:
        with BusyCores():
            assert main([*base, "--max_len", "200"]) == 0
            default_counts, steps = set(seen), len(seen)
            text = capsys.readouterr().out
            seen.clear()
            # a few tokens only: two threads on busy cores are the collapse (tens of ms a step even for this model)
            assert main([*base, "--max_len", "5", "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(before)
    # torch's default, one thread per core, collapses on busy cores (each parallel operator waits for a worker
    # the kernel has not scheduled): the default must keep off it, the whole run long
    assert steps > 100 and default_counts == {1}
    assert set(seen) == {2}
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)


@pytest.mark.slow
@needs_two_threads
def test_generate_by_default_picks_a_count_and_writes_what_an_explicit_count_writes(checkpoint):
    default_text, default_counts, _ = generate(checkpoint)
    one_text, one_counts, _ = generate(checkpoint, "--threads", "1")
    assert default_counts and default_counts <= {1, 2} and one_counts == {1}
    assert default_text == one_text and default_text.startswith(PROMPT)


@pytest.mark.slow
def test_serve_by_default_picks_a_count_shows_it_and_answers_what_generate_writes(checkpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "HILT_API_KEY")}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hilt",
            "serve",
            "--model_path",
            checkpoint,
            "--port",
            "0",
            "--log_level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=env,
    )
    try:
        port = int(re.search(r":(\d+) ", server.stdout.readline()).group(1))

        def call(method: str, path: str, body: dict | None = None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request(method, path, body=json.dumps(body) if body else None)
            response = conn.getresponse()
            return response.status, response.read().decode()

        deadline = time.monotonic() + 120
        while call("GET", "/health")[0] != 200:
            assert time.monotonic() < deadline and server.poll() is None, "the server did not load"
            time.sleep(0.1)
        status, body = call("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 20, "temperature": 0})
        assert status == 200, body
        text = json.loads(body)["choices"][0]["text"]
        metrics = call("GET", "/metrics")[1]
    finally:
        server.terminate()
        assert server.wait(60) == 0
        log.close()
    threads = int(float(re.search(r"^hilt_decode_threads (\S+)$", metrics, re.M).group(1)))
    assert 1 <= threads <= (os.cpu_count() or 1)
    expected, _, _ = generate(checkpoint, "--threads", "1", "--max_len", "20")
    assert text and PROMPT + text == expected.rstrip("\n")
