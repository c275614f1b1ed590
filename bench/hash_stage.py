"""Measure the hash stage on the shared labelled data: normalisation speed, bank lookups,
near-duplicate recall on perturbed copies and false matches, reopen time.

    .venv/bin/python bench/hash_stage.py [--entries 20000] [--queries 500] [--skip-recall]

Everything runs in one process, in a temporary data directory; speeds are best of 3 and
reported next to a baseline measured in the same run (absolute figures are noisy on a
shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import tempfile
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path

from cascade.contract import ContentItem, Decision
from cascade.data import DEFAULT_DATA_DIR, LabelledItem, Split, load_labelled, split_of
from cascade.hashbank import EntryInput, FloodGuard, HashBank, MatchKind, Polarity, Shingler
from cascade.normalize import has_content, normalize, text_key
from cascade.pipeline import new_context
from cascade.stages.hash import HashStage

DATA = DEFAULT_DATA_DIR  # run from the repository root
FILES = ("davidson_tweets.jsonl", "toxicchat_train.jsonl", "sms_spam.jsonl")
_WS = re.compile(r"\s+")


def baseline_normalize(text: str) -> str:
    """The minimal normaliser this module replaced (NFKC, casefold, controls, whitespace)."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cf") or ch in "\t\n")
    return _WS.sub(" ", text.casefold()).strip()


def best_of(runs: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


# ----- perturbations ---------------------------------------------------------------------
# "Disguises" only change spelling: normalisation should turn them back into the same text
# (an exact hit). "Edits" change content a little: only the near-duplicate bank can catch them.

HOMOGLYPHS = {"a": "а", "e": "е", "o": "ο", "c": "с", "p": "р", "i": "і", "s": "ѕ", "x": "х", "y": "у"}
LEET = {"a": "4", "e": "3", "o": "0", "i": "1", "s": "$", "t": "7"}
FILLER = ["lol", "tho", "fr", "smh", "omg", "bro", "ok", "really", "today", "now"]


def _map_some(text: str, table: dict[str, str], rng: random.Random, rate: float) -> str:
    return "".join(table[ch] if ch in table and rng.random() < rate else ch for ch in text)


def disguise(text: str, rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["homoglyph", "zero_width", "leet", "spacing", "case_repeat", "fullwidth"])
    if kind == "homoglyph":
        return kind, _map_some(text, HOMOGLYPHS, rng, 0.5)
    if kind == "zero_width":
        return kind, "".join(ch + ("\u200b" if rng.random() < 0.3 else "") for ch in text)
    if kind == "leet":
        return kind, " ".join(_map_some(w, LEET, rng, 0.5) if w.isalpha() else w for w in text.split(" "))
    if kind == "spacing":
        words = text.split(" ")
        i = rng.randrange(len(words))
        if words[i].isalpha() and len(words[i]) > 2:
            words[i] = rng.choice([" ", ".", "-", "*"]).join(words[i])
        return kind, "  ".join(words)
    if kind == "case_repeat":
        out = "".join(ch * 3 if ch.isalpha() and rng.random() < 0.1 else ch for ch in text)
        return kind, out.upper() + "!!!"
    return kind, "".join(chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else ch for ch in text)


def edit(text: str, rng: random.Random) -> tuple[str, str]:
    words = text.split()
    kind = rng.choice(["drop_word", "insert_word", "replace_word", "typo", "append", "prefix_mention"])
    i = rng.randrange(len(words))
    if kind == "drop_word" and len(words) > 1:
        del words[i]
    elif kind == "insert_word":
        words.insert(i, rng.choice(FILLER))
    elif kind == "replace_word":
        words[i] = rng.choice(FILLER)
    elif kind == "typo":
        w = words[i]
        j = rng.randrange(len(w))
        words[i] = w[:j] + rng.choice("abcdefghijklmnopqrstuvwxyz") + w[j + 1 :]
    elif kind == "append":
        words.append(rng.choice(FILLER))
    else:
        words.insert(0, f"@user{rng.randrange(1000)}")
    return kind, " ".join(words)


# ----- measurements ----------------------------------------------------------------------


def measure_normalize(texts: list[str]) -> None:
    normalize_s = best_of(3, lambda: [normalize(t) for t in texts])
    baseline_s = best_of(3, lambda: [baseline_normalize(t) for t in texts])
    key_s = best_of(3, lambda: [text_key(normalize(t)) for t in texts])
    print(f"\n## normalise ({len(texts)} texts, mean {statistics.mean(map(len, texts)):.0f} chars)")
    print(f"normalize           {len(texts) / normalize_s:10,.0f} items/s")
    print(f"normalize+text_key  {len(texts) / key_s:10,.0f} items/s")
    print(
        f"baseline (NFKC+cf)  {len(texts) / baseline_s:10,.0f} items/s   ratio normalize/baseline "
        f"{baseline_s / normalize_s:.2f}"
    )


def measure_bank(entries: list[EntryInput], queries: list[str], unrelated: list[str], tmp: Path) -> None:
    bank = HashBank(tmp / "bench.sqlite", near_threshold=0.7)
    started = time.perf_counter()
    for start in range(0, len(entries), 1000):
        bank.upsert(entries[start : start + 1000], "bench")
    upsert_s = time.perf_counter() - started
    shingler = bank.shingler
    sign_s = best_of(1, lambda: [shingler.signature(normalize(e.text)) for e in entries])
    bank.close()
    reopen_s = best_of(3, lambda: HashBank(tmp / "bench.sqlite", near_threshold=0.7).close())
    bank = HashBank(tmp / "bench.sqlite", near_threshold=0.7)
    print(f"\n## bank of {len(bank)} entries")
    print(f"import (normalise + signature + insert)  {upsert_s:6.2f} s  ({len(entries) / upsert_s:,.0f} entries/s)")
    print(f"reopen from stored signatures            {reopen_s:6.2f} s")
    print(f"rehashing every entry instead would cost {sign_s:6.2f} s (signatures alone)")

    normalized = [normalize(q) for q in queries]
    keys = [text_key(n) for n in normalized]
    exact_s = best_of(3, lambda: [bank.exact(k) for k in keys])
    near_s = best_of(3, lambda: [bank.near(n, exclude_key=k) for n, k in zip(normalized, keys, strict=True)])
    print(f"exact lookups  {len(keys) / exact_s:12,.0f} /s")
    print(f"near lookups   {len(keys) / near_s:12,.0f} /s  (signature + LSH query + verification)")
    print(f"normalise      {len(keys) / best_of(3, lambda: [normalize(q) for q in queries]):12,.0f} /s  (same queries)")

    stage = HashStage(bank, FloodGuard(window=1000, share=0.05, min_items=200))
    contexts = [new_context(ContentItem(id=f"q-{i}", text=q)) for i, q in enumerate(queries)]
    stage_s = best_of(3, lambda: asyncio.run(stage.score(contexts)))
    intake_s = best_of(3, lambda: [new_context(ContentItem(id=f"q-{i}", text=q)) for i, q in enumerate(queries)])
    print(f"hash stage     {len(contexts) / stage_s:12,.0f} items/s  (score() on a batch: half banked, half not)")
    print(f"new_context    {len(contexts) / intake_s:12,.0f} items/s  (intake: normalise + text_key)")

    false_hits = [(u, bank.lookup(normalize(u))) for u in unrelated]
    false_hits = [(u, hits) for u, hits in false_hits if hits]
    print(f"unrelated held-out items with any hit: {len(false_hits)}/{len(unrelated)}")
    for text, hits in false_hits[:5]:
        entry = bank.get(hits[0].entry_id)
        print(f"   {hits[0].kind.value} J={hits[0].jaccard:.2f}  {text[:70]!r}\n      ~ {entry.original[:70]!r}")
    bank.close()


def measure_recall(entries: list[EntryInput], tmp: Path, count: int, rng_seed: int = 7) -> None:
    rng = random.Random(rng_seed)
    sample = rng.sample([e for e in entries if len(e.text.split()) >= 3], count)
    disguised = [(e.id, *disguise(e.text, rng)) for e in sample]
    edited = [(e.id, *edit(e.text, rng)) for e in sample]
    configs = [
        ("word bigrams (NOTES baseline)", Shingler(word_n=2, char_n=0), 0.7),
        ("word bigrams (NOTES baseline)", Shingler(word_n=2, char_n=0), 0.5),
        ("char 4-grams", Shingler(word_n=1, char_n=4), 0.7),
        ("word bigrams + char 3-grams", Shingler(word_n=2, char_n=3), 0.7),
        ("word bigrams + char 4-grams (default)", Shingler(word_n=2, char_n=4), 0.7),
        ("word bigrams + char 4-grams (default)", Shingler(word_n=2, char_n=4), 0.6),
        ("word bigrams + char 5-grams", Shingler(word_n=2, char_n=5), 0.7),
    ]
    print(f"\n## recall on perturbed copies of {count} banked entries (bank of {len(entries)})")
    print("config | threshold | disguises found (exact) | edits found (exact+near) | wrong-entry hits")
    for label, shingler, threshold in configs:
        path = tmp / f"recall-{shingler.version}-{threshold}.sqlite"
        bank = HashBank(path, near_threshold=threshold, shingler=shingler)
        for start in range(0, len(entries), 2000):
            bank.upsert(entries[start : start + 2000], "bench")
        found = {"disguise": 0, "disguise_exact": 0, "edit": 0}
        wrong = 0
        missed_kinds: dict[str, int] = {}
        for group, variants in (("disguise", disguised), ("edit", edited)):
            for source_id, kind, text in variants:
                hits = bank.lookup(normalize(text))
                ids = {h.entry_id for h in hits}
                # A hit on another entry with the very same text is a true duplicate, not a false match.
                source_key = bank.get(source_id).text_key
                wrong += sum(1 for h in hits if h.entry_id != source_id and bank.get(h.entry_id).text_key != source_key)
                if source_id in ids or any(bank.get(i).text_key == source_key for i in ids):
                    found[group] += 1
                    if group == "disguise" and any(h.kind is MatchKind.EXACT for h in hits):
                        found["disguise_exact"] += 1
                else:
                    missed_kinds[f"{group}:{kind}"] = missed_kinds.get(f"{group}:{kind}", 0) + 1
        print(
            f"{label} | {threshold} | {found['disguise']}/{count} ({found['disguise_exact']}) | "
            f"{found['edit']}/{count} | {wrong}   missed: {dict(sorted(missed_kinds.items()))}"
        )
        bank.close()


def measure_held_out_decisions(rows: list[LabelledItem], tmp: Path) -> None:
    """A bank built from the training split, run as the stage over the test split: what it settles, how well."""
    bank = HashBank(tmp / "held-out.sqlite", near_threshold=0.7)
    train = [r for r in rows if split_of(r.id) is Split.TRAIN and has_content(normalize(r.text))]
    for start in range(0, len(train), 2000):
        bank.upsert([entry_of(r) for r in train[start : start + 2000]], "bench")
    test = [r for r in rows if split_of(r.id) is Split.TEST]
    stage = HashStage(bank, FloodGuard(window=1000, share=0.05, min_items=200))
    results = asyncio.run(stage.score([new_context(ContentItem(id=r.id, text=r.text)) for r in test]))
    print(f"\n## stage on the test split ({len(test)} items), bank = training split ({len(bank)} entries)")
    for source in sorted({r.source for r in test}):
        pairs = [(r, res) for r, res in zip(test, results, strict=True) if r.source == source]
        decided = [(r, res.match) for r, res in pairs if res.match is not None]
        correct = sum((m.decision is Decision.BLOCK) == bool(r.flagged) for r, m in decided)
        blocks = sum(m.decision is Decision.BLOCK for _, m in decided)
        print(
            f"{source:22} decided {len(decided):5}/{len(pairs):5} ({len(decided) / len(pairs):5.1%})  "
            f"agree with label {correct}/{len(decided)}  (blocks {blocks}, allows {len(decided) - blocks})"
        )
    bank.close()


def entry_of(row: LabelledItem) -> EntryInput:
    polarity = Polarity.BAD if row.flagged else Polarity.GOOD
    categories = tuple(c for c, v in row.labels.items() if v) if row.flagged else ()
    return EntryInput(row.id, row.text, polarity, categories, row.source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--skip-recall", action="store_true", help="skip the shingle comparison (the slow part)")
    args = parser.parse_args()

    rows = load_labelled([DATA / f for f in FILES])
    measure_normalize([r.text for r in rows])

    train = [r for r in rows if split_of(r.id) is Split.TRAIN and has_content(normalize(r.text))]
    held_out = [r for r in rows if split_of(r.id) is Split.TEST and has_content(normalize(r.text))]
    rng = random.Random(11)
    rng.shuffle(train)
    entries = [entry_of(r) for r in train[: args.entries]]
    banked_keys = {text_key(normalize(e.text)) for e in entries}
    unrelated = [r.text for r in held_out if text_key(normalize(r.text)) not in banked_keys][: args.queries * 4]
    queries = [e.text for e in rng.sample(entries, args.queries // 2)] + unrelated[: args.queries // 2]

    with tempfile.TemporaryDirectory() as tmp:
        measure_bank(entries, queries, unrelated, Path(tmp))
        measure_held_out_decisions(rows, Path(tmp))
        if not args.skip_recall:
            measure_recall(entries, Path(tmp), args.queries)


if __name__ == "__main__":
    main()
