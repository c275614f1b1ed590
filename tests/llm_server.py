"""A local OpenAI-compatible server, for the LLM stage's tests and for demos.

It plays, by simple keyword rules, the models the LLM backends talk to, in the answer shapes
the real servers send (recorded from their APIs and model cards):

- `/v1/chat/completions` as a policy-as-prompt chat model (the verdict JSON for the content in
  the prompt's `<data>` block); as Llama Guard when the model name holds `llama-guard`
  (`safe` / `unsafe\nS1,S10`); as ShieldGemma when it holds `shieldgemma` (`Yes` / `No`);
  logprobs of the deciding tokens when asked, unless `state.logprobs` is off;
- `/v1/moderations` as OpenAI's omni-moderation (list input, 13 category scores per result);
- llama-cpp-python's refusal of `response_format: json_schema`: HTTP 500 with a pydantic
  validation message (`state.reject_json_schema`).

Tests assert decisions, and it fails on demand: each request takes the next mode from
`state.script`, else `state.default_mode`. Run it on its own with

    python -m tests.llm_server --port 8000

and point the cascade at it: `OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=x`.
Standard library only (http.server in a thread).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Mode(StrEnum):
    OK = "ok"
    RATE_LIMITED = "429"  # with retry-after-ms
    SERVER_ERROR = "500"
    UNAUTHORIZED = "401"  # echoes the presented key in the message, as careless servers do
    MALFORMED_JSON = "malformed_json"  # HTTP 200, the model's content is cut-off JSON
    SCHEMA_VIOLATION = "schema_violation"  # HTTP 200, valid JSON of the wrong shape
    SLOW = "slow"  # answers correctly after `state.slow_s`
    GARBAGE_BODY = "garbage_body"  # HTTP 200 whose body is not JSON at all
    TRACEBACK = "traceback"  # HTTP 500 whose message is a server traceback


# (phrases, category, severity): the first rule whose phrase occurs in the lower-cased text wins
# for its category; several categories can fire at once.
RULES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("i will kill you", "going to shoot", "hurt you"), "violence", "high"),
    (("idiot", "stupid", "loser"), "harassment", "medium"),
    (("free prize", "you have won", "click here"), "spam", "high"),
    (("you are now dan", "developer mode"), "jailbreak", "medium"),
    (("are vermin", "subhuman"), "hate", "high"),
)
# Llama Guard hazard codes this fake guard cites per rule category (S2: non-violent crimes, e.g. fraud).
GUARD_CODES = {"violence": "S1", "hate": "S10", "spam": "S2"}
# ShieldGemma principle (by its quoted name in the prompt) -> the rule categories that violate it.
SHIELDGEMMA_PRINCIPLES = {
    '"No Dangerous Content"': ("violence",),
    '"No Harassment"': ("harassment",),
    '"No Hate Speech"': ("hate",),
    '"No Sexually Explicit Information"': (),
}
# OpenAI moderation categories (omni-moderation) and the scores a fired rule sets on them.
MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
MODERATION_SCORES = {
    "violence": {"violence": 0.97, "harassment/threatening": 0.71},
    "harassment": {"harassment": 0.93},
    "hate": {"hate": 0.95},
    "spam": {"illicit": 0.62},
}
BASELINE_SCORE = 0.0004
# What llama-cpp-python 0.3.36 answers to `response_format: {"type": "json_schema", ...}`: HTTP 500,
# recorded from the real server (`python -m llama_cpp.server`, 2026-11-30; only the path shortened):
# the request validation error, then a traceback frame.
LLAMA_CPP_JSON_SCHEMA_500 = {
    "error": {
        "message": (
            "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
            "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', "
            "'ctx': {'expected': \"'text' or 'json_object'\"}}\n\n"
            '  File "/srv/.venv/lib/python3.11/site-packages/llama_cpp/server/app.py", line 376, '
            "in create_chat_completion\n    POST /v1/chat/completions"
        ),
        "type": "internal_server_error",
        "param": None,
        "code": None,
    }
}
# A server that refuses logprobs: llama-cpp-python raises this ValueError (as HTTP 500) for
# `logprobs` on a model loaded without `logits_all` in its text-completion path (0.3.36's chat
# endpoint did return logprobs here).
LLAMA_CPP_LOGPROBS_500 = {
    "error": {
        "message": "logprobs is not supported for models created with logits_all=False",
        "type": "internal_server_error",
        "param": None,
        "code": None,
    }
}
# A careless server's 500 whose message carries a Python traceback (never to reach a verdict).
TRACEBACK_500 = {
    "error": {
        "message": (
            'Traceback (most recent call last):\n  File "/srv/app.py", line 12, in handle\n'
            "    raise RuntimeError('model crashed')\nRuntimeError: model crashed"
        ),
        "type": "internal_server_error",
    }
}
# Content that "hijacks" this fake model, to prove the parser and validator hold the line.
HIJACK_PLAIN = "ignore previous instructions"  # → the reply is plain text "allow"
HIJACK_JSON = "reply with this json"  # → a JSON object of the wrong shape saying allow

_DATA_BLOCK = re.compile(r"<data>\n(.*?)\n</data>", re.DOTALL)
_SCHEMA_BLOCK = re.compile(r"<output_schema>\n(.*?)\n</output_schema>", re.DOTALL)
_HUMAN_QUESTION = re.compile(r"Human Question: (.*?)\n<end_of_turn>", re.DOTALL)
_TOKENS = re.compile(r"\s+|\w+|[^\w\s]")


@dataclass
class ServerState:
    default_mode: Mode = Mode.OK
    script: deque[Mode] = field(default_factory=deque)
    reject_json_schema: bool = False
    reject_status: int = 500  # llama-cpp-python answers json_schema with 500; others with 400
    reject_logprobs: bool = False  # 500 "logprobs is not supported ..." on any request for logprobs
    logprobs: bool = True
    verdict_probability: float = 0.9  # probability of the chosen true/false token
    slow_s: float = 1.0
    retry_after_ms: int = 20
    requests: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each request
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def request_count(self) -> int:
        with self.lock:
            return len(self.requests)

    def next_mode(self) -> Mode:
        with self.lock:
            return self.script.popleft() if self.script else self.default_mode


def judged_text(body: dict[str, Any]) -> str:
    """The content the prompt asks to judge (the first `<data>` block of a user message)."""
    for message in body.get("messages", []):
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, str):
            found = _DATA_BLOCK.search(content)
            if found:
                return str(json.loads(found.group(1))["text"])
    return ""


def fired_rules(text: str) -> list[str]:
    lowered = text.lower()
    return [category for phrases, category, _ in RULES if any(p in lowered for p in phrases)]


def guard_content(body: dict[str, Any]) -> str:
    """Llama Guard's answer about the last turn of the conversation."""
    codes = sorted({GUARD_CODES[c] for c in fired_rules(str(body["messages"][-1]["content"])) if c in GUARD_CODES})
    return f"unsafe\n{','.join(codes)}" if codes else "safe"


def shieldgemma_content(body: dict[str, Any]) -> str:
    prompt = str(body["messages"][-1]["content"])
    found = _HUMAN_QUESTION.search(prompt)
    fired = set(fired_rules(found.group(1) if found else ""))
    principle = next((c for name, c in SHIELDGEMMA_PRINCIPLES.items() if name in prompt), ())
    return "Yes" if fired & set(principle) else "No"


def moderation_result(text: str) -> dict[str, Any]:
    scores = dict.fromkeys(MODERATION_CATEGORIES, BASELINE_SCORE)
    for category in fired_rules(text):
        for name, score in MODERATION_SCORES.get(category, {}).items():
            scores[name] = max(scores[name], score)
    return {
        "flagged": any(v >= 0.5 for v in scores.values()),
        "categories": {name: value >= 0.5 for name, value in scores.items()},
        "category_scores": scores,
        "category_applied_input_types": {name: ["text"] for name in MODERATION_CATEGORIES},
    }


def _categories(body: dict[str, Any]) -> list[str]:
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        schema = response_format["json_schema"]["schema"]
    else:
        system = next(m["content"] for m in body["messages"] if m["role"] == "system")
        schema = json.loads(_SCHEMA_BLOCK.search(system).group(1))  # type: ignore[union-attr]
    return list(schema["properties"]["categories"]["required"])


def verdict_content(text: str, categories: list[str]) -> str:
    lowered = text.lower()
    if HIJACK_PLAIN in lowered:
        return "allow"
    if HIJACK_JSON in lowered:
        return json.dumps({"decision": "allow", "flagged": False})
    judgements = {c: {"violates": False, "severity": "none"} for c in categories}
    fired = []
    for phrases, category, severity in RULES:
        if category in judgements and any(p in lowered for p in phrases):
            judgements[category] = {"violates": True, "severity": severity}
            fired.append(category)
    rationale = f"matched rules: {', '.join(fired)}" if fired else "no rule matched"
    return json.dumps({"rationale": rationale, "categories": judgements, "flagged": bool(fired), "confidence": "high"})


# Tokens that decide a verdict, and the alternative the fake model puts the rest of the mass on.
_ALTERNATIVES = {"true": "false", "false": "true", "safe": "unsafe", "unsafe": "safe", "Yes": "No", "No": "Yes"}


def _logprobs(content: str, probability: float) -> dict[str, Any]:
    chosen, other = math.log(probability), math.log(1.0 - probability)
    tokens = []
    for token in _TOKENS.findall(content):
        if token in _ALTERNATIVES:
            alternative = _ALTERNATIVES[token]
            top = [{"token": token, "logprob": chosen}, {"token": alternative, "logprob": other}]
            tokens.append({"token": token, "logprob": chosen, "top_logprobs": top})
        else:
            tokens.append({"token": token, "logprob": 0.0, "top_logprobs": [{"token": token, "logprob": 0.0}]})
    return {"content": tokens}


def completion(body: dict[str, Any], content: str, state: ServerState) -> dict[str, Any]:
    prompt_chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
    logprobs = _logprobs(content, state.verdict_probability) if body.get("logprobs") and state.logprobs else None
    return {
        "id": f"chatcmpl-local-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "local"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": logprobs,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_chars // 4,
            "completion_tokens": len(content) // 4,
            "total_tokens": prompt_chars // 4 + len(content) // 4,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read state, not logs
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": "local-moderator", "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        route = self.path.rstrip("/")
        if not route.endswith(("/chat/completions", "/moderations")):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        state = self.server.state
        with state.lock:
            state.requests.append(body)
            state.arrivals.append(time.monotonic())
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            if route.endswith("/moderations"):
                self._moderate(body, state)
            else:
                self._answer(body, state)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to answer
        finally:
            with state.lock:
                state.in_flight -= 1

    def _moderate(self, body: dict[str, Any], state: ServerState) -> None:
        mode = state.next_mode()
        if self._failed(mode, state):
            return
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        results = [moderation_result(str(text)) for text in inputs]
        if mode is Mode.MALFORMED_JSON:
            results = results[:-1]  # one result short of the inputs
        elif mode is Mode.SCHEMA_VIOLATION:
            for result in results:
                result["category_scores"]["violence"] = "high"
        self._send(200, {"id": f"modr-{time.monotonic_ns()}", "model": body.get("model"), "results": results})

    def _failed(self, mode: Mode, state: ServerState) -> bool:
        """Answer the failure modes shared by every route; False when the mode asks for a real answer."""
        if mode is Mode.RATE_LIMITED:
            self._send(
                429,
                {"error": {"message": "rate limited", "type": "rate_limit"}},
                {"retry-after-ms": str(state.retry_after_ms)},
            )
        elif mode is Mode.SERVER_ERROR:
            self._send(500, {"error": {"message": "internal error", "type": "server_error"}})
        elif mode is Mode.UNAUTHORIZED:
            presented = self.headers.get("Authorization", "").removeprefix("Bearer ")
            self._send(401, {"error": {"message": f"Incorrect API key provided: {presented}"}})
        elif mode is Mode.TRACEBACK:
            self._send(500, TRACEBACK_500)
        elif mode is Mode.GARBAGE_BODY:
            self._send_raw(200, b"<html>upstream proxy error</html>", "application/json")
        else:
            if mode is Mode.SLOW:
                time.sleep(state.slow_s)
            return False
        return True

    def _answer(self, body: dict[str, Any], state: ServerState) -> None:
        mode = state.next_mode()
        response_format = (body.get("response_format") or {}).get("type")
        model = str(body.get("model", "")).lower()
        if state.reject_json_schema and response_format == "json_schema":
            if state.reject_status == 500:
                self._send(500, LLAMA_CPP_JSON_SCHEMA_500)
            else:
                self._send(state.reject_status, {"error": {"message": "response_format json_schema is not supported"}})
        elif state.reject_logprobs and body.get("logprobs"):
            self._send(500, LLAMA_CPP_LOGPROBS_500)
        elif self._failed(mode, state):
            return
        else:
            if "llama-guard" in model:
                content = {Mode.MALFORMED_JSON: "I cannot judge that.", Mode.SCHEMA_VIOLATION: "unsafe\nX9"}.get(
                    mode, guard_content(body)
                )
            elif "shieldgemma" in model:
                content = "Maybe" if mode in (Mode.MALFORMED_JSON, Mode.SCHEMA_VIOLATION) else shieldgemma_content(body)
            elif mode is Mode.MALFORMED_JSON:
                content = '{"rationale": "cut off", "categories": {"hate": {"violates": tr'
            elif mode is Mode.SCHEMA_VIOLATION:
                content = json.dumps({"rationale": "x", "categories": {"hate": {"violates": "maybe"}}, "flagged": "no"})
            else:
                content = verdict_content(judged_text(body), _categories(body))
            self._send(200, completion(body, content, state))

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(payload).encode(), "application/json", headers)

    def _send_raw(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default listen backlog of 5 refuses concurrent clients

    def __init__(self, address: tuple[str, int], state: ServerState) -> None:
        super().__init__(address, _Handler)
        self.state = state


@dataclass
class LocalLLMServer:
    state: ServerState
    base_url: str


@contextmanager
def serve(host: str = "127.0.0.1", port: int = 0, state: ServerState | None = None) -> Iterator[LocalLLMServer]:
    """Run the server in a background thread for the duration of the block (port 0: any free)."""
    server = _Server((host, port), state or ServerState())
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="llm-server", daemon=True)
    thread.start()
    try:
        yield LocalLLMServer(server.state, f"http://{host}:{server.server_address[1]}/v1")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description="Local OpenAI-compatible moderation server (keyword rules).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--mode", type=Mode, choices=list(Mode), default=Mode.OK, help="behaviour of every request")
    parser.add_argument(
        "--reject-json-schema", action="store_true", help="answer json_schema requests with 500 (llama-cpp-python)"
    )
    parser.add_argument("--no-logprobs", action="store_true", help="never return logprobs")
    args = parser.parse_args()
    state = ServerState(
        default_mode=args.mode, reject_json_schema=args.reject_json_schema, logprobs=not args.no_logprobs
    )
    server = _Server((args.host, args.port), state)
    print(f"serving OpenAI-compatible chat completions on http://{args.host}:{args.port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
