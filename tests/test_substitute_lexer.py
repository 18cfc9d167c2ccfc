"""SQL-mode substitution checked against PostgreSQL's own lexer (libpg_query, through pglast).

The substituter reads a template the way PostgreSQL's lexer does, to write each reference for
the place it stands in. Wherever the two readings differ, a value can become SQL. So besides
the attacks found so far (each once an injection), templates are generated from every string,
identifier, comment and dollar-quote form, and each is substituted with plain values and with
hostile ones: PostgreSQL must read the same tokens in both, each value inside a quoted literal
or identifier whose text is exactly the value (or a number or keyword token of its own).
Pure: no database."""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest
from pglast import parser as pg

from pgdurable.core.substitute import SubstitutionError, substitute_sql


def rowset(value: object) -> str:
    return json.dumps({"rows": [{"data": value}], "row_count": 1})


def sql(template: str, names: Mapping[str, str]) -> str:
    return substitute_sql(template, names, {}, "abcd1234", None)


def tokens(text: str) -> list[tuple[str, str]]:
    return [(t.name, text[t.start : t.end + 1]) for t in pg.scan(text)]


def literal(text: str) -> Any:
    """The value PostgreSQL's parser reads from one literal token (and a UESCAPE clause)."""
    return pg.parse_sql(f"SELECT {text}")[0].stmt.targetList[0].val.val


def identifier(text: str) -> str:
    """The name PostgreSQL's parser reads from one quoted identifier (and a UESCAPE clause)."""
    name: str = pg.parse_sql(f"SELECT 1 AS {text}")[0].stmt.targetList[0].name
    return name


def uescape(scanned: list[tuple[str, str]], index: int) -> str:
    """The UESCAPE clause after token ``index`` (for a U& literal), or ""."""
    after = [token for token in scanned[index + 1 : index + 9] if token[0] not in COMMENTS]
    return f" UESCAPE {after[1][1]}" if len(after) > 1 and after[0][0] == "UESCAPE" else ""


COMMENTS = ("SQL_COMMENT", "C_COMMENT")


# -- the attacks -------------------------------------------------------------------------------

ROLES = "|| (SELECT string_agg(rolname, chr(44)) FROM pg_roles WHERE rolcanlogin) ||"
ATTACKS = [
    # an E-string continued on a new line is one E-string: \' escapes in the second segment
    (
        "SELECT E'Dear customer\\n'\n       'it\\'s for $v.data' AS greeting",
        ROLES,
        "SELECT E'Dear customer\\n'\n       'it\\'s for " + ROLES + "' AS greeting",
    ),
    # in a U& string a backslash escapes no quote (only the UESCAPE character, later)
    (
        "SELECT U&'C:\\' UESCAPE '!' || $v AS path",
        "(SELECT current_user)",
        "SELECT U&'C:\\' UESCAPE '!' || '(SELECT current_user)' AS path",
    ),
    # a -- comment ends at a carriage return as well
    (
        "SELECT 1 -- note\r, 'x\n, $v -- '",
        "' || current_user || '",
        "SELECT 1 -- note\r, 'x\n, '' || current_user || '' -- '",
    ),
    # x$E is one identifier: the string after it is a standard one, where \ escapes nothing
    (
        "SELECT x$E'\\', $v AS y -- '",
        "' || current_user || '",
        "SELECT x$E'\\', ''' || current_user || ''' AS y -- '",
    ),
    # after a parameter a new token starts: $1E'...' is an E-string
    (
        "SELECT $1E'\\', $v AS y -- '",
        "\\' || current_user || '",
        "SELECT $1E'\\', \\\\'' || current_user || '' AS y -- '",
    ),
    # a literal written after a string on a new line continues it, with its escaping
    (
        "SELECT E'a'\n$v",
        "\\' || current_user || '",
        "SELECT E'a'\n'\\\\'' || current_user || '''",
    ),
    # a value's quote next to an E (or U&) would make an E-string of it: set apart
    ("SELECT E$v", "\\' || current_user || '", "SELECT E '\\'' || current_user || '''"),
]


@pytest.mark.parametrize(("template", "value", "expected"), ATTACKS)
def test_attacks_stay_in_one_literal(template: str, value: str, expected: str) -> None:
    out = sql(template, {"v": rowset(value)})
    assert out == expected
    holding = [text for name, text in tokens(out) if value.replace("'", "''") in text]
    assert len(holding) == 1, tokens(out)
    assert holding[0].endswith("'")


def test_a_keyword_is_set_apart_from_a_dollar_quote_after_it() -> None:
    # NULL$x$ would be one identifier to PostgreSQL, where this reading sees a dollar quote.
    names = {"n": rowset(None), "v": rowset("' || current_user || '")}
    out = sql("SELECT $n?$x$ $v $x$", names)
    assert out == "SELECT NULL $x$ ''' || current_user || ''' $x$"
    assert [name for name, _ in tokens(out)] == ["SELECT", "NULL_P", "SCONST"]


def test_a_value_that_would_end_its_dollar_quote_is_refused() -> None:
    # PostgreSQL ends dollar-quoted text at the first $x$, wherever it comes from
    for value in ["$x$ || current_user || $x$", "a$x"]:
        with pytest.raises(SubstitutionError, match=r"contains \$x\$, which would end"):
            sql("SELECT $x$ '$v$x$", {"v": rowset(value)})


# -- contexts the lexer must tell apart --------------------------------------------------------

NAMES = {
    "v": rowset("a'b\\c!d\"e"),
    "r": rowset(1),
    "nul": rowset(None),
    "bits": rowset("0101"),
}
VALUE = "a'b\\c!d\"e"

CASES = [
    # U&'' strings: the escape character (\ by default) doubled with the quotes
    ("SELECT U&'$v'", "SELECT U&'a''b\\\\c!d\"e'"),
    ("SELECT U&'$v' UESCAPE '!'", "SELECT U&'a''b\\c!!d\"e' UESCAPE '!'"),
    ("SELECT u&'$v'uescape'!'", "SELECT u&'a''b\\c!!d\"e'uescape'!'"),
    (
        "SELECT U&'$v' /* c */ -- d\n UESCAPE '!'",
        "SELECT U&'a''b\\c!!d\"e' /* c */ -- d\n UESCAPE '!'",
    ),
    ("SELECT U&'$v'\n'x' UESCAPE '!'", "SELECT U&'a''b\\c!!d\"e'\n'x' UESCAPE '!'"),
    ("SELECT 1 AS U&\"$v\" UESCAPE '!'", 'SELECT 1 AS U&"a\'b\\c!!d""e" UESCAPE \'!\''),
    ('SELECT 1 AS U&"$v"', 'SELECT 1 AS U&"a\'b\\\\c!d""e"'),
    ("SELECT U&'\\\\$v'", "SELECT U&'\\\\a''b\\\\c!d\"e'"),  # \\ is a pair: $v starts after it
    # E'' strings: a backslash escapes the next character, a $ too
    ("SELECT E'\\$v'", "SELECT E'\\$v'"),
    ("SELECT E'\\\\$v'", "SELECT E'\\\\a''b\\\\c!d\"e'"),
    ("SELECT E'\\'''$v'", "SELECT E'\\'''a''b\\\\c!d\"e'"),
    ("SELECT E'\\''$v'x'", "SELECT E'\\'' 'a''b\\c!d\"e' 'x'"),  # \' and then the closing quote
    # continuation segments keep the first segment's kind
    ("SELECT E'x'\n'$v'", "SELECT E'x'\n'a''b\\\\c!d\"e'"),
    ("SELECT E'x' -- c\r\n  '$v'", "SELECT E'x' -- c\r\n  'a''b\\\\c!d\"e'"),
    ("SELECT E'x' '$v'", "SELECT E'x' 'a''b\\c!d\"e'"),  # no line break: a new string
    ("SELECT E'x' /* c */\n'$v'", "SELECT E'x' /* c */\n'a''b\\c!d\"e'"),  # nor across /* */
    ("SELECT 'x'\n$v", "SELECT 'x'\n'a''b\\c!d\"e'"),
    ("SELECT E'x'\n$v\n'\\'$v'", "SELECT E'x'\n'a''b\\\\c!d\"e'\n'\\'a''b\\\\c!d\"e'"),
    ("SELECT E'x'\n$r", "SELECT E'x'\n1"),
    # prefixes belong to the token before them when that is a word, a number or a parameter
    ("SELECT x$E'$v'", "SELECT x$E'a''b\\c!d\"e'"),
    ("SELECT a$b'$v'", "SELECT a$b'a''b\\c!d\"e'"),
    ("SELECT xU&'$v'", "SELECT xU&'a''b\\c!d\"e'"),
    ("SELECT 0xE'$v'", "SELECT 0xE'a''b\\c!d\"e'"),
    ("SELECT $$x$$E'$v'", "SELECT $$x$$E'a''b\\\\c!d\"e'"),
    ("SELECT N'$v'", "SELECT N'a''b\\c!d\"e'"),
    ("SELECT B'$bits', X'$bits'", "SELECT B'0101', X'0101'"),
    # in code: set apart from what the literal would fuse with
    ("SELECT U&$v", "SELECT U& 'a''b\\c!d\"e'"),
    ("SELECT 'x'$v", "SELECT 'x' 'a''b\\c!d\"e'"),
    ("SELECT $v'x'", "SELECT 'a''b\\c!d\"e' 'x'"),
    ("SELECT $v$v", "SELECT 'a''b\\c!d\"e' 'a''b\\c!d\"e'"),
    ("SELECT $nul?$r", "SELECT NULL 1"),
    ("SELECT $r.missing$x$", "SELECT $r.missing $x$"),
    ("SELECT 0-$r, $r-0, ($r)", "SELECT 0-1, 1-0, (1)"),
    # comments
    ("SELECT 1 -- $v\r$r", "SELECT 1 -- $v\r1"),
    ("SELECT 1 /* /* $v */ $v */ $r", "SELECT 1 /* /* $v */ $v */ 1"),
    ("SELECT 1 /*/ $v */ $r", "SELECT 1 /*/ $v */ 1"),
]


@pytest.mark.parametrize(("template", "expected"), CASES)
def test_lexical_contexts(template: str, expected: str) -> None:
    out = sql(template, NAMES)
    assert out == expected
    # wherever the value landed, PostgreSQL reads it back whole
    if "$v" in template and "$v" not in expected:
        assert any(VALUE in text for text in decoded(out)), tokens(out)


def decoded(text: str) -> list[str]:
    """What PostgreSQL reads from each quoted literal and identifier of ``text``."""
    found = []
    scanned = tokens(text)
    for index, (name, token) in enumerate(scanned):
        clause = uescape(scanned, index)
        if name in ("SCONST", "USCONST"):
            found.append(literal(token + clause).sval)
        elif name in ("IDENT", "UIDENT") and token.endswith('"'):
            found.append(identifier(token + clause))
    return found


REFUSED = [
    ("SELECT U&'$v' UESCAPE E'!'", "UESCAPE clause is not a plain one-character"),
    ("SELECT U&'$v' UESCAPE '!'\n'x'", "UESCAPE clause is not a plain one-character"),
    ("SELECT U&'a'\n$v", "would continue that string before its UESCAPE clause"),
    ("SELECT E'\\1$v'", r"unfinished escape sequence \\1;"),
    ("SELECT E'\\x4$v'", r"unfinished escape sequence \\x4;"),
    ("SELECT U&'\\00$v'", r"unfinished escape sequence \\00;"),
    ("SELECT U&'!+00$v' UESCAPE '!'", r"unfinished escape sequence !\+00;"),
    ("SELECT B'$v'", "cannot stand inside a B'' or X'' string"),
    ("SELECT X'00'\n$v", "cannot stand inside a B'' or X'' string"),
    ("SELECT $nul", "first column of first row is NULL"),
]


@pytest.mark.parametrize(("template", "message"), REFUSED)
def test_what_cannot_be_written_safely_is_refused(template: str, message: str) -> None:
    with pytest.raises(SubstitutionError, match=message):
        sql(template, NAMES)


def test_a_nul_character_is_refused() -> None:
    with pytest.raises(SubstitutionError, match=r"^\$v: the value contains a NUL character"):
        sql("SELECT '$v'", {"v": rowset("a\x00b")})


def test_a_unicode_escape_character_that_is_a_dollar_leaves_references_alone() -> None:
    # `$v` is the escape character and `v`: PostgreSQL reports the invalid escape.
    assert sql("SELECT U&'$v' UESCAPE '$'", NAMES) == "SELECT U&'$v' UESCAPE '$'"


# -- differential: generated templates, plain and hostile values -------------------------------

MARKER = re.compile(r"Zq[g-t]qZ")
NUMBERS = {"n": 48271, "m": -48272}
STRINGS = ["v", "w", "j"]  # a row set's first column, another, a JSON object's field
REFS_IN_CODE = ["$v", "$v?", "$v.data", "$w", "$j.s", "$n", "$m", "$b", "$z?", "$e?", "$t.*"]
REFS_IN_QUOTES = ["$v", "$v?", "$v.data", "$w", "$j.s", "$n", "$m", "$b", "$z?", "$v.nope"]
HOSTILE = [
    "'", "''", "\\", "\\'", '"', '""', "$$", "$t$", "$a$", "*/", "/*", "--", "\n", "\r",
    "\r\n", "é", "😀", "!", "!!", "#", "~", "E'", "U&'", "' || current_user || '", "\\u0041",
    "!0041", "\\x41", "\\101", "$v", "{v}", ";", ")", " ", "\t", "uescape", "0", "ff", "\x7f",
]  # fmt: skip
WORDS = [
    "SELECT", "x", "x$E", "a$b", "E", "e", "U&", "u&", "N", "B", "X", "b", "n", "U", "UESCAPE",
    "1", "0xE", "1.5", ".5", "$1", "$2", ",", "(", ")", "||", "&", "+", "-", "/", "*", ".",
    "::", "AS", "é", ";", "$", "'!'",
]  # fmt: skip
GAPS = ["", "", " ", " ", "\n", "\r", "\t", "\r\n", " \n  ", " -- c\n", "--\r"]
CONTINUATIONS = ["\n", " \n ", "\r", "\r\n", " -- it's $v\n", "\n-- c\n\t", " ", "", "\t", "/**/\n"]
UESCAPES = [
    ("\\", ""), ("\\", ""), ("!", " UESCAPE '!'"), ("#", "uescape'#'"), ("\\", " UESCAPE '\\'"),
    ("~", " /* c */ UESCAPE '~'"), ("!", "\nUESCAPE '!'"), ("!", " UESCAPE E'!'"),
]  # fmt: skip


class Generator:
    """Random templates in PostgreSQL's lexical forms, references in every position."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def code(self, depth: int = 0) -> str:
        rng = self.rng
        pieces = [self.piece(depth) for _ in range(rng.randint(2, 9))]
        return "".join(p + rng.choice(GAPS) for p in pieces)

    def piece(self, depth: int) -> str:
        rng = self.rng
        kind = rng.choices(
            ["word", "ref", "string", "ident", "line", "block", "dollar"],
            [4, 5, 6, 2, 1, 1, 1 if depth < 2 else 0],
        )[0]
        if kind == "word":
            return rng.choice(WORDS)
        if kind == "ref":
            return rng.choice(REFS_IN_CODE)
        if kind == "string":
            return self.string()
        if kind == "ident":
            return self.identifier()
        if kind == "line":
            text = "".join(rng.choices(["a", "'", "$v", "/*", "E'", '"', "$$", " "], k=3))
            return "--" + text + rng.choice(["\n", "\r", "\r\n", ""])
        if kind == "block":
            inner = rng.choice(["", "/* $v ' */", "/*/ */", "-- x"])
            return "/*" + rng.choice(["$v", "'", " "]) + inner + rng.choice(["'", "$w", ""]) + "*/"
        tag = rng.choice(["$$", "$t$", "$a$"])
        return tag + self.code(depth + 1) + tag

    def content(self, atoms: list[str]) -> str:
        rng = self.rng
        return "".join(
            rng.choice(REFS_IN_QUOTES) if rng.random() < 0.3 else rng.choice(atoms)
            for _ in range(rng.randint(0, 5))
        )

    def string(self) -> str:
        rng = self.rng
        prefix = rng.choice(["", "", "", "E", "e", "E", "U&", "u&", "N", "B", "X"])
        common = ["a", " ", "--", "/*", "*/", '"', "é", "😀", "\n", "\r", "$", "$$", "$1", ";"]
        escape, clause = "\\", ""
        if prefix in ("E", "e"):
            atoms = [*common, "''", "\\\\", "\\'", "\\n", "\\x41", "\\101", "\\u00e9", "\\$"]
            atoms += ["\\x4", "\\1"]
        elif prefix in ("U&", "u&"):
            escape, clause = rng.choice(UESCAPES)
            atoms = [*common, "''", escape * 2, escape + "0041", escape + "+0000e9"]
            atoms += ["\\" if escape != "\\" else "!", escape + "00"]
        elif prefix in ("B", "X"):
            atoms = ["0", "1", "01"]
        else:
            atoms = [*common, "''", "\\"]
        segments = [self.content(atoms)]
        text = prefix + "'" + segments[0] + "'"
        for _ in range(rng.choice([0, 0, 1, 2])):
            gap = rng.choice(CONTINUATIONS)
            if rng.random() < 0.2:
                text += gap + rng.choice(REFS_IN_CODE[:-1])
            else:
                text += gap + "'" + self.content(atoms) + "'"
        return text + clause

    def identifier(self) -> str:
        rng = self.rng
        atoms = ["a", " ", '""', "\\", "!", "é", "'", "$", "--"]
        text = "a" + self.content(atoms)
        if rng.random() < 0.3:
            escape, clause = rng.choice(UESCAPES)
            return 'U&"' + text + rng.choice(["", escape * 2, escape + "0041"]) + '"' + clause
        return '"' + text + '"'


def results(strings: Mapping[str, str], columns: list[str]) -> dict[str, str]:
    """The named results: each string name holds ``strings[name]``; ``t`` is a row set whose
    column names and cells are ``columns``."""
    names = {name: rowset(strings[name]) for name in ("v", "w")}
    names["j"] = json.dumps({"s": strings["j"], "ok": True})
    names.update({k: rowset(v) for k, v in NUMBERS.items()})
    names["b"] = rowset(True)
    names["z"] = rowset(None)
    names["e"] = json.dumps({"rows": [], "row_count": 0})
    rows = [{c: c for c in columns}, {c: None for c in columns}]
    rows[1][columns[0]] = 7
    names["t"] = json.dumps({"rows": rows, "row_count": 2})
    return names


def truncated(name: str) -> str:
    """An identifier as PostgreSQL keeps it: at most 63 bytes, whole characters."""
    while len(name.encode()) > 63:
        name = name[:-1]
    return name


class Mismatch(AssertionError):
    pass


def compare(hostile: str, plain: str, values: Mapping[str, str]) -> None:
    """PostgreSQL reads ``hostile`` and ``plain`` (the same template substituted with hostile
    and with plain values) as the same tokens, and each literal or quoted identifier of
    ``hostile`` is the one of ``plain`` with each plain value's marker replaced by the
    hostile value."""

    def expect(text: str) -> str:
        return MARKER.sub(lambda m: values[m.group()], text)

    ours, theirs = tokens(hostile), tokens(plain)
    if [n for n, _ in ours] != [n for n, _ in theirs]:
        raise Mismatch(f"token kinds differ:\n{ours}\n{theirs}")
    for index, ((name, text), (_, plain_text)) in enumerate(zip(ours, theirs, strict=True)):
        if text == plain_text and not MARKER.search(text):
            continue
        clause = uescape(theirs, index)
        if name == "SCONST" and plain_text.startswith("$"):
            tag = re.match(r"\$[^$]*\$", plain_text)
            assert tag is not None
            size = len(tag.group())
            compare(text[size:-size], plain_text[size:-size], values)
        elif name in ("SCONST", "USCONST"):
            got, want = literal(text + clause).sval, expect(literal(plain_text + clause).sval)
            if got != want:
                raise Mismatch(f"{text!r} reads {got!r}, not {want!r}")
        elif name in ("BCONST", "XCONST"):
            got, want = literal(text).bsval, expect(literal(plain_text).bsval)
            if got != want:
                raise Mismatch(f"{text!r} reads {got!r}, not {want!r}")
        elif name in ("IDENT", "UIDENT") and plain_text[-1] == '"':
            got = identifier(text + clause)
            # PostgreSQL cuts names at 63 bytes: expected from the plain name before that
            full = plain_text[1:-1].replace('""', '"') if plain_text[0] == '"' else None
            want = truncated(expect(full or identifier(plain_text + clause)))
            if got != want:
                raise Mismatch(f"{text!r} reads {got!r}, not {want!r}")
        else:
            raise Mismatch(f"a value changed the {name} token {plain_text!r} into {text!r}")


def check_placement(plain: str) -> None:
    """Every plain value lands inside a quoted literal or identifier; every number is a
    number token of its own."""
    for name, text in tokens(plain):
        if name == "SCONST" and text.startswith("$"):
            tag = re.match(r"\$[^$]*\$", text)
            assert tag is not None
            check_placement(text[len(tag.group()) : -len(tag.group())])
            continue
        quoted = name in ("SCONST", "USCONST", "BCONST", "XCONST") or (
            name in ("IDENT", "UIDENT") and text.endswith('"')
        )
        number = name == "ICONST" and text in ("48271", "48272")
        if not (quoted or number) and (MARKER.search(text) or "4827" in text):
            raise Mismatch(f"a value landed in the {name} token {text!r}")


# Refusals that depend on the value (the others come from the template, plain values too).
VALUE_REFUSALS = ("which would end the dollar-quoted", "cannot stand inside a B'' or X''")


def run_differential(seed: int, templates: int) -> Counter[str]:
    """Check ``templates`` generated templates, each with plain values and two sets of
    hostile ones; return what happened, by outcome."""
    rng = random.Random(seed)
    generator = Generator(rng)
    seen: Counter[str] = Counter()
    markers = [f"Zq{c}qZ" for c in "ghijklmnopqrst"]

    for _ in range(templates):
        template = generator.code()
        plain_strings = {name: markers[i] for i, name in enumerate(STRINGS)}
        plain_columns = markers[len(STRINGS) : len(STRINGS) + 2]
        plain_names = results(plain_strings, plain_columns)
        try:
            plain = sql(template, plain_names)
        except SubstitutionError:
            seen["refused for the template"] += 1
            continue
        try:
            # decodes every literal, and reads dollar-quoted text as code
            compare(plain, plain, {m: m for m in markers})
            check_placement(plain)
        except pg.ParseError:
            seen["not SQL to PostgreSQL"] += 1
            continue
        seen["checked"] += 1
        for _variant in range(2):
            values = {m: m for m in markers}
            hostile_strings = {}
            for name, marker in plain_strings.items():
                text = "".join(rng.choices(HOSTILE, k=rng.randint(1, 3)))
                at = rng.randint(0, len(text))
                values[marker] = hostile_strings[name] = text[:at] + marker + text[at:]
            columns = []
            for marker in plain_columns:
                values[marker] = marker + rng.choice(HOSTILE)
                columns.append(values[marker])
            try:
                hostile = sql(template, results(hostile_strings, columns))
            except SubstitutionError as error:
                if not any(reason in str(error) for reason in VALUE_REFUSALS):
                    raise
                seen["refused for the value"] += 1
                continue
            try:
                compare(hostile, plain, values)
            except (Mismatch, pg.ParseError) as error:
                raise AssertionError(
                    f"template {template!r}\nplain   {plain!r}\nhostile {hostile!r}\n{error}"
                ) from error
            seen["hostile checked"] += 1
    return seen


def test_postgresql_reads_every_value_as_one_literal() -> None:
    started = time.monotonic()
    seen = run_differential(seed=20_240_611, templates=8_000)
    elapsed = time.monotonic() - started
    # Meaningful: most templates are SQL to PostgreSQL and are checked with hostile values.
    assert seen["checked"] > 5_500, seen
    assert seen["hostile checked"] > 11_000, seen
    assert elapsed < 60, (elapsed, seen)
