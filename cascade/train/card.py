"""The frozen model's card: card.md rendered from card.json (every figure comes from there)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cascade.data import FLAGGED


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A Markdown table and a blank line; an empty cell (None) shows as "–". Both model cards use it."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("–" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def render_card(card: Mapping[str, Any]) -> str:
    """The human-readable model card; every figure comes from card.json."""
    options = card["options"]
    lines = [
        f"# Model card: {card['name']} (version {card['version']})",
        "",
        f"{card['task'].capitalize()}. Design `{card['design']}`: a scikit-learn estimator per head on the "
        f"`{card['input']['embedder']}` sentence embedding, sigmoid-calibrated on held-out folds "
        "(`CalibratedClassifierCV`), exported to one ONNX graph "
        f"(input `{card['input']['name']}` (n, {card['input']['shape'][1]}) → output `{card['output']['name']}` "
        f"(n, {len(card['heads'])}), heads in this order: {', '.join(card['heads'])}).",
        "",
        f"Created {card['created_at']} in {card['training_seconds']} s; ONNX vs scikit-learn max |diff| "
        f"{card['onnx_parity_max_abs_diff']:.1e}.",
        "",
        "## Data",
        "",
        f"Split used: `{card['split']}` ({card['rows']} rows). A category missing from a row's labels is unknown: "
        "the row does not train that head.",
        "",
        *markdown_table(
            ["file", "rows", "sha256"], [[Path(d["path"]).name, d["rows"], d["sha256"]] for d in card["data"]]
        ),
        *markdown_table(
            ["head", "rows", "positives", "by source (rows / positives)"],
            [
                [
                    head,
                    c["rows"],
                    c["positives"],
                    "; ".join(f"{s} {v['rows']}/{v['positives']}" for s, v in c["per_source"].items()),
                ]
                for head, c in card["label_counts"].items()
            ],
        ),
    ]
    if card["skipped_categories"]:
        lines += [f"Skipped (too few labels of a class): {', '.join(card['skipped_categories'])}.", ""]
    lines += [
        "## Source weighting",
        "",
        f"Source multipliers: {json.dumps(options['source_weights']) or '{}'} (unnamed sources: 1). "
        "Each source gets the same total weight times its multiplier, shared equally among its rows "
        "(estimator and calibrator alike).",
        "",
    ]
    comparison = card.get("weighting_comparison") or {}
    if comparison:
        lines += [
            f"`{comparison['head']}` head AUPRC per source, this weighting vs every row weighing the same:",
            "",
            *markdown_table(
                ["source", "in-domain (CV), chosen", "unweighted", "cross-source, chosen", "unweighted"],
                [
                    [
                        s,
                        v["in_domain_auprc"]["chosen"],
                        v["in_domain_auprc"]["unweighted"],
                        v["cross_source_auprc"]["chosen"],
                        v["cross_source_auprc"]["unweighted"],
                    ]
                    for s, v in comparison["sources"].items()
                ],
            ),
        ]
    lines += [
        f"## Cross-validated quality ({options['folds']}-fold, out-of-fold calibrated probabilities)",
        "",
        *markdown_table(
            ["head", "AUPRC", "ROC AUC", "F1 @ 0.5", "ECE"],
            [[h, m["auprc"], m["roc_auc"], m["f1_at_0.5"], m["ece"]] for h, m in card["cross_validation"].items()],
        ),
        "Per source (same out-of-fold predictions):",
        "",
        *markdown_table(
            ["head", "source", "rows", "positives", "AUPRC", "ECE"],
            [
                [h, s, v["rows"], v["positives"], v["auprc"], v["ece"]]
                for h, m in card["cross_validation"].items()
                for s, v in m["per_source"].items()
            ],
        ),
    ]
    if card["cross_source"]:
        lines += [
            "## Cross-source (train on the other sources, test on this one)",
            "",
            *markdown_table(
                ["head", "held-out source", "trained on", "rows", "positives", "AUPRC", "F1 @ 0.5", "ECE"],
                [
                    [h, s, ", ".join(v["trained_on"]), v["rows"], v["positives"], v["auprc"], v["f1_at_0.5"], v["ece"]]
                    for h, per in card["cross_source"].items()
                    for s, v in per.items()
                ],
            ),
        ]
    lines += [
        "## Design comparison",
        "",
        *markdown_table(
            ["design", "mean CV AUPRC", *card["heads"], "ms/item batch 1", "ms/item batch 64", "ONNX bytes"],
            [
                [
                    d,
                    e["mean_auprc"],
                    *(e["heads"][h]["auprc"] for h in card["heads"]),
                    e["latency_ms_per_item"]["batch_1"],
                    e["latency_ms_per_item"]["batch_64"],
                    e["onnx_bytes"],
                ]
                for d, e in card["design_comparison"].items()
            ],
        ),
    ]
    flagged_sources = card["design_comparison"][card["design"]]["heads"].get(FLAGGED, {}).get("per_source", {})
    if flagged_sources:
        lines += [
            "`flagged` CV AUPRC per source, per design:",
            "",
            *markdown_table(
                ["design", *flagged_sources],
                [
                    [d, *(e["heads"][FLAGGED]["per_source"][s]["auprc"] for s in flagged_sources)]
                    for d, e in card["design_comparison"].items()
                ],
            ),
        ]
    lines += [_design_rationale(card["design"], card["design_comparison"]), ""]
    lines += [
        "## Libraries",
        "",
        ", ".join(f"{k} {v}" for k, v in card["libraries"].items()),
        "",
        "## Reproduce",
        "",
        f"```\n{card.get('command', 'cascade train ...')}\n```",
        "",
    ]
    return "\n".join(lines)


def _design_rationale(default: str, evaluation: Mapping[str, Any]) -> str:
    """How the chosen design compares with each alternative, in the card's own figures."""
    ours = evaluation[default]
    parts = []
    for other, theirs in evaluation.items():
        if other == default:
            continue
        latency = ours["latency_ms_per_item"]["batch_64"] / max(theirs["latency_ms_per_item"]["batch_64"], 1e-9)
        flagged = ""
        if FLAGGED in ours["heads"]:
            gain = ours["heads"][FLAGGED]["auprc"] - theirs["heads"][FLAGGED]["auprc"]
            flagged = f"{gain:+.3f} on `flagged`, "
        parts.append(
            f"vs `{other}`: {ours['mean_auprc'] - theirs['mean_auprc']:+.3f} mean CV AUPRC, {flagged}"
            f"at {latency:.1f}x the graph's latency per item (batch 64) and "
            f"{ours['onnx_bytes'] / theirs['onnx_bytes']:.1f}x its size"
        )
    return f"Default `{default}`: " + "; ".join(parts) + "." if parts else ""
