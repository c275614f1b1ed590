"""The embedding paths the bench compares, and how it times them.

The torch row is sentence-transformers on the same model, fed exactly like the ONNX serving
path: each call is cut into the same length-sorted model batches (`length_batches`, at most
64 texts and 4096 padded tokens each), so the ratio compares the two runtimes and not two
batching strategies. `SentenceTransformer.encode(texts, batch_size=64)` as usually called pads
each call of 64 to its longest text; on mixed lengths that alone cost torch a large factor.
Torch's OpenMP threads wait passively (see `torch_embedder`), as a shared machine needs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from cascade.embedding import DIMENSIONS, MAX_TOKENS, length_batches, source_model_dir

Embed = Callable[[Sequence[str]], np.ndarray]


def torch_embedder(threads: int, max_batch: int = 64) -> Embed:
    """sentence-transformers on torch (the `train` extra), batched like `cascade.embedding.Embedder`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # OpenMP threads that busy-wait between kernels collapse when the cores are shared: on this
    # 2-core machine under load, torch with 2 threads ran batch 1 at ~1-2 sentences/s busy-waiting
    # and 12-23 passive (docs/bench.md). libgomp reads the policy once, when torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(source_model_dir()), device="cpu")
    tokenizer = model.tokenizer

    def embed(texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_TOKENS)["input_ids"]]
        out = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        for chunk in length_batches(lengths, max_batch):
            out[chunk] = model.encode(
                [texts[i] for i in chunk], batch_size=len(chunk), normalize_embeddings=True, convert_to_numpy=True
            )
        return out

    return embed


def rate(embed: Embed, texts: Sequence[str], batch: int) -> float:
    """Sentences per second, calling `embed` with `batch` texts at a time (as a stage batch would)."""
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        embed(texts[i : i + batch])
    return len(texts) / (time.perf_counter() - started)
