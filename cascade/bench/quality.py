"""Quality and cost on the held-out test split: the cascade, its stages alone, a peer, all-LLM.

Stage scores come from the calibration engineer's score cache (`cascade.scoring`), the
cascade's decisions from the offline replay (`cascade.simulation.simulate`, held to exact
agreement with `CascadeRunner`), and relative cost from `cascade.evaluation.CostModel.of_stages()`
(what each stage class declares).

- Only cheap stages run. The LLM's quality cannot be measured here (no real LLM is
  reachable), so items the cascade would send to it are *unresolved*: the headline F1 counts
  them as not blocked (`review_as_allow`). Two more views are given: the auto-decided items
  alone (with their coverage), and an upper bound where every escalated item is judged right.
- Single scorers (a stage alone, the peer) block at the score that maximises F1 on the
  calibration split, then are measured on the test split: nothing is tuned on reported rows.
- AUPRC is over every test item; an item a system gave no score counts as score 0.
- `alt-profanity-check` was probably trained partly on Davidson et al., so figures are also
  given per source and for every source but Davidson.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cascade.assembly import adjudicator_stage, build_stages
from cascade.bench.config import BenchConfig
from cascade.bench.measure import Row, not_available
from cascade.bench.stages import BenchStages
from cascade.contract import ContentItem
from cascade.data import FLAGGED, LabelledItem, Split, split_of
from cascade.evaluation import CostModel, build_report, prf
from cascade.llm.pricing import cost_usd, price_table
from cascade.pipeline import new_context
from cascade.policy import load_policy
from cascade.scoring import LabelMatrix, ScoreTable, admit, cache_key, cached_scores
from cascade.settings import Settings
from cascade.simulation import BLOCK, simulate
from cascade.thresholds import ThresholdSet

DAVIDSON = "davidson2017"
PEER = "alt-profanity-check"
SINGLE_STAGES = ("retrieval", "classifier")
# Reply size of one adjudication (docs/llm.md: ≈ 180 tokens); prompts are ~4 characters per token.
LLM_OUTPUT_TOKENS = 180
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Curves:
    """Test-split flagged scores per system, for the precision-recall plot."""

    positive: np.ndarray
    scores: dict[str, np.ndarray]


def sample(rows: Sequence[LabelledItem], n: int | None, seed: int) -> list[LabelledItem]:
    """`n` rows drawn at random (in file order), or all of them."""
    if n is None or n >= len(rows):
        return list(rows)
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in picked]


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float | None:
    from sklearn.metrics import average_precision_score

    if positive.all() or not positive.any():
        return None
    return float(average_precision_score(positive, np.nan_to_num(scores, nan=0.0)))


def best_f1_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    """The score at or above which blocking maximises F1 on these (calibration) rows; 0.5 without both classes."""
    from sklearn.metrics import precision_recall_curve

    if positive.all() or not positive.any():
        return 0.5
    precision, recall, cuts = precision_recall_curve(positive, np.nan_to_num(scores, nan=0.0))
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=precision + recall > 0
    )
    return float(cuts[int(np.argmax(f1[:-1]))])


def _groups(sources: np.ndarray) -> dict[str, np.ndarray]:
    groups = {str(s): sources == s for s in sorted(set(sources.tolist()))}
    if DAVIDSON in groups and len(groups) > 1:
        groups[f"all but {DAVIDSON}"] = sources != DAVIDSON
    return groups


def _scorer_metrics(scores: np.ndarray, positive: np.ndarray, threshold: float) -> dict[str, float | None]:
    blocked = np.nan_to_num(scores, nan=-np.inf) >= threshold
    return {"auprc": average_precision(scores, positive), **prf(blocked, positive)}


def _decision_metrics(decision: np.ndarray, positive: np.ndarray, score: np.ndarray) -> dict[str, float | None]:
    return {"auprc": average_precision(score, positive), **prf(decision == BLOCK, positive)}


async def _scores(
    stages: BenchStages,
    rows: Sequence[LabelledItem],
    split: Split,
    sampled: bool,
    config: BenchConfig,
    settings: Settings,
    digests: Sequence[dict[str, object]],
) -> tuple[ScoreTable, list[LabelledItem], list[ContentItem], str]:
    """Scores, the rows and items that passed intake, and where the scores came from."""
    kept, items, _ = admit(rows, settings)
    if not sampled and not config.refresh_scores:
        table = await _calibrate_cache(stages, items, split, settings, digests)
        if table is not None:
            return table, kept, items, "score cache of `cascade calibrate`"
    # A whole split shares the cache with `cascade calibrate --stages` over the same stages; a sample has its own key.
    name = f"{split.value}-sample{len(rows)}-seed{config.seed}" if sampled else split.value
    key = cache_key(digests, name, stages.stages)
    table, cached = await cached_scores(stages.stages, items, settings, key, config.refresh_scores)
    return table, kept, items, "score cache" if cached else "scored in this run"


async def _calibrate_cache(
    stages: BenchStages,
    items: Sequence[ContentItem],
    split: Split,
    settings: Settings,
    digests: Sequence[dict[str, object]],
) -> ScoreTable | None:
    """The table a default `cascade calibrate` cached (the cheap stages + the LLM stage), LLM column dropped.

    Its cheap-stage scores are the same (same stage versions in the key); the bench never
    uses the LLM stage's, which were collected without an LLM.
    """
    try:
        (llm,) = build_stages(settings, [adjudicator_stage()])
    except Exception:  # no LLM stage can be built: there is no such cache either
        return None
    try:
        key = cache_key(digests, split.value, [*stages.stages, llm])
    finally:
        await llm.aclose()
    path = settings.data_dir / "scores" / f"{key}.npz"
    if not path.is_file():
        return None
    table = ScoreTable.load(path)
    if table.ids.tolist() != [item.id for item in items]:
        return None
    return ScoreTable(table.ids, [s for s in table.stages if s.name != llm.name])


def _peer() -> Callable[[list[str]], np.ndarray] | str:
    try:
        from profanity_check import predict_prob
    except Exception as exc:  # a dev-only package; the bench must still run without it
        return f"{PEER} not importable: {type(exc).__name__}: {exc}"
    return lambda texts: np.asarray(predict_prob(texts), dtype=float)


def llm_usd_per_item(settings: Settings, items: Sequence[ContentItem]) -> np.ndarray | str:
    """Modelled dollars of one uncached adjudication per item: prompt size / 4 chars per token, 180 tokens out.

    Few-shot examples are left out (up to `llm_few_shot_k` × 600 characters more), so this
    is a floor on the prompt side.
    """
    from cascade.llm.prompt import PromptBuilder

    price = price_table(settings.llm_prices).get(settings.llm_model)
    if price is None:
        return f"no price for llm model {settings.llm_model} (set llm_prices)"
    policy = load_policy(settings.policies_dir)
    prompt = PromptBuilder.from_policy_dir(
        settings.policies_dir, policy, settings.llm_few_shot_k, settings.llm_max_text_chars
    )
    chars = [sum(len(m["content"]) for m in prompt.messages(new_context(item), [])) for item in items]
    return np.array([cost_usd(price, c // CHARS_PER_TOKEN, LLM_OUTPUT_TOKENS) for c in chars])


async def measure_quality(
    config: BenchConfig,
    settings: Settings,
    stages: BenchStages,
    rows: Sequence[LabelledItem],
    digests: Sequence[dict[str, object]],
    thresholds: ThresholdSet,
    log: Callable[[str], None],
) -> tuple[dict[str, object], Curves | None]:
    """The quality report, and the test-split scores per system for the PR plot."""
    if not stages.stages:
        reason = "no cheap stage is available: " + "; ".join(f"{k}: {v}" for k, v in stages.missing.items())
        return {"available": False, "reason": reason}, None
    by_split = {}
    for split in (Split.TEST, Split.CALIBRATION):
        part = [r for r in rows if split_of(r.id) is split]
        chosen = sample(part, config.quality_items, config.seed)
        log(f"quality: scoring {len(chosen)} {split.value} items ({', '.join(stages.names)}; cached when possible)")
        by_split[split] = await _scores(stages, chosen, split, len(chosen) < len(part), config, settings, digests)
    (test, test_rows, test_items, _), (cal, cal_rows, _, _) = by_split[Split.TEST], by_split[Split.CALIBRATION]
    labels = LabelMatrix.of(test_rows)
    positive = labels.flagged == 1
    cal_positive = LabelMatrix.of(cal_rows).flagged == 1
    sources = np.array([r.source for r in test_rows])
    groups = _groups(sources)

    outcome = simulate(test, thresholds)
    cost_model = CostModel.of_stages()
    report = build_report(outcome, labels, cost_model=cost_model)
    final = outcome.final_scores[FLAGGED]

    systems: dict[str, Row] = {}
    per_source: dict[str, dict[str, dict[str, float | None]]] = {}
    usd = llm_usd_per_item(settings, test_items)
    n = len(test_rows)
    llm_rate = float(outcome.llm_calls.mean()) if n else None
    cascade_usd = None if isinstance(usd, str) else float(usd[outcome.llm_calls].sum() / n * 1000)
    systems["cascade"] = {
        "label": f"cascade ({'+'.join(stages.names)})",
        "available": True,
        "note": "review_as_allow: items escalated past the cheap stages (LLM-bound) count as not blocked",
        **_decision_metrics(outcome.decision, positive, final),
        "auto_coverage": report["auto"]["coverage"],
        "llm_rate": llm_rate,
        "cost_relative_to_all_llm": cost_model.relative_to_all_llm(outcome),
        "usd_per_1k_items": cascade_usd,
    }
    per_source["cascade"] = {
        g: _decision_metrics(outcome.decision[m], positive[m], final[m]) for g, m in groups.items()
    }

    single: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in SINGLE_STAGES:
        if name in test.stage_names:
            single[name] = (_flagged(test, name), _flagged(cal, name))
        else:
            systems[f"{name}_only"] = not_available(f"{name} alone", stages.missing.get(name, "not in the run"))
    peer = _peer()
    if isinstance(peer, str):
        systems["peer"] = not_available(PEER, peer)
    else:
        single[PEER] = (peer([r.text for r in test_rows]), peer([r.text for r in cal_rows]))
    for name, (scores, cal_scores) in single.items():
        key = "peer" if name == PEER else f"{name}_only"
        threshold = best_f1_threshold(cal_scores, cal_positive)
        relative = None if name == PEER else cost_model.of(name) / cost_model.of(cost_model.adjudicator)
        systems[key] = {
            "label": PEER if name == PEER else f"{name} alone",
            "available": True,
            "note": "blocks at the score that maximises F1 on the calibration split",
            "threshold": threshold,
            **_scorer_metrics(scores, positive, threshold),
            "scored": float((~np.isnan(scores)).mean()) if n else None,
            "llm_rate": 0.0,
            "cost_relative_to_all_llm": relative,
            "usd_per_1k_items": 0.0,
        }
        per_source[key] = {g: _scorer_metrics(scores[m], positive[m], threshold) for g, m in groups.items()}
    systems["all_llm"] = {
        "label": "all-LLM (modelled)",
        "note": "every item adjudicated by the LLM",
        "available": True,
        "quality": "not measurable here: no real LLM is reachable",
        "llm_rate": 1.0,
        "cost_relative_to_all_llm": 1.0,
        "usd_per_1k_items": None if isinstance(usd, str) else float(usd.mean() * 1000),
    }
    curves = Curves(positive, {"cascade": final, **{name: scores for name, (scores, _) in single.items()}})
    return {
        "available": True,
        "split": "test",
        "n": n,
        "positives": int(positive.sum()),
        "calibration_n": len(cal_rows),
        "sampled": config.quality_items is not None,
        "scores_from": {split.value: origin for split, (*_, origin) in by_split.items()},
        "thresholds_version": thresholds.version,
        "stages": stages.names,
        "stages_missing": stages.missing,
        "systems": systems,
        "cascade_views": {view: report[view] for view in ("review_as_allow", "auto", "review_as_human")},
        "decisions": report["decisions"],
        "decided_by": report["decided_by"],
        "escalation": report["stages"],
        "llm_rate": llm_rate,
        "per_source": {
            "groups": {g: {"n": int(m.sum()), "positives": int(positive[m].sum())} for g, m in groups.items()},
            "systems": per_source,
        },
        "cost_model": {
            "relative": dict(cost_model.per_stage),
            "llm_model": settings.llm_model,
            "usd": usd
            if isinstance(usd, str)
            else "uncached prompt (no few-shot examples) / 4 chars per token, "
            f"{LLM_OUTPUT_TOKENS} output tokens, list price of the configured model",
        },
        "llm_quality": "not measured: no real LLM is reachable here; the LLM stage is reported as call rate and cost",
    }, curves


def _flagged(table: ScoreTable, stage: str) -> np.ndarray:
    scores = table.stages[table.stage_names.index(stage)]
    column = scores.column(FLAGGED).copy()
    column[scores.error] = np.nan
    return column
