"""The bench result as rich tables, a JSON file and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from cascade.bench.quality import Curves


def _num(value: object, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _pct(value: object) -> str:
    return "-" if value is None else f"{float(value):.1%}"  # type: ignore[arg-type]


def _na(row: Mapping[str, Any]) -> str:
    return f"[yellow]not available:[/] {row['reason']}"


def render(result: Mapping[str, Any], console: Console) -> None:
    throughput = result.get("throughput")
    if throughput:
        _render_throughput(throughput, console)
    quality = result.get("quality")
    if quality:
        _render_quality(quality, console)
    scaling = result.get("scaling")
    if scaling:
        _render_scaling(scaling, console)
    meta = result["meta"]
    console.print(
        f"thresholds {meta['thresholds']['version']}, commit {str(meta.get('git_commit'))[:10]}, "
        f"{meta['machine']['cpus']} CPUs, {meta.get('elapsed_s', 0):.0f} s. {meta['note']}."
    )


def _render_throughput(section: Mapping[str, Any], console: Console) -> None:
    given = section["input"]
    table = Table(
        title=f"Throughput: same {given['items']} test-split texts (mean {given['mean_chars']:.0f} chars), "
        f"{given['rounds']} interleaved rounds"
    )
    for column in ("row", "median", "best", "unit", "rounds"):
        table.add_column(column, justify="left" if column in ("row", "unit") else "right")
    for row in section["rows"].values():
        if row["available"]:
            table.add_row(row["label"], _num(row["median"]), _num(row["best"]), row["unit"], str(len(row["samples"])))
        else:
            table.add_row(row["label"], _na(row), "", "", "")
    console.print(table)
    ratios = Table(title="Ratios, same run")
    ratios.add_column("ratio")
    ratios.add_column("median / median", justify="right")
    ratios.add_column("median of per-round ratios", justify="right")
    for row in section["ratios"].values():
        if row["available"]:
            paired = row.get("paired_median")
            ratios.add_row(row["label"], f"{row['value']:.2f}x", "-" if paired is None else f"{paired:.2f}x")
        else:
            ratios.add_row(row["label"], _na(row), "")
    console.print(ratios)
    repeats = section["rows"].get("cascade_repeats", {})
    if repeats.get("available"):
        same = "identical" if repeats["verdicts_identical_to_uncached"] else "[red]DIFFERENT[/]"
        console.print(
            f"repeat stream: {repeats['repeated_items']} of {given['items']} items repeat an earlier text, "
            f"{repeats['reissued']} re-issued from the cache; decisions vs the uncached cascade: {same}"
            f" (largest score change {repeats.get('largest_score_change', float('nan')):.2g})"
        )
    _render_latency(section.get("latency", {}), console)
    inprocess, stream = section["rows"].get("cascade_inprocess", {}), section["rows"].get("stream_broker", {})
    if inprocess.get("available") and stream.get("available"):
        shares = inprocess["decided_by"].keys() | stream["decided_by"].keys()
        gap = max(abs(inprocess["decided_by"].get(k, 0) - stream["decided_by"].get(k, 0)) for k in shares)
        if gap > 0.01:
            console.print(
                "[yellow]warning:[/] in-process and broker runs decided differently: the ratio compares unlike work"
            )
    for key in ("cascade_inprocess", "stream_broker"):
        row = section["rows"].get(key, {})
        if row.get("available"):
            split = ", ".join(f"{k} {v:.2f}" for k, v in row["stage_ms_per_item"].items())
            decided = ", ".join(f"{k} {v:.0%}" for k, v in row["decided_by"].items())
            console.print(
                f"{key}, last round: stage ms per item: {split}; decided by: {decided}; "
                f"items with a stage error: {row['items_with_stage_error']}"
            )


def _render_latency(rows: Mapping[str, Any], console: Console) -> None:
    """Publish-to-verdict latency through the broker at fixed offered rates, by deciding stage."""
    if not rows:
        return
    table = Table(title="Latency under load: publish to verdict, one worker through the broker")
    for column in ("offered", "items/s offered / achieved", "decided by", "items", "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(column, justify="left" if column in ("offered", "decided by") else "right")
    for row in rows.values():
        if not row["available"]:
            table.add_row(row["label"], _na(row), "", "", "", "", "")
            continue
        rates = f"{row['offered_rate']:.1f} / {row['achieved_rate']:.1f}"
        for stage, p in [("all", row["all"]), *row["by_stage"].items()]:
            offered = f"{row['offered_share']:.0%} of max" if stage == "all" else ""
            cells = (_num(p["p50_ms"]), _num(p["p95_ms"]), _num(p["p99_ms"]))
            table.add_row(offered, rates if stage == "all" else "", stage, str(p["n"]), *cells)
    console.print(table)


def _render_quality(section: Mapping[str, Any], console: Console) -> None:
    if not section["available"]:
        console.print(f"Quality and cost: {_na(section)}")
        return
    table = Table(
        title=f"Quality and cost on the test split: {section['n']} items, {section['positives']} flagged"
        f"{' (sampled)' if section['sampled'] else ''}; thresholds {section['thresholds_version']}"
    )
    for column in ("system", "AUPRC", "F1", "precision", "recall", "LLM rate", "cost vs all-LLM", "$/1k items"):
        table.add_column(column, justify="left" if column == "system" else "right")
    for row in section["systems"].values():
        if not row["available"]:
            table.add_row(row["label"], _na(row), *[""] * 6)
            continue
        if "quality" in row:
            quality = ["[dim]n/a: no LLM here[/]", "", "", ""]
        else:
            quality = [_num(row["auprc"], 3), _num(row["f1"], 3), _num(row["precision"], 3), _num(row["recall"], 3)]
        cost = row["cost_relative_to_all_llm"]
        usd = row.get("usd_per_1k_items")
        table.add_row(row["label"], *quality, _pct(row["llm_rate"]), _pct(cost), "-" if usd is None else f"{usd:.2f}")
    console.print(table)
    views = Table(title="Cascade, three views of the items the LLM would get")
    for column in ("view", "coverage", "precision", "recall", "F1"):
        views.add_column(column, justify="left" if column == "view" else "right")
    labels = {
        "review_as_allow": "LLM-bound items unresolved, not blocked (headline)",
        "auto": "auto-decided items only",
        "review_as_human": "upper bound: every escalated item judged right",
    }
    for key, label in labels.items():
        view = section["cascade_views"][key]
        views.add_row(
            label,
            _pct(view.get("coverage", 1.0)),
            _num(view["precision"], 3),
            _num(view["recall"], 3),
            _num(view["f1"], 3),
        )
    console.print(views)
    escalation = ", ".join(
        f"{name}: reached {_pct(s['reached'])}, decided {_pct(s['decided'])}"
        for name, s in section["escalation"].items()
    )
    console.print(f"escalation: {escalation}; to the LLM: {_pct(section['llm_rate'])}. {section['llm_quality']}.")
    per_source = section["per_source"]
    table = Table(title="AUPRC / F1 per source (the peer was likely trained partly on Davidson)")
    table.add_column("system")
    for group, counts in per_source["groups"].items():
        table.add_column(f"{group} (n={counts['n']}, pos={counts['positives']})", justify="right")
    for key, groups in per_source["systems"].items():
        table.add_row(
            section["systems"][key]["label"], *(f"{_num(g['auprc'], 3)} / {_num(g['f1'], 3)}" for g in groups.values())
        )
    console.print(table)


def _render_scaling(section: Mapping[str, Any], console: Console) -> None:
    knn = section["knn"]
    if not knn["available"]:
        console.print(f"kNN scaling: {_na(knn)}")
    else:
        table = Table(title=f"kNN (k={knn['k']}, {knn['backend']}, HNSW) against bank size, one process per size")
        columns = ("bank", "p50 ms", "p95 ms", "queries/s (single)", "queries/s (batch 64)", "recall@10")
        for column in (*columns, "index RSS MB", "build s"):
            table.add_column(column, justify="right")
        for row in knn["rows"]:
            if not row["available"]:
                table.add_row(_na(row), *[""] * 7)
                continue
            table.add_row(
                f"{row['bank_size']:,}",
                _num(row["query_p50_ms"], 2),
                _num(row["query_p95_ms"], 2),
                _num(row["single_queries_per_s"], 0),
                _num(row["batched64_queries_per_s"], 0),
                _num(row["recall@10"], 3),
                _num(row["index_rss_mb"], 0),
                _num(row["upsert_s"] + row["optimize_s"], 1),
            )
        console.print(table)
    batch = section["embedding_batch"]
    if not batch["available"]:
        console.print(f"Embedding vs batch size: {_na(batch)}")
        return
    table = Table(title=f"Embedding throughput against batch size ({batch['path']})")
    for column in ("batch", "median sentences/s", "best", "ms per call"):
        table.add_column(column, justify="right")
    for row in batch["rows"]:
        table.add_row(
            str(row["batch"]), _num(row["median"]), _num(row["best"]), _num(1000 * row["batch"] / row["median"], 2)
        )
    console.print(table)


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(result: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    return plt


def write_plots(result: Mapping[str, Any], curves: Curves | None, directory: Path) -> list[Path]:
    """PNG files for the sections that ran; returns the paths written."""
    from cascade.plots import pr_curves

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    throughput = result.get("throughput")
    if throughput:
        written.append(_throughput_plot(throughput["rows"], directory / "throughput.png"))
    if curves is not None:
        path = pr_curves(curves.scores, curves.positive, directory / "quality_pr.png")
        if path is not None:
            written.append(path)
    quality = result.get("quality")
    if quality and quality["available"]:
        written.append(_cost_plot(quality, directory / "quality_cost.png"))
    scaling = result.get("scaling")
    if scaling and scaling["knn"]["available"]:
        rows = [r for r in scaling["knn"]["rows"] if r["available"]]
        if rows:
            written.append(_knn_plot(rows, directory / "scaling_knn.png"))
    if scaling and scaling["embedding_batch"]["available"]:
        written.append(_batch_plot(scaling["embedding_batch"]["rows"], directory / "scaling_batch.png"))
    return written


def _throughput_plot(rows: Mapping[str, Any], path: Path) -> Path:
    plt = _pyplot()
    shown = [(key, r) for key, r in rows.items() if r["available"]]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(shown) + 1.6))
    labels = [f"{key} [{r['unit']}]" for key, r in shown]
    ax.barh(labels, [r["median"] for _, r in shown], color="tab:blue", label="median")
    ax.scatter([r["best"] for _, r in shown], labels, color="black", marker="|", s=200, label="best", zorder=3)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("per second (log scale)")
    ax.set_title("Throughput: same texts, same run")
    ax.legend(loc="lower right")
    return _save(fig, path)


def _cost_plot(quality: Mapping[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in quality["systems"].values():
        if row["available"] and row.get("f1") is not None and row.get("cost_relative_to_all_llm") is not None:
            ax.scatter(row["cost_relative_to_all_llm"], row["f1"], s=60)
            ax.annotate(row["label"], (row["cost_relative_to_all_llm"], row["f1"]), fontsize=8)
    cascade = quality["systems"]["cascade"]
    upper = quality["cascade_views"]["review_as_human"]["f1"]
    if cascade["cost_relative_to_all_llm"] is not None and upper is not None:
        cost = cascade["cost_relative_to_all_llm"]
        ax.scatter(cost, upper, s=60, marker="^", color="tab:gray")
        ax.annotate("cascade if every LLM-bound item were judged right", (cost, upper), fontsize=8)
        if cascade["f1"] is not None:
            ax.plot([cost, cost], [cascade["f1"], upper], color="tab:gray", linestyle=":")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlim(0, 1.5)  # all-LLM sits at 1
    ax.set_xlabel("modelled cost relative to all-LLM (all-LLM = 1)")
    ax.set_ylabel("F1, test split (LLM-bound items not blocked)")
    ax.set_title("Quality against modelled cost")
    return _save(fig, path)


def _knn_plot(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    sizes = [r["bank_size"] for r in rows]
    fig, (latency, memory) = plt.subplots(1, 2, figsize=(10, 4))
    latency.plot(sizes, [r["query_p50_ms"] for r in rows], marker="o", label="single query p50")
    latency.plot(sizes, [r["query_p95_ms"] for r in rows], marker="o", label="single query p95")
    latency.plot(sizes, [1000 / r["batched64_queries_per_s"] for r in rows], marker="o", label="per query in batch 64")
    latency.set_ylabel("ms")
    memory.plot(sizes, [r["index_rss_mb"] for r in rows], marker="o", color="tab:red")
    memory.set_ylabel("index RSS (MB)")
    for ax in (latency, memory):
        ax.set_xscale("log")
        ax.set_xlabel("exemplars in the bank")
    latency.legend()
    fig.suptitle("kNN against bank size")
    return _save(fig, path)


def _batch_plot(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["batch"] for r in rows], [r["median"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("sentences/s (median)")
    ax.set_title("ONNX embedding throughput against batch size")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
