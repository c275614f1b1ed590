"""Fine-tune the packaged MiniLM end to end with one sigmoid head per category.

Labels are partial: a (row, head) pair trains only if the row carries that head's label
(a category missing from `labels` is unknown, never 0), so the loss is a masked BCE.

Sources are balanced by sampling, drawn afresh every epoch: sources without a cap (ToxicChat,
the policy seeds) come whole; a capped source (Davidson, whose "offensive" means profanity
and is 83 % flagged; SMS) contributes `cap` rows, half flagged and half not, so no source
teaches "this style of text = violation".

Batches are bucketed by token length (one long prompt must not pad fifteen tweets), and
training stops early on the calibration split (macro `flagged` AUPRC over its sources, those
whose `flagged` is masked left out).
The best state is checkpointed after every evaluation, so a stopped run loses nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score
from tokenizers import Tokenizer

from cascade.data import FLAGGED, LabelledItem, Split, categories_of, load_labelled

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"
SEED = 20261127

Log = Callable[[str], None]


@dataclass(frozen=True)
class FitOptions:
    epochs: int = 3
    batch_size: int = 16
    max_tokens: int = 256
    """Truncation while training: the serving limit (chosen by measurement, usually 256); training at 128
    cost ToxicChat ~0.02-0.03 AUPRC on both held-out splits (docs/classifier.md)."""
    encoder_lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.06
    dropout: float = 0.1
    train_word_embeddings: bool = True
    """Fine-tune the vocabulary table too: frozen, ToxicChat `flagged` AUPRC fell ~0.1 (docs/classifier.md)."""
    source_caps: Mapping[str, int] = field(default_factory=lambda: {"davidson2017": 400, "sms_spam_collection": 300})
    """Rows per epoch from these sources, half flagged and half not; other sources come whole."""
    flagged_ignored: tuple[str, ...] = ()
    """Sources whose `flagged` label is masked (their categories still train their heads)."""
    calibration_cap: int = 600
    """Rows per source of the calibration split scored for early stopping (a fixed sample)."""
    patience: int = 1
    max_minutes: float = 0.0
    """Wall-clock budget (0: none): stop, evaluate and keep the best state when it runs out."""
    min_rows_per_class: int = 8
    seed: int = SEED
    threads: int = 1
    """torch intra-op threads (0: torch's default); on a shared 2-core machine 2 threads cost ~5x the CPU per step."""


def head_names(rows: Sequence[LabelledItem], min_rows_per_class: int) -> list[str]:
    """`flagged` then every category with enough labelled rows of each class."""
    names = []
    for category in categories_of(rows):
        labels = [r.label(category) for r in rows]
        positives = sum(1 for v in labels if v == 1)
        negatives = sum(1 for v in labels if v == 0)
        if min(positives, negatives) >= min_rows_per_class:
            names.append(category)
    return names


def label_matrix(
    rows: Sequence[LabelledItem], heads: Sequence[str], flagged_ignored: Sequence[str] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Targets and mask, both (rows, heads) float32: mask 0 where the row does not carry the label
    (or carries a `flagged` from a source in `flagged_ignored`)."""
    y = np.zeros((len(rows), len(heads)), dtype=np.float32)
    mask = np.zeros_like(y)
    for i, row in enumerate(rows):
        for j, head in enumerate(heads):
            if head == FLAGGED and row.source in flagged_ignored:
                continue
            value = row.label(head)
            if value is not None:
                y[i, j] = value
                mask[i, j] = 1.0
    return y, mask


def masked_bce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the labelled (row, head) pairs only."""
    losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def epoch_sample(rows: Sequence[LabelledItem], caps: Mapping[str, int], rng: np.random.Generator) -> np.ndarray:
    """Row indices for one epoch: capped sources stratified half flagged / half not, the rest whole."""
    by_source: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_source.setdefault(row.source, []).append(i)
    chosen: list[int] = []
    for source, index in sorted(by_source.items()):
        cap = caps.get(source)
        if cap is None or cap >= len(index):
            chosen += index
            continue
        for flagged in (1, 0):
            pool = [i for i in index if rows[i].flagged == flagged]
            chosen += rng.choice(pool, size=min(cap // 2, len(pool)), replace=False).tolist()
    return np.array(chosen, dtype=np.int64)


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar token length: sort within random windows of 50 batches."""
    order = rng.permutation(len(lengths))
    window = batch_size * 50
    batches: list[np.ndarray] = []
    for start in range(0, len(order), window):
        part = order[start : start + window]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class TunedEncoder(torch.nn.Module):
    """BERT → mask-aware mean pooling → (unit embedding, one logit per head)."""

    def __init__(self, bert: torch.nn.Module, heads: int, dropout: float) -> None:
        super().__init__()
        self.bert = bert
        hidden = int(bert.config.hidden_size)
        self.dropout = torch.nn.Dropout(dropout)
        self.heads = torch.nn.Linear(hidden, heads)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        embedding = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return embedding, self.heads(self.dropout(pooled))


def load_encoder(model_dir: Path, heads: int, dropout: float = 0.1, eager: bool = False) -> TunedEncoder:
    """The packaged MiniLM with fresh heads (eager attention for an export ORT can fuse)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    extra = {"attn_implementation": "eager"} if eager else {}
    bert = AutoModel.from_pretrained(str(model_dir), **extra)
    return TunedEncoder(bert, heads, dropout)


def encode(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(list(texts))]


def pad(token_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(ids) for ids in token_ids)
    ids = torch.zeros((len(token_ids), longest), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(token_ids):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        mask[row, : len(tokens)] = 1
    return ids, mask


def make_tokenizer(model_dir: Path, max_tokens: int) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_tokens)
    tokenizer.no_padding()
    return tokenizer


@torch.no_grad()
def predict_logits(model: TunedEncoder, token_ids: Sequence[Sequence[int]], batch_tokens: int = 4096) -> np.ndarray:
    """Head logits of every row, computed in length-sorted batches, in input order."""
    model.eval()
    order = np.argsort([len(t) for t in token_ids], kind="stable")
    out = np.zeros((len(token_ids), model.heads.out_features), dtype=np.float32)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(token_ids[order[end]]) <= batch_tokens and end - start < 64:
            end += 1
        chunk = order[start:end]
        _, logits = model(*pad([token_ids[i] for i in chunk]))
        out[chunk] = logits.numpy()
        start = end
    return out


def per_source_sample(rows: Sequence[LabelledItem], cap: int, seed: int) -> list[LabelledItem]:
    """At most `cap` rows per source, a fixed random sample, so every evaluation scores the same rows."""
    rng = np.random.default_rng(seed)
    by_source: dict[str, list[LabelledItem]] = {}
    for row in rows:
        by_source.setdefault(row.source, []).append(row)
    sample: list[LabelledItem] = []
    for _, items in sorted(by_source.items()):
        picked = rng.permutation(len(items))[:cap]
        sample += [items[i] for i in sorted(picked)]
    return sample


def flagged_auprc_by_source(rows: Sequence[LabelledItem], scores: np.ndarray) -> dict[str, float]:
    result = {}
    for source in sorted({r.source for r in rows}):
        picked = [i for i, r in enumerate(rows) if r.source == source]
        y = np.array([rows[i].flagged for i in picked])
        if 0 < y.sum() < len(y):
            result[source] = round(float(average_precision_score(y, scores[picked])), 4)
    return result


def fit(
    paths: Sequence[Path],
    seed_rows: Sequence[LabelledItem],
    model_dir: Path,
    out: Path,
    options: FitOptions,
    log: Log = print,
) -> dict[str, Any]:
    """Train on the train split (+ seeds), stop early on the calibration split; returns the history.

    Writes `out/checkpoint.pt` (best state, head names, options) and `out/history.json`.
    """
    started = time.perf_counter()
    torch.manual_seed(options.seed)
    if options.threads:
        torch.set_num_threads(options.threads)
    rng = np.random.default_rng(options.seed)
    train_rows = load_labelled(paths, Split.TRAIN) + list(seed_rows)
    heads = head_names(train_rows, options.min_rows_per_class)
    y_all, mask_all = label_matrix(train_rows, heads, options.flagged_ignored)
    tokenizer = make_tokenizer(model_dir, options.max_tokens)
    train_ids = encode(tokenizer, [r.text for r in train_rows])
    lengths = np.array([len(t) for t in train_ids])
    # Early stopping watches `flagged` where it is trained: a masked source's `flagged` is not a target.
    calibration = per_source_sample(
        [r for r in load_labelled(paths, Split.CALIBRATION) if r.source not in options.flagged_ignored],
        options.calibration_cap,
        options.seed,
    )
    calibration_ids = encode(tokenizer, [r.text for r in calibration])
    log(f"{len(train_rows)} train rows, {len(calibration)} calibration rows, heads {heads}")

    model = load_encoder(model_dir, len(heads), options.dropout)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(options.train_word_embeddings)
    encoder_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("heads.")]
    optimizer = torch.optim.AdamW(
        [
            {"params": encoder_params, "lr": options.encoder_lr},
            {"params": model.heads.parameters(), "lr": options.head_lr},
        ],
        weight_decay=options.weight_decay,
    )
    steps_per_epoch = -(
        -len(epoch_sample(train_rows, options.source_caps, np.random.default_rng(0))) // options.batch_size
    )
    total_steps = steps_per_epoch * options.epochs
    warmup = max(1, int(total_steps * options.warmup))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    )
    history: dict[str, Any] = {"heads": heads, "options": asdict(options), "evaluations": []}
    best = -1.0
    stale = 0
    step = 0
    deadline = started + options.max_minutes * 60 if options.max_minutes else float("inf")
    out.mkdir(parents=True, exist_ok=True)

    def evaluate(epoch: float) -> bool:
        """Score the calibration sample; checkpoint if best; True to stop for lack of progress."""
        nonlocal best, stale
        scores = predict_logits(model, calibration_ids)[:, heads.index(FLAGGED)]
        per_source = flagged_auprc_by_source(calibration, scores)
        macro = round(float(np.mean(list(per_source.values()))), 4)
        record = {
            "epoch": epoch,
            "step": step,
            "macro_flagged_auprc": macro,
            "per_source": per_source,
            "seconds": round(time.perf_counter() - started, 1),
        }
        history["evaluations"].append(record)
        improved = macro > best
        if improved:
            best, stale = macro, 0
            history["best"] = record
            partial = out / f".{CHECKPOINT}.partial"
            torch.save({"state_dict": model.state_dict(), "heads": heads, "options": asdict(options)}, partial)
            partial.replace(out / CHECKPOINT)
        else:
            stale += 1
        (out / HISTORY).write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
        log(
            f"eval epoch {epoch:.2f} step {step}: macro flagged AUPRC {macro} {per_source}"
            f"{' (best, saved)' if improved else ''}"
        )
        return stale > options.patience

    for epoch in range(options.epochs):
        model.train()
        sample = epoch_sample(train_rows, options.source_caps, rng)
        batches = length_batches(lengths[sample], options.batch_size, rng)
        running = 0.0
        out_of_time = False
        for number, batch in enumerate(batches, 1):
            index = sample[batch]
            ids, mask = pad([train_ids[i] for i in index])
            _, logits = model(ids, mask)
            loss = masked_bce(logits, torch.from_numpy(y_all[index]), torch.from_numpy(mask_all[index]))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            running += float(loss.detach())
            if number % 20 == 0:
                log(
                    f"epoch {epoch} batch {number}/{len(batches)} loss {running / 20:.4f} "
                    f"{time.perf_counter() - started:.0f}s"
                )
                running = 0.0
            if time.perf_counter() > deadline:
                out_of_time = True
                break
        if evaluate(epoch + number / len(batches)) or out_of_time:
            break
    history["fit_seconds"] = round(time.perf_counter() - started, 1)
    history["train_rows"] = len(train_rows)
    (out / HISTORY).write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
    return history
