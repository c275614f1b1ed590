"""`cascade bank ...`: manage the banks under the data directory.

Each command parses its flags, calls the domain (`cascade.hashbank`, `cascade.bankimport`,
`cascade.banktopic`, `cascade.exemplars`) and prints; with a broker configured, hash-bank
changes go through the shared banks topic.
"""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cascade.bankimport import DEFAULT_SPLIT, BankKind, ImportJob, ImportReport, import_file
from cascade.banktopic import BankTopic, change_shared
from cascade.bankversion import bump_bank_version
from cascade.cli.app import bank_app, fail
from cascade.data import SplitChoice
from cascade.hashbank import BankError, EntryInput, HashBank, Polarity, derived_entry_id
from cascade.policy import load_policy
from cascade.settings import Settings
from cascade.stream.security import KafkaSecurityError

console = Console()
err_console = Console(stderr=True)

_SHOWN_ERRORS = 20
_SHOWN_QUARANTINES = 20
T = TypeVar("T")


def render_report(report: ImportReport, kind: BankKind) -> None:
    table = Table(title=f"bank import ({kind.value})")
    table.add_column("outcome")
    table.add_column("lines", justify="right")
    for label, count in (
        ("added", report.added),
        ("updated", report.updated),
        ("skipped (unchanged)", report.skipped),
        ("filtered (other split)", report.filtered),
        ("errors", len(report.errors)),
    ):
        table.add_row(label, str(count))
    console.print(table)
    for message in report.errors[:_SHOWN_ERRORS]:
        err_console.print(f"[red]{message}[/]")
    if len(report.errors) > _SHOWN_ERRORS:
        err_console.print(f"[red]... and {len(report.errors) - _SHOWN_ERRORS} more errors[/]")
    if report.unknown_categories:
        unknown = ", ".join(sorted(report.unknown_categories))
        err_console.print(f"[yellow]categories not in the policy (kept, reported): {unknown}[/]")


def file_progress(progress: Progress, path: Path) -> Callable[[int], None]:
    """A progress bar over `path`'s bytes; the returned callback advances it (`read_jsonl`'s `on_read`)."""
    task = progress.add_task(path.name, total=path.stat().st_size)
    return lambda size: progress.advance(task, size)


def import_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


def _operator() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in some containers
        return "operator"


def _open_bank(settings: Settings) -> HashBank:
    return HashBank.open(settings.data_dir, settings.near_dup_threshold)


def _shared_topic(settings: Settings) -> BankTopic | None:
    """The banks topic every replica follows, when a broker is configured (CASCADE_KAFKA_URL)."""
    try:
        return BankTopic.of_settings(settings)
    except KafkaSecurityError as exc:
        raise fail(str(exc)) from None


def _unreachable(settings: Settings, exc: KafkaError) -> typer.Exit:
    return fail(f"cannot reach the banks topic on {settings.kafka_url}: {type(exc).__name__}: {exc}")


def _change(settings: Settings, bank: HashBank, entry_id: str, change: Callable[[], T]) -> T:
    topic = _shared_topic(settings)
    try:
        return asyncio.run(change_shared(bank, topic, [entry_id], change))
    except KafkaError as exc:
        raise _unreachable(settings, exc) from None


@bank_app.command("add")
def add(
    text: Annotated[str, typer.Argument(help="The text to bank (stored as given; matched normalised).")],
    bad: Annotated[bool, typer.Option("--bad/--good", help="Known-bad (blocks) or known-good (clears).")],
    category: Annotated[
        list[str] | None, typer.Option("--category", "-c", help="Policy category of a bad entry (repeatable).")
    ] = None,
    entry_id: Annotated[
        str | None, typer.Option("--id", help="Entry id; default: derived from polarity and text.")
    ] = None,
    source: Annotated[str, typer.Option(help="Where the entry comes from (e.g. a ticket).")] = "cli",
) -> None:
    """Add one entry (or update the entry with this id)."""
    settings = Settings()
    categories = tuple(category or ())
    if not bad and categories:
        raise fail("--category applies to --bad entries only")
    known = load_policy(settings.policies_dir).names
    unknown = sorted(set(categories) - known)
    if unknown:
        raise fail(f"unknown categories {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    polarity = Polarity.BAD if bad else Polarity.GOOD
    bank = _open_bank(settings)
    try:
        # An operator typed this one entry: it is confirmed, so no flood of copies can quarantine it.
        entry = EntryInput(
            entry_id or derived_entry_id(polarity, text), text, polarity, categories, source, confirmed=True
        )
        report = _change(settings, bank, entry.id, lambda: bank.upsert([entry], _operator()))
    except BankError as exc:
        raise fail(str(exc)) from None
    finally:
        bank.close()
    outcome = "added" if report.added else "updated" if report.updated else "unchanged"
    console.print(f"{outcome}: {entry.id} ({polarity.value})")


@bank_app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="JSONL: labelled data (flagged/labels) or bank entries (polarity).")],
    kind: Annotated[BankKind, typer.Option(help="Which bank the file feeds.")] = BankKind.HASH,
    split: Annotated[
        SplitChoice | None,
        typer.Option(help="Only rows of this deterministic split. Default: all for hash, train for exemplars."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per transaction.")] = 1000,
    confirm: Annotated[
        bool,
        typer.Option("--confirm", help="Hash bank: vouch for the entries (the flood guard never quarantines them)."),
    ] = False,
) -> None:
    """Import entries, idempotent by id: re-importing a file adds nothing."""
    if not file.is_file():
        raise fail(f"input file not found: {file}")
    if confirm and kind is not BankKind.HASH:
        raise fail("--confirm applies to the hash bank only (--kind hash)")
    from cascade.vectorindex import StoreInUseError

    settings = Settings()
    with import_progress() as progress:
        job = ImportJob(
            file, split or DEFAULT_SPLIT[kind], batch_size, _operator(), confirm, file_progress(progress, file)
        )
        try:
            report = import_file(kind, job, settings, _shared_topic(settings))
        except StoreInUseError as exc:
            raise fail(str(exc)) from None
        except KafkaError as exc:
            raise _unreachable(settings, exc) from None
    render_report(report, kind)
    if not report.imported:
        raise fail(
            f"nothing imported from {file}: {len(report.errors)} line(s) failed, {report.filtered} in another split;"
            " fix the file or choose --split"
        )


@bank_app.command("remove")
def remove(entry_id: Annotated[str, typer.Argument(help="Entry id.")]) -> None:
    """Remove an entry: it stops matching in every process at their next batch."""
    settings = Settings()
    bank = _open_bank(settings)
    try:
        if not _change(settings, bank, entry_id, lambda: bank.remove(entry_id)):
            raise fail(f"no bank entry with id {entry_id!r}")
    finally:
        bank.close()
    console.print(f"removed: {entry_id}")


@bank_app.command("confirm")
def confirm(entry_id: Annotated[str, typer.Argument(help="Entry id.")]) -> None:
    """Vouch for an entry: lift its quarantine; the flood guard will not quarantine it again."""
    settings = Settings()
    bank = _open_bank(settings)
    try:
        # Read inside the change: with a shared topic the entry is known only after the replay.
        entry = _change(settings, bank, entry_id, lambda: (bank.get(entry_id), bank.confirm(entry_id))[0])
        if entry is None:
            raise fail(f"no bank entry with id {entry_id!r}")
    finally:
        bank.close()
    was = "was quarantined" if entry.quarantined else "was not quarantined"
    console.print(f"confirmed: {entry_id} ({was})")


@bank_app.command("list")
def list_(
    quarantined: Annotated[bool, typer.Option("--quarantined", help="Only quarantined entries.")] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 50,
) -> None:
    """List entries."""
    bank = _open_bank(Settings())
    try:
        entries = bank.entries(quarantined_only=quarantined, limit=limit)
    finally:
        bank.close()
    table = Table(title=f"bank entries ({len(entries)} shown)")
    for column in ("id", "polarity", "categories", "status", "added", "text"):
        table.add_column(column, overflow="fold" if column == "text" else "ellipsis")
    for entry in entries:
        status = "quarantined" if entry.quarantined else "confirmed" if entry.confirmed else ""
        text = entry.original if len(entry.original) <= 80 else entry.original[:79] + "…"
        table.add_row(entry.id, entry.polarity.value, ", ".join(entry.categories), status, entry.added_at[:10], text)
    console.print(table)


@bank_app.command("stats")
def stats() -> None:
    """Counts by polarity, category and status."""
    bank = _open_bank(Settings())
    try:
        counts = bank.stats()
        quarantined = bank.entries(quarantined_only=True, limit=_SHOWN_QUARANTINES)
    finally:
        bank.close()
    table = Table(title="bank stats")
    table.add_column("what")
    table.add_column("value")
    table.add_column("entries", justify="right")
    for polarity, n in counts.by_polarity.items():
        table.add_row("polarity", polarity, str(n))
    for category, n in counts.by_category.items():
        table.add_row("category (bad)", category, str(n))
    table.add_row("status", "quarantined", str(counts.quarantined))
    table.add_row("status", "confirmed", str(counts.confirmed))
    table.add_row("status", "removed (tombstones)", str(counts.removed))
    console.print(table)
    for entry in quarantined:
        until = f"until {entry.quarantined_until}" if entry.quarantined_until else "until confirmed"
        console.print(f"quarantined {escape(entry.id)} {until}: {escape(entry.quarantine_reason or '')}")
    _exemplar_stats(Settings())


def _exemplar_stats(settings: Settings) -> None:
    from cascade.vectorindex import StoreInUseError, open_vector_index

    try:
        index = open_vector_index(settings)
    except StoreInUseError as exc:
        err_console.print(f"[yellow]exemplar bank: {exc}[/]")
        return
    try:
        counts = index.category_counts()
        identity = index.identity
    finally:
        index.close()
    table = Table(title=f"exemplar bank ({identity})")
    table.add_column("category")
    table.add_column("labelled", justify="right")
    table.add_column("violating", justify="right")
    for category, count in counts.items():
        table.add_row(category, str(count.known), str(count.violating))
    console.print(table)


@bank_app.command("seed")
def seed() -> None:
    """Load the policy seed exemplars (cascade/policies/seeds/*.yaml) into the exemplar bank, replacing older seeds."""
    from cascade.embedding import Embedder
    from cascade.exemplars import seed_policy_exemplars
    from cascade.vectorindex import StoreInUseError, open_vector_index

    settings = Settings()
    try:
        index = open_vector_index(settings)
    except StoreInUseError as exc:
        raise fail(str(exc)) from None
    try:
        total = seed_policy_exemplars(index, Embedder.from_settings(settings), settings.policies_dir, _operator())
        bump_bank_version(settings.data_dir)
    finally:
        index.close()
    console.print(f"seeded {total} policy exemplars from {settings.policies_dir / 'seeds'}")


@bank_app.command("reindex")
def reindex() -> None:
    """Re-embed the exemplars another encoder embedded, with the one configured now (after a model change), and
    build the kNN index over every exemplar."""
    from cascade.embedding import Embedder, ModelError
    from cascade.exemplars import reindex as reembed
    from cascade.vectorindex import StoreInUseError, open_vector_index

    settings = Settings()
    try:
        embedder = Embedder.from_settings(settings)
        index = open_vector_index(settings)
    except (ModelError, StoreInUseError) as exc:
        raise fail(str(exc)) from None
    try:
        total = reembed(index, embedder)
    finally:
        index.close()
    console.print(f"re-embedded {total} exemplars with {embedder.identity}")
