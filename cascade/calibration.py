"""`cascade calibrate`: choose every stage's bands with a statistical guarantee.

Method (docs/calibration.md has the long form):

1. The calibration split (`cascade.data.split_of`) is halved deterministically by id. On
   the *fit* half, each stage × category score gets an isotonic calibration map to the
   probability of its label (`flagged` for the flagged head, the category's own label on
   rows that annotate it).
2. A family of candidate threshold sets is built in calibrated space: cheap stages share
   one pair of levels (allow below t_a, block at t_b), the LLM stage has its own pair. The
   flagged head gets the full band; every other calibrated category only a block cut (its
   `allow_below` equals its `block_at`, so it never holds an item back). Levels become raw
   score cut-points through each map's inverse, rounded to 1e-6: the file stores raw cuts,
   exactly what is tested, and the runtime needs no calibration code.
3. Learn-then-Test (Angelopoulos, Bates, Candès, Jordan & Lei 2021) on the *test* half:
   for every candidate, the null hypothesis "block precision < P or allow-miss > M or LLM
   rate > E" gets the max of three binary Hoeffding–Bentkus p-values
   (`mapie.risk_control.ltt_procedure`, `binary=True`; precision is a conditional risk over
   the blocked items, as in MAPIE's `precision`). Family-wise error is controlled at δ by
   fixed-sequence testing (Bauer 1991) in the order learned on the fit half ("split fixed
   sequence"), so every accepted candidate meets all three targets on the population with
   probability ≥ 1 − δ, assuming calibration and live items are exchangeable.
4. Among accepted candidates the cheapest wins: fewest LLM calls, then fewest reviews.

Reported afterwards, never tuned on: the same quantities on the disjoint test split with
Clopper–Pearson intervals.

By surface (`choose_thresholds_by_surface`): the default band set is chosen on the pooled
rows and each surface with enough labelled rows gets its own set, chosen on its rows alone;
each of these m band sets is certified at δ/m (Bonferroni), so all certified sets hold at
once with probability ≥ 1 − δ. A surface without enough rows, or whose targets cannot be
certified, falls back to the default, with the reason recorded.
"""

from __future__ import annotations

import platform
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import xxhash

from cascade.assembly import adjudicator_stage
from cascade.contract import DEFAULT_BAND_SET
from cascade.data import FLAGGED
from cascade.scoring import UNKNOWN_LABEL, LabelMatrix, ScoreTable, StageScores
from cascade.simulation import ALLOW, BLOCK, ESCALATE, BandArrays, stage_decisions
from cascade.thresholds import Band, BandSet, ScoreMap, ThresholdSet

# Calibrated-probability levels tried for every stage. 0 = never allow, inf = never block.
ALLOW_LEVELS: tuple[float, ...] = (
    *(0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5),
)
BLOCK_LEVELS: tuple[float, ...] = (
    *(0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.825, 0.85, 0.875, 0.9, 0.925, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99),
    *(0.995, np.inf),
)
# A map needs this many examples of each class on the fit half, or the category stays unbanded.
MIN_CLASS_EXAMPLES = 10
CUT_DECIMALS = 6
FWER_METHOD = "split_fixed_sequence"
_FIT_HALF_SEED = 7_031_977


class CalibrationError(ValueError):
    """The data cannot support calibration (e.g. no stage produces usable scores)."""


class InfeasibleTargets(CalibrationError):
    """No candidate threshold set meets the targets with the asked confidence."""

    def __init__(self, message: str, best: Mapping[str, object]) -> None:
        super().__init__(message)
        self.best = dict(best)


@dataclass(frozen=True)
class Targets:
    block_precision: float
    max_allow_miss: float
    max_llm_rate: float
    confidence: float = 0.95

    def __post_init__(self) -> None:
        for name in ("block_precision", "max_allow_miss", "max_llm_rate"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")

    @classmethod
    def of_thresholds(cls, thresholds: ThresholdSet) -> Targets:
        """The targets a threshold file was calibrated for (to recalibrate the same way without a source)."""
        doc = thresholds.provenance.get("targets")
        try:
            return cls(doc["block_precision"], doc["max_allow_miss"], doc["max_llm_rate"], doc["confidence"])  # type: ignore[index]
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(
                f"thresholds {thresholds.version} record no calibration targets (provenance.targets)"
            ) from exc

    @property
    def delta(self) -> float:
        return 1 - self.confidence

    @property
    def alphas(self) -> np.ndarray:
        """Risk levels, in the order of the risks: wrong blocks, missed violations, LLM calls."""
        return np.array([1 - self.block_precision, self.max_allow_miss, self.max_llm_rate])


def fit_half(ids: np.ndarray) -> np.ndarray:
    """Deterministic half of the calibration split that fits maps and orders the tests."""
    return np.array(
        [xxhash.xxh64_intdigest(i.encode("utf-8", "surrogatepass"), seed=_FIT_HALF_SEED) % 2 == 0 for i in ids]
    )


@dataclass(frozen=True)
class CalibrationMap:
    """A non-decreasing piecewise-linear map raw score → probability (isotonic regression knots)."""

    x: np.ndarray
    y: np.ndarray

    @classmethod
    def fit(cls, scores: np.ndarray, labels: np.ndarray) -> CalibrationMap:
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, labels)
        return cls(np.asarray(iso.X_thresholds_, dtype=float), np.asarray(iso.y_thresholds_, dtype=float))

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return np.interp(scores, self.x, self.y)  # = the isotonic fit with out_of_bounds="clip"

    def raw_cut(self, level: float) -> float | None:
        """The smallest raw score whose calibrated value reaches `level`; None if none does.

        The map is continuous and non-decreasing, so {s : map(s) >= level} = [cut, ∞).
        """
        if level <= self.y[0]:
            return 0.0
        above = np.flatnonzero(self.y >= level)
        if above.size == 0:
            return None
        i = int(above[0])
        x0, x1, y0, y1 = self.x[i - 1], self.x[i], self.y[i - 1], self.y[i]
        return float(min(max(x0 + (level - y0) * (x1 - x0) / (y1 - y0), 0.0), 1.0))

    def score_map(self) -> ScoreMap:
        """As the threshold file stores it (rounded knots: what the runtime applies)."""
        return ScoreMap(x=[round(float(v), CUT_DECIMALS) for v in self.x], y=[round(float(v), 4) for v in self.y])

    @classmethod
    def of(cls, stored: ScoreMap) -> CalibrationMap:
        return cls(np.asarray(stored.x, dtype=float), np.asarray(stored.y, dtype=float))


Maps = dict[str, dict[str, CalibrationMap]]


def fit_maps(table: ScoreTable, labels: LabelMatrix, allowed_categories: Sequence[str] | None = None) -> Maps:
    """Per stage × category calibration maps, where both classes have enough examples."""
    maps: Maps = {}
    for stage in table.stages:
        for category in stage.categories:
            if allowed_categories is not None and category not in allowed_categories:
                continue
            scores, truth = stage.column(category), labels.column(category)
            usable = ~np.isnan(scores) & (truth != UNKNOWN_LABEL) & ~stage.error
            positives = int(truth[usable].sum())
            if min(positives, int(usable.sum()) - positives) < MIN_CLASS_EXAMPLES:
                continue
            maps.setdefault(stage.name, {})[category] = CalibrationMap.fit(scores[usable], truth[usable])
    return maps


def level_grid(
    allow_levels: Sequence[float] = ALLOW_LEVELS, block_levels: Sequence[float] = BLOCK_LEVELS
) -> np.ndarray:
    """(K, 2) pairs of (allow level, block level) with allow <= block."""
    return np.array([(a, b) for a in allow_levels for b in block_levels if a <= b], dtype=float)


def _cut(cal: CalibrationMap, level: float) -> float | None:
    if np.isinf(level):
        return None
    cut = cal.raw_cut(level)
    return None if cut is None else round(cut, CUT_DECIMALS)


@dataclass(frozen=True)
class StageFamily:
    """Candidate bands of one stage: row k of `bands` realises `levels[k]`."""

    stage: str
    levels: np.ndarray  # (K, 2)
    bands: BandArrays


def stage_family(stage: str, maps: Mapping[str, CalibrationMap], levels: np.ndarray) -> StageFamily:
    """Raw-score bands for each level pair (see the module docstring for the band shapes)."""
    categories = sorted(maps, key=lambda c: (c != FLAGGED, c))
    k, c = len(levels), len(categories)
    allow, block, banded = np.full((k, c), -np.inf), np.full((k, c), np.inf), np.ones((k, c), dtype=bool)
    full_band = {FLAGGED} if FLAGGED in maps else set(categories)
    cuts = {c: {level: _cut(maps[c], level) for level in np.unique(levels)} for c in categories}
    for row, (allow_level, block_level) in enumerate(levels):
        for j, category in enumerate(categories):
            block_cut = cuts[category][block_level]
            if block_cut is not None:
                block[row, j] = block_cut
            if category in full_band:
                allow_cut = None if allow_level <= 0 else cuts[category][allow_level]
                if allow_level > 0 and allow_cut is None:
                    allow_cut = 1.0  # every score calibrates below the level: all but a perfect 1.0 clear
                if allow_cut is not None and allow_cut > 0:
                    allow[row, j] = min(allow_cut, block[row, j])
            elif block_cut is None:
                banded[row, j] = False
            else:
                allow[row, j] = block_cut  # block-only: a score either blocks or clears this category
    return StageFamily(stage, levels, BandArrays(categories, allow, block, banded))


@dataclass
class FamilyCounts:
    """Counts for every (cheap config k1, LLM config k2) over some items."""

    n: int
    positives: int
    blocks: np.ndarray  # (K1, K2)
    false_blocks: np.ndarray  # (K1, K2)
    missed: np.ndarray  # (K1, K2) violating items auto-allowed
    reviews: np.ndarray  # (K1, K2)
    reviewed_positives: np.ndarray  # (K1, K2)
    llm_calls: np.ndarray  # (K1,)
    reached: dict[str, np.ndarray]  # cheap stage -> (K1,) items that reached it

    def risks(self) -> tuple[np.ndarray, np.ndarray]:
        """Empirical risks and effective sample sizes, (3, K1*K2) each, flattened k1-major."""
        blocks = self.blocks.ravel()
        wrong = np.divide(self.false_blocks.ravel(), blocks, out=np.ones_like(blocks), where=blocks > 0)
        missed = self.missed.ravel() / max(self.positives, 1) if self.positives else np.ones_like(blocks)
        llm = np.repeat(self.llm_calls / max(self.n, 1), self.blocks.shape[1])
        r_hat = np.stack([wrong, missed, llm])
        n_obs = np.stack([blocks, np.full_like(blocks, self.positives), np.full_like(blocks, self.n)])
        return r_hat, n_obs

    def cost_key(self) -> tuple[np.ndarray, np.ndarray]:
        """Sort keys, cheapest first: LLM calls, then reviews."""
        return np.repeat(self.llm_calls, self.blocks.shape[1]), self.reviews.ravel()


@dataclass
class Family:
    """The candidate threshold sets: cheap stages share `cheap_levels`, the adjudicator (LLM) has its own."""

    stages: list[str]
    cheap: dict[str, StageFamily]
    llm: StageFamily | None
    cheap_levels: np.ndarray
    llm_levels: np.ndarray
    maps: Maps = field(default_factory=dict)
    adjudicator: str = field(default_factory=adjudicator_stage)

    @classmethod
    def build(cls, stage_names: Sequence[str], maps: Maps, levels: np.ndarray, llm_levels: np.ndarray) -> Family:
        last = adjudicator_stage()
        if last in stage_names and stage_names.index(last) != len(stage_names) - 1:
            raise CalibrationError(f"the {last!r} stage must be last, got {list(stage_names)}")
        cheap = {s: stage_family(s, maps[s], levels) for s in stage_names if s != last and s in maps}
        llm = stage_family(last, maps[last], llm_levels) if last in maps else None
        return cls(list(stage_names), cheap, llm, levels, llm_levels if llm else np.zeros((1, 2)), maps, last)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.cheap_levels), len(self.llm_levels)

    def counts(self, table: ScoreTable, flagged: np.ndarray) -> FamilyCounts:
        n = len(table)
        k1, _ = self.shape
        pending = np.ones((k1, n), dtype=bool)
        cheap_allow, cheap_block = np.zeros((k1, n), dtype=bool), np.zeros((k1, n), dtype=bool)
        last_decisions = np.full((1, n), ESCALATE, dtype=np.int8)
        reached = {}
        for stage in table.stages:
            if stage.name == self.adjudicator:
                family = self.llm
                last_decisions = stage_decisions(stage, family.bands if family else _no_bands())
                continue
            family = self.cheap.get(stage.name)
            reached[stage.name] = pending.sum(1).astype(float)
            decided = stage_decisions(stage, family.bands if family else _no_bands())
            cheap_allow |= pending & (decided == ALLOW)
            cheap_block |= pending & (decided == BLOCK)
            pending &= decided == ESCALATE
        positive, negative = (flagged == 1), (flagged == 0)
        esc = pending.astype(float)
        llm_block, llm_allow = (last_decisions == BLOCK).T.astype(float), (last_decisions == ALLOW).T.astype(float)
        llm_review = (last_decisions == ESCALATE).T.astype(float)
        return FamilyCounts(
            n=n,
            positives=int(positive.sum()),
            blocks=cheap_block.sum(1)[:, None] + esc @ llm_block,
            false_blocks=(cheap_block & negative).sum(1)[:, None] + (esc * negative) @ llm_block,
            missed=(cheap_allow & positive).sum(1)[:, None] + (esc * positive) @ llm_allow,
            reviews=esc @ llm_review,
            reviewed_positives=(esc * positive) @ llm_review,
            llm_calls=pending.sum(1).astype(float),
            reached=reached,
        )

    def thresholds(self, index: int, version: str) -> ThresholdSet:
        """Candidate `index` (flattened k1-major) as a threshold set, every known stage listed."""
        k1, k2 = divmod(index, self.shape[1])
        stages: dict[str, dict[str, Band]] = {}
        for name in self.stages:
            family, k = (self.llm, k2) if name == self.adjudicator else (self.cheap.get(name), k1)
            bands = {}
            if family is not None:
                for category in family.bands.categories:
                    band = family.bands.band(k, category)
                    if band is not None:
                        bands[category] = band
            stages[name] = bands
        return ThresholdSet(version=version, stages=stages)

    def levels_of(self, index: int) -> dict[str, dict[str, float | None]]:
        k1, k2 = divmod(index, self.shape[1])

        def doc(pair: np.ndarray) -> dict[str, float | None]:
            allow, block = (float(v) for v in pair)
            return {"allow_below": allow or None, "block_at": None if np.isinf(block) else block}

        out = {"cheap": doc(self.cheap_levels[k1])}
        if self.llm is not None:
            out[self.adjudicator] = doc(self.llm_levels[k2])
        return out


def _no_bands() -> BandArrays:
    return BandArrays([], np.zeros((1, 0)), np.zeros((1, 0)), np.zeros((1, 0), dtype=bool))


def _hb_p_values(r_hat: np.ndarray, n_obs: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Max over the risks of MAPIE's binary Hoeffding–Bentkus p-values, per candidate."""
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value

    return np.max(
        [
            compute_hoeffding_bentkus_p_value(r, n, a, binary=True)[:, 0]
            for r, n, a in zip(r_hat, n_obs, alphas, strict=True)
        ],
        axis=0,
    )


def rows_to_certify(target: float, confidence: float, observed: float = 0.0, limit: int = 1_000_000) -> int | None:
    """The fewest observations for one binary risk ≤ `target` to be certified at `confidence`.

    Observations are blocked items for block precision (risk = 1 − P), violating items for
    allow-miss, all items for the LLM rate; `observed` is the risk rate the sample shows. This
    is the binary Hoeffding–Bentkus p-value `choose_thresholds` uses, on the test half of the
    calibration split, for one band set and one candidate: a lower bound on what a real run
    needs (more band sets or per-source strata divide δ; the fit half doubles the rows).
    None when even `limit` observations do not suffice (observed ≥ target).
    """
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value

    delta = 1 - confidence

    def certified(n: int) -> bool:
        p_value = compute_hoeffding_bentkus_p_value(np.array([observed]), np.array([n]), target, binary=True)
        return float(p_value[0, 0]) <= delta

    if not certified(limit):
        return None
    low, high = 0, limit  # certified(high); the p-value falls as n grows at a fixed observed rate
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if certified(mid) else (mid, high)
    return high


def _one_sided_bounds(counts: FamilyCounts, delta: float) -> dict[str, np.ndarray]:
    """Pointwise Clopper–Pearson bounds at level δ (for the infeasibility message only)."""
    from scipy.stats import beta

    def upper(k: np.ndarray, n: np.ndarray) -> np.ndarray:
        k, n = np.broadcast_arrays(np.asarray(k, float), np.asarray(n, float))
        out = np.ones_like(k)
        ok = (n > 0) & (k < n)
        out[ok] = beta.ppf(1 - delta, k[ok] + 1, n[ok] - k[ok])
        return out

    blocks = counts.blocks.ravel()
    return {
        "block_precision": 1 - upper(counts.false_blocks.ravel(), blocks),
        "allow_miss": upper(counts.missed.ravel(), np.full_like(blocks, counts.positives)),
        "llm_rate": upper(counts.cost_key()[0], np.full_like(blocks, counts.n)),
    }


def _strata_counts(
    family: Family, table: ScoreTable, labels: LabelMatrix, sources: Sequence[str]
) -> dict[str, FamilyCounts]:
    out = {}
    for source in sources:
        rows = np.flatnonzero(labels.sources == source)
        out[source] = family.counts(table.take(rows), labels.flagged[rows])
    return out


def _strata(fit_labels: LabelMatrix) -> list[str]:
    """Sources with enough violations and non-violations on the fit half to be certified on their own."""
    out = []
    for source in sorted(set(fit_labels.sources.tolist())):
        flagged = fit_labels.flagged[fit_labels.sources == source]
        if min(int(flagged.sum()), int((flagged == 0).sum())) >= MIN_CLASS_EXAMPLES:
            out.append(source)
    return out


def _stacked_risks(
    pooled: FamilyCounts,
    strata: Mapping[str, FamilyCounts],
    targets: Targets,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Risks, effective sizes and levels: the pooled three, then wrong blocks and misses per stratum."""
    r_hat, n_obs = pooled.risks()
    risks, sizes, alphas = [r_hat], [n_obs], [targets.alphas]
    for stratum in strata.values():
        r, n = stratum.risks()
        risks.append(r[:2])
        sizes.append(n[:2])
        alphas.append(targets.alphas[:2])
    return np.concatenate(risks), np.concatenate(sizes), np.concatenate(alphas)


def _infeasible(
    counts: FamilyCounts, targets: Targets, strata: Mapping[str, FamilyCounts] | None = None
) -> InfeasibleTargets:
    bounds = _one_sided_bounds(counts, targets.delta)
    precision, miss, llm = bounds["block_precision"], bounds["allow_miss"], bounds["llm_rate"]
    ok_p, ok_m, ok_e = precision >= targets.block_precision, miss <= targets.max_allow_miss, llm <= targets.max_llm_rate
    shortfall = np.maximum.reduce(
        [targets.block_precision - precision, miss - targets.max_allow_miss, llm - targets.max_llm_rate]
    )
    closest = int(np.argmin(shortfall))
    best: dict[str, object] = {
        "closest": {
            "block_precision": float(precision[closest]),
            "allow_miss": float(miss[closest]),
            "llm_rate": float(llm[closest]),
        },
        "block_precision_at_miss_and_llm": float(precision[ok_m & ok_e].max()) if (ok_m & ok_e).any() else None,
        "allow_miss_at_precision_and_llm": float(miss[ok_p & ok_e].min()) if (ok_p & ok_e).any() else None,
        "llm_rate_at_precision_and_miss": float(llm[ok_p & ok_m].min()) if (ok_p & ok_m).any() else None,
    }

    def show(value: object, what: str) -> str:
        return f"{value:.1%}" if isinstance(value, float) else f"no candidate ({what})"

    p, m, e = (
        show(best["block_precision_at_miss_and_llm"], "raise M or E"),
        show(best["allow_miss_at_precision_and_llm"], "lower P or raise E"),
        show(best["llm_rate_at_precision_and_miss"], "lower P or raise M"),
    )
    message = (
        f"targets infeasible at {targets.confidence:.0%} confidence (block precision >= {targets.block_precision:.1%}, "
        f"allow-miss <= {targets.max_allow_miss:.1%}, LLM rate <= {targets.max_llm_rate:.1%}). "
        f"Closest trade-off: block precision {precision[closest]:.1%}, allow-miss {miss[closest]:.1%}, "
        f"LLM rate {llm[closest]:.1%}. "
        f"Best achievable, each with the other two targets held: block precision {p}; allow-miss {m}; LLM rate {e} "
        f"(pointwise {targets.confidence:.0%} bounds on {counts.n} calibration items; "
        "the certified choice needs some margin beyond these)."
    )
    if strata:
        message += " Per source (also required):"
        for source, stratum in strata.items():
            bounds = _one_sided_bounds(stratum, targets.delta)
            message += (
                f" {source}: {stratum.positives} violations among {stratum.n}, best block precision "
                f"{bounds['block_precision'].max():.1%}, lowest allow-miss {bounds['allow_miss'].min():.1%};"
            )
        message += " with few violations per source, certifying a small miss rate needs more labelled data."
    return InfeasibleTargets(message, best)


@dataclass
class Calibrated:
    thresholds: ThresholdSet
    family: Family
    chosen: int
    accepted: int
    candidates: int
    ltt_counts: dict[str, float]
    certified_sources: list[str]

    def score_maps(self) -> dict[str, dict[str, ScoreMap]]:
        """The fitted maps as the threshold file stores them (the runtime's score scale)."""
        return _stored_maps(self.family.maps)


def _stored_maps(maps: Maps) -> dict[str, dict[str, ScoreMap]]:
    return {stage: {category: cal.score_map() for category, cal in cats.items()} for stage, cats in maps.items()}


def choose_thresholds(
    table: ScoreTable,
    labels: LabelMatrix,
    targets: Targets,
    version: str,
    allowed_categories: Sequence[str] | None = None,
    levels: np.ndarray | None = None,
    llm_levels: np.ndarray | None = None,
    fwer_method: str = FWER_METHOD,
    per_source: bool = False,
) -> Calibrated:
    """Steps 1-4 of the module docstring over the calibration split's scores.

    With `per_source`, block precision and allow-miss are certified for every source with
    enough violations on the fit half (chosen there, so the test half stays untouched), as
    well as for the pooled mix: more hypotheses in each candidate's intersection, same δ.
    """
    from mapie.risk_control._base_controller import ltt_procedure

    levels = level_grid() if levels is None else levels
    llm_levels = level_grid() if llm_levels is None else llm_levels
    fitting = fit_half(table.ids)
    if fitting.all() or not fitting.any():
        raise CalibrationError(f"{len(table)} calibration items are too few to split into fit and test halves")
    fit_idx, ltt_idx = np.flatnonzero(fitting), np.flatnonzero(~fitting)
    maps = fit_maps(table.take(fit_idx), labels.take(fit_idx), allowed_categories)
    if not maps:
        raise CalibrationError(
            f"no stage produced scores with both classes labelled (stages: {', '.join(table.stage_names)}); "
            "nothing to calibrate"
        )
    family = Family.build(table.stage_names, maps, levels, llm_levels)
    fit, ltt = table.take(fit_idx), table.take(ltt_idx)
    fit_labels, ltt_labels = labels.take(fit_idx), labels.take(ltt_idx)
    fit_counts, ltt_counts = family.counts(fit, fit_labels.flagged), family.counts(ltt, ltt_labels.flagged)
    sources = _strata(fit_labels) if per_source else []
    fit_strata = _strata_counts(family, fit, fit_labels, sources)
    ltt_strata = _strata_counts(family, ltt, ltt_labels, sources)
    r_fit, n_fit, alphas = _stacked_risks(fit_counts, fit_strata, targets)
    r_ltt, n_ltt, _ = _stacked_risks(ltt_counts, ltt_strata, targets)

    llm_fit, review_fit = fit_counts.cost_key()
    order = np.lexsort((review_fit, llm_fit, _hb_p_values(r_fit, n_fit, alphas)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MAPIE warns when nothing is valid; we raise our own
        valid, _ = ltt_procedure(
            r_ltt[:, order], alphas[:, None], targets.delta, n_ltt[:, order], binary=True, fwer_method=fwer_method
        )
    accepted = order[np.asarray(valid[0], dtype=int)]
    if accepted.size == 0:
        raise _infeasible(ltt_counts, targets, ltt_strata)
    llm_all = fit_counts.cost_key()[0] + ltt_counts.cost_key()[0]
    review_all = fit_counts.cost_key()[1] + ltt_counts.cost_key()[1]
    best = accepted[np.lexsort((review_all[accepted], llm_all[accepted]))[0]]
    r_best = r_ltt[:, best]
    return Calibrated(
        thresholds=family.thresholds(int(best), version),
        family=family,
        chosen=int(best),
        accepted=int(accepted.size),
        candidates=int(r_ltt.shape[1]),
        ltt_counts={
            "n": ltt_counts.n,
            "block_precision": float(1 - r_best[0]),
            "allow_miss": float(r_best[1]),
            "llm_rate": float(r_best[2]),
        },
        certified_sources=sources,
    )


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("cascade", "numpy", "scipy", "scikit-learn", "mapie"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    return out


def with_provenance(
    calibrated: Calibrated,
    stages: Sequence[StageScores],
    targets: Targets,
    data: Sequence[Mapping[str, object]],
    split_sizes: Mapping[str, int],
    achieved_test: Mapping[str, object],
    command: str,
) -> ThresholdSet:
    """The chosen set with everything an auditor needs to trust or reproduce it."""
    created = datetime.now(UTC).replace(microsecond=0)
    family = calibrated.family
    provenance = {
        "method": "isotonic maps + Learn-then-Test (binary Hoeffding-Bentkus p-values, split fixed-sequence FWER)",
        "command": command,
        "data": [dict(d) for d in data],
        "splits": dict(split_sizes),
        "targets": {
            "block_precision": targets.block_precision,
            "max_allow_miss": targets.max_allow_miss,
            "max_llm_rate": targets.max_llm_rate,
            "confidence": targets.confidence,
            "also_per_source": calibrated.certified_sources,
        },
        "stages": [{"name": s.name, "version": s.version} for s in stages],
        "candidates": calibrated.candidates,
        "accepted": calibrated.accepted,
        "chosen_levels": family.levels_of(calibrated.chosen),
        "achieved": {"calibration_ltt_half": calibrated.ltt_counts, "test": dict(achieved_test)},
        "libraries": library_versions(),
    }
    return ThresholdSet(
        version=calibrated.thresholds.version,
        created_at=created.isoformat().replace("+00:00", "Z"),
        description=(
            f"Calibrated: block precision >= {targets.block_precision:g}, allow-miss <= {targets.max_allow_miss:g}, "
            f"LLM rate <= {targets.max_llm_rate:g} at {targets.confidence:g} confidence."
        ),
        provenance=provenance,
        stages=calibrated.thresholds.stages,
        score_maps=calibrated.score_maps(),
    )


# A surface is calibrated alone only with this many rows of each class on the fit half.
MIN_SURFACE_CLASS_EXAMPLES = MIN_CLASS_EXAMPLES


@dataclass
class CalibratedBySurface:
    """A default band set on the pooled rows and one per surface that could be certified alone."""

    default: Calibrated
    surfaces: dict[str, Calibrated]
    fallbacks: dict[str, str]  # surface -> why it is judged by the default set
    rows: dict[str, int]  # surface -> calibration rows
    band_sets_tested: int  # m: the default plus every surface tried
    band_set_confidence: float  # 1 - δ/m: the level each band set is certified at
    escalate_fallbacks: bool = False  # uncertified surfaces settle nothing by score instead of using the default
    fallback_maps: dict[str, Maps] = field(default_factory=dict)  # uncertified surface -> maps on its own rows

    def decision_set(self, version: str) -> ThresholdSet:
        """The band sets alone (no provenance): what the runtime would do with these choices."""
        return ThresholdSet(
            version=version,
            stages=self.default.thresholds.stages,
            score_maps=self.default.score_maps(),
            surfaces={
                surface: BandSet(stages=calibrated.thresholds.stages, score_maps=calibrated.score_maps())
                for surface, calibrated in self.surfaces.items()
            }
            | (
                # No band at any stage: only definitive matches decide, the rest goes to the LLM or review.
                {
                    surface: BandSet(
                        stages={stage: {} for stage in self.default.family.stages},
                        score_maps=_stored_maps(self.fallback_maps.get(surface, {})),
                    )
                    for surface in self.fallbacks
                }
                if self.escalate_fallbacks
                else {}
            ),
        )


def _surface_shortfall(fit_labels: LabelMatrix, surface: str) -> str | None:
    """Why a surface has too few labelled rows to be certified alone (on the fit half), or None."""
    flagged = fit_labels.flagged[fit_labels.surfaces == surface]
    positives, negatives = int(flagged.sum()), int((flagged == 0).sum())
    if min(positives, negatives) >= MIN_SURFACE_CLASS_EXAMPLES:
        return None
    return (
        f"too few labelled rows: {positives} violations and {negatives} non-violations on the fit half "
        f"of the calibration split, needs >= {MIN_SURFACE_CLASS_EXAMPLES} of each"
    )


def choose_thresholds_by_surface(
    table: ScoreTable,
    labels: LabelMatrix,
    targets: Targets,
    version: str,
    allowed_categories: Sequence[str] | None = None,
    per_source: bool = False,
    escalate_fallbacks: bool = False,
) -> CalibratedBySurface:
    """`choose_thresholds` on the pooled rows (the default set) and on each surface's rows alone.

    Which surfaces are tried depends on the fit half only, so the Bonferroni count m (the
    default plus every surface tried, certified or not) is fixed before the test half is
    looked at; each set is then certified at δ/m. With `escalate_fallbacks`, a labelled
    surface that cannot be certified gets a set with no bands instead of the default: nothing
    is decided for it by score (no uncertified automatic block or allow).
    """
    fitting = fit_half(table.ids)
    fit_labels = labels.take(np.flatnonzero(fitting))
    named = sorted({s for s in labels.surfaces.tolist() if s is not None})
    shortfalls = {surface: _surface_shortfall(fit_labels, surface) for surface in named}
    tried = [surface for surface, why in shortfalls.items() if why is None]
    per_set = Targets(
        targets.block_precision,
        targets.max_allow_miss,
        targets.max_llm_rate,
        1 - targets.delta / (1 + len(tried)),
    )
    default = choose_thresholds(table, labels, per_set, version, allowed_categories, per_source=per_source)
    surfaces: dict[str, Calibrated] = {}
    fallbacks = {surface: why for surface, why in shortfalls.items() if why is not None}
    for surface in tried:
        rows = np.flatnonzero(labels.surfaces == surface)
        try:
            surfaces[surface] = choose_thresholds(
                table.take(rows), labels.take(rows), per_set, version, allowed_categories, per_source=per_source
            )
        except InfeasibleTargets as exc:
            needed = rows_to_certify(1 - targets.block_precision, per_set.confidence)
            fallbacks[surface] = (
                f"targets infeasible on its {rows.size} rows (block precision >= {targets.block_precision:g} "
                f"alone needs >= {needed} blocked items, all right, on the test half): {exc}"
            )
        except CalibrationError as exc:
            fallbacks[surface] = f"cannot be calibrated alone: {exc}"
    # An uncertified surface still gets score maps of its own (far fewer rows than a certificate):
    # its verdicts' scores then say what a violation means on it, not on the pooled mix.
    fallback_maps = {}
    for surface in fallbacks:
        rows = np.flatnonzero((labels.surfaces == surface) & fitting)
        fallback_maps[surface] = fit_maps(table.take(rows), labels.take(rows), allowed_categories)
    return CalibratedBySurface(
        default=default,
        surfaces=surfaces,
        fallbacks=fallbacks,
        rows={surface: int((labels.surfaces == surface).sum()) for surface in named},
        band_sets_tested=1 + len(tried),
        band_set_confidence=per_set.confidence,
        escalate_fallbacks=escalate_fallbacks,
        fallback_maps=fallback_maps,
    )


def with_surfaces(
    thresholds: ThresholdSet,
    by_surface: CalibratedBySurface,
    achieved_test: Mapping[str, Mapping[str, object]],
) -> ThresholdSet:
    """`thresholds` (the default set, with provenance) plus the certified surface sets and the fallbacks.

    `achieved_test`: the test-split figures of each band set on the items it judged.
    """
    decided = by_surface.decision_set(thresholds.version).surfaces
    surfaces = {
        surface: decided[surface].model_copy(
            update={
                "provenance": {
                    "calibration_rows": by_surface.rows[surface],
                    "chosen_levels": calibrated.family.levels_of(calibrated.chosen),
                    "accepted": calibrated.accepted,
                    "achieved": {
                        "calibration_ltt_half": calibrated.ltt_counts,
                        "test": dict(achieved_test.get(surface, {})),
                    },
                }
            }
        )
        for surface, calibrated in by_surface.surfaces.items()
    }
    for surface, reason in by_surface.fallbacks.items():
        if surface in decided:  # an escalating set (escalate_fallbacks)
            surfaces[surface] = decided[surface].model_copy(
                update={
                    "provenance": {
                        "calibration_rows": by_surface.rows[surface],
                        "certified": False,
                        "settles_by_score": False,
                        "reason": reason,
                        "achieved": {"test": dict(achieved_test.get(surface, {}))},
                    }
                }
            )
    provenance = dict(thresholds.provenance)
    provenance["by_surface"] = {
        "correction": "Bonferroni over band sets: each certified at delta / m, all hold at once with 1 - delta",
        "band_sets_tested": by_surface.band_sets_tested,
        "band_set_confidence": by_surface.band_set_confidence,
        "certified": sorted(by_surface.surfaces),
        "fallback": "escalate (no bands)" if by_surface.escalate_fallbacks else "default band set",
        "not_certified": dict(sorted(by_surface.fallbacks.items())),
        "default_test": dict(achieved_test.get(DEFAULT_BAND_SET, {})),
    }
    return thresholds.model_copy(update={"surfaces": surfaces, "provenance": provenance})


def hand_set_bands(
    specs: Sequence[str], stages: Sequence[str], categories: Iterable[str]
) -> dict[str, dict[str, Band]]:
    """`STAGE.CATEGORY=ALLOW_BELOW:BLOCK_AT` specs (an empty edge is null) as bands by stage and category.

    A CalibrationError names the first bad spec and what is wrong with it.
    """
    known = set(categories)
    out: dict[str, dict[str, Band]] = {}
    for spec in specs:
        try:
            target, edges = spec.split("=", 1)
            stage, category = target.split(".", 1)
            allow, block = edges.split(":", 1)
            band = Band(allow_below=float(allow) if allow else None, block_at=float(block) if block else None)
        except ValueError as exc:
            raise CalibrationError(
                f"{spec!r}: expected STAGE.CATEGORY=ALLOW_BELOW:BLOCK_AT with edges in [0, 1], "
                "allow <= block (e.g. llm.flagged=0.5:0.5)"
            ) from exc
        if stage not in stages or category not in known:
            raise CalibrationError(
                f"{spec!r}: unknown stage or category (stages: {', '.join(stages)}; "
                f"categories: {', '.join(sorted(known))})"
            )
        out.setdefault(stage, {})[category] = band
    return out


def with_hand_set_bands(thresholds: ThresholdSet, hand_set: Mapping[str, Mapping[str, Band]]) -> ThresholdSet:
    """Fill the bands of stages calibration could not score (e.g. no LLM reachable) in every band set.

    Only a stage that got no band at all is filled; calibrated bands are never overridden. The
    file records what was hand-set, so nobody mistakes it for a certified band.
    """
    filled: dict[str, dict[str, dict[str, float | None]]] = {}

    def fill(stages: Mapping[str, Mapping[str, Band]]) -> dict[str, dict[str, Band]]:
        out = {stage: dict(bands) for stage, bands in stages.items()}
        for stage, bands in hand_set.items():
            if not out.get(stage):
                out[stage] = dict(bands)
                filled[stage] = {c: b.model_dump() for c, b in bands.items()}
        return out

    # Escalating sets too: their items still reach the hand-set stage (the LLM), which then decides.
    surfaces = {
        name: band_set.model_copy(update={"stages": fill(band_set.stages)})
        for name, band_set in thresholds.surfaces.items()
    }
    stages = fill(thresholds.stages)
    provenance = dict(thresholds.provenance)
    if filled:
        provenance["hand_set_bands"] = {
            "bands": filled,
            "why": "not calibrated: the stage produced no usable scores at calibration time (e.g. no LLM reachable); "
            "recalibrate with it available to replace these",
        }
    return thresholds.model_copy(update={"stages": stages, "surfaces": surfaces, "provenance": provenance})
