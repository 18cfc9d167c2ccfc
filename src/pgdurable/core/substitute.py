r"""Variable substitution in step text (docs/reference.md#references).

Pure: no I/O. Two passes over a template:

1. **Braces.** ``{sys_instance_id}``, ``{sys_label}`` and ``{name}`` for a start-time
   variable are replaced by raw text, in one left-to-right pass (inserted text is not
   rescanned). Anything else in braces -- unknown names, JSON, a lone ``{`` -- is kept.
2. **Dollar references** to named step results, on the output of pass 1 (so a variable may
   inject ``$name``): ``$name.*``, ``$name.col?``, ``$name.col``, ``$name?`` and ``$name``.
   Inserted values are not rescanned either.

Two renderings exist. *SQL mode* (SQL steps) writes SQL literals: quoted strings, bare
numbers (negative ones in parentheses, so ``0-$n`` never becomes a ``--`` comment) and
booleans, ``NULL``, and a ``VALUES`` list for ``$name.*``. *Raw mode* (HTTP fields) writes
plain text: strings unquoted, JSON for objects and arrays.

In SQL mode a value must never change how PostgreSQL reads the statement around it: a named
result may hold outside data (an HTTP response, a signal's payload, rows another role wrote).
So the template is read token by token the way PostgreSQL's lexer reads it, and a reference
is written for the place it stands in:

- in code, a literal. A quoted literal is set apart by a space from a neighbour it would
  otherwise fuse with (``E$v`` gives ``E '...'``, not the E-string ``E'...'``), and so is a
  number or keyword (``$a$b`` gives ``1 2``). A literal that follows a string on a new line is
  part of that string for PostgreSQL (``'a'`` newline ``'b'`` is ``'ab'``), so it is written
  with that string's escaping;
- inside a ``'...'`` string (and its continuation segments): the value's text with ``'``
  doubled; in ``E'...'`` strings, backslashes doubled as well; in ``U&'...'`` strings, the
  Unicode escape character doubled (``\`` or the one its ``UESCAPE '<c>'`` clause names). A
  reference is refused in a ``U&`` string whose ``UESCAPE`` clause is not such a plain
  one-character literal, on a new line right after a ``U&`` string (it would be a
  continuation whose escape character is read after it), and in a ``B''``/``X''`` bit string
  when the value holds a quote (which no bit string can carry). A ``$`` escaped by a
  backslash in an ``E''`` string is text, not a reference, and a reference right after an
  unfinished escape sequence (``\1``, ``\x4``, ``\u00``) is refused: the value would complete
  it;
- inside a ``"..."`` identifier: ``"`` doubled (and the escape character in ``U&"..."``);
- inside a ``--`` comment (ended by ``\n`` or ``\r``) or a nested ``/* */`` comment: not at
  all.

Dollar-quoted text (a ``DO`` or function body) is read as code again, and a value that would
end it early (it contains the closing ``$tag$``) is refused; so is a value holding a NUL
character, which SQL text cannot carry. The reading assumes ``standard_conforming_strings``
is on (the worker forces it).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass

from .truth import parse_result

__all__ = [
    "MAX_EXPANDED_ROWS",
    "SubstitutionError",
    "substitute_json",
    "substitute_raw",
    "substitute_sql",
]

MAX_EXPANDED_ROWS = 10_000
"""The most rows ``$name.*`` expands into a SQL ``VALUES`` list."""

_IDENT_START = frozenset(string.ascii_letters + "_")
_IDENT_CHARS = _IDENT_START | frozenset(string.digits)
# PostgreSQL's dollar-quote delimiter: $$ or $tag$, tag an identifier without `$`.
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")


class SubstitutionError(Exception):
    """A reference that cannot be substituted; the message is pg_durable's error text."""


def substitute_sql(
    template: str,
    names: Mapping[str, str],
    variables: Mapping[str, str],
    instance_id: str,
    label: str | None,
) -> str:
    """Substitute variables and named results into a SQL step's text (SQL-quoting mode).

    ``names`` maps result names to result strings (JSON text as the executor produced it;
    other text counts as a JSON string), ``variables`` is the start-time snapshot of the
    submitter's ``df.vars``. Raises :class:`SubstitutionError` with pg_durable's error text.
    """
    text = _substitute_braces(template, variables, instance_id, label)
    if "$" not in text:  # no reference: nothing for pass 2 to change (most steps)
        return text
    return _Substitution(names, sql=True).run_sql(text)


def substitute_raw(
    template: str,
    names: Mapping[str, str],
    variables: Mapping[str, str],
    instance_id: str,
    label: str | None,
) -> str:
    """Substitute variables and named results into an HTTP field (raw mode).

    Like :func:`substitute_sql` but values are inserted as plain text: strings unquoted,
    numbers and booleans as JSON text, objects and arrays as compact JSON, ``$name.*`` as
    the JSON array of row objects; and a missing field is an error instead of being left
    for PostgreSQL to report.
    """
    text = _substitute_braces(template, variables, instance_id, label)
    return _Substitution(names, sql=False).run(text)


def substitute_json(
    value: object,
    names: Mapping[str, str],
    variables: Mapping[str, str],
    instance_id: str,
    label: str | None,
) -> object:
    """Substitute variables and named results into the string values of a JSON value (a
    Python step's arguments; keys are left alone).

    A string that is one reference and nothing else (``"$order"``, ``"$order.amount"``,
    ``"$lines.*"``) takes the referenced value with its JSON type: a number stays a number, a
    row set is an array of row objects. Any other string is substituted as an HTTP field is
    (:func:`substitute_raw`).
    """
    if isinstance(value, dict):
        return {
            k: substitute_json(v, names, variables, instance_id, label) for k, v in value.items()
        }
    if isinstance(value, list):
        return [substitute_json(v, names, variables, instance_id, label) for v in value]
    if not isinstance(value, str):
        return value
    text = _substitute_braces(value, variables, instance_id, label)
    if text.startswith("$"):
        typed = _Typed(names, sql=False)
        ref = typed._parse(text, 1)
        if ref is not None and ref.end == len(text):
            return json.loads(typed._render(ref) or "null")
    return _Substitution(names, sql=False).run(text)


# -- pass 1: braces ----------------------------------------------------------------------------


def _substitute_braces(
    template: str, variables: Mapping[str, str], instance_id: str, label: str | None
) -> str:
    out: list[str] = []
    pos = 0
    while (start := template.find("{", pos)) != -1:
        end = template.find("}", start + 1)
        if end == -1:
            break
        value = _brace_value(template[start + 1 : end], variables, instance_id, label)
        if value is None:
            # Keep the "{" and look for the next one right after it, so "{{v}}" gives
            # "{<v>}" and JSON such as {"a":{v}} still has its {v} replaced.
            out.append(template[pos : start + 1])
            pos = start + 1
        else:
            out.append(template[pos:start])
            out.append(value)
            pos = end + 1
    out.append(template[pos:])
    return "".join(out)


def _brace_value(
    key: str, variables: Mapping[str, str], instance_id: str, label: str | None
) -> str | None:
    if key == "sys_instance_id":
        return instance_id
    if key == "sys_label":
        return label or ""
    if _is_identifier(key):
        return variables.get(key)
    return None


# -- pass 2: dollar references -----------------------------------------------------------------


@dataclass(frozen=True)
class _Ref:
    """One parsed ``$`` reference: ``$name``, ``$name?``, ``$name.col``, ``$name.col?``,
    ``$name.*``."""

    name: str
    field: str | None  # None: the first column (or the whole result); "*": the row set
    null_safe: bool
    end: int  # index just past the reference in the text


class _Substitution:
    """Pass 2 over one text: finds each ``$`` reference and renders its value."""

    def __init__(self, names: Mapping[str, str], *, sql: bool):
        self.results = names
        self.sql = sql
        # Longest first, so `$ab` is read as `ab` when both `a` and `ab` exist.
        self.longest_first = sorted((n for n in names if n), key=lambda n: (-len(n), n))
        self.parsed: dict[str, object] = {}
        # Where the reference being rendered stands (SQL mode): "code", a string kind ("q"
        # standard, "e" E'', "u" U&'', "b" B'', "x" X''), "ident" ("...") or "uident" (U&"...").
        self.context = "code"
        # The escape character of the U&'' string or U&"" identifier around the reference;
        # None if it cannot be known before PostgreSQL reads the statement.
        self.escape: str | None = "\\"
        # In code: the kind of the string a quoted value would continue, if any.
        self.continues: str | None = None

    # -- SQL mode: reading the template as PostgreSQL's lexer does ------------------------

    def run_sql(self, text: str) -> str:
        """Pass 2 in SQL mode: ``text`` read token by token as PostgreSQL's lexer reads it
        (``scan.l``), each reference written for the place it stands in."""
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            nxt = text[i + 1 : i + 2]
            if c == "$":
                ref = self._parse(text, i + 1)
                if ref is not None:
                    # A reference wins over a dollar quote of the same spelling ($r$r is two
                    # references): it is replaced, so PostgreSQL never sees that tag.
                    i, written = self._code_reference(text, i, ref, out)
                    if written.endswith("'"):
                        i = self._continuations(text, i, self.continues or "q", "\\", out)
                    continue
                tag = _DOLLAR_TAG.match(text, i)
                if tag is not None:
                    i = self._dollar_quoted(text, tag, out)
                    continue
                # `$1`: a parameter, after which a new token starts (`$1E'..'` is an E-string).
                j = i + 1
                while j < n and text[j] in string.digits:
                    j += 1
                out.append(text[i:j])
                i = j
            elif (c == "-" and nxt == "-") or (c == "/" and nxt == "*"):
                end = _comment_end(text, i)
                out.append(text[i:end])  # references in comments are left alone
                i = end
            elif c == "'":
                i = self._string(text, i, "q", out)
            elif c == '"':
                i = self._quoted(text, i, "ident", None, out)
            elif c in "eEbBxX" and nxt == "'":
                out.append(c)
                i = self._string(text, i + 1, c.lower(), out)
            elif c in "uU" and nxt == "&" and text[i + 2 : i + 3] in ("'", '"'):
                out.append(text[i : i + 2])
                if text[i + 2] == "'":
                    i = self._string(text, i + 2, "u", out)
                else:
                    escape = _uescape(text, _quoted_end(text, i + 3, '"'))
                    i = self._quoted(text, i + 2, "uident", escape, out)
            elif _ident_start(c):
                # An identifier (or keyword): `x$E'..'` is the identifier `x$E` and a
                # standard string. A reference inside one ends it.
                j = i + 1
                while j < n and _ident_cont(text[j]):
                    if text[j] == "$" and self._parse(text, j + 1) is not None:
                        break
                    j += 1
                out.append(text[i:j])
                i = j
            elif (number := _NUMBER.match(text, i)) is not None:
                # `0xE'..'` is a hex number and a standard string, `1.5.E'..'` a number, a
                # dot and an E-string. (A letter right after a number, as in `1E'..'`, is a
                # syntax error to PostgreSQL: it runs nothing.)
                out.append(number.group())
                i = number.end()
            else:
                out.append(c)
                i += 1
        return "".join(out)

    def _string(self, text: str, i: int, kind: str, out: list[str]) -> int:
        """Write the string literal whose opening quote is at ``i``, with its continuation
        segments; return the index just past it."""
        escape = _uescape(text, _string_end(text, i)) if kind == "u" else "\\"
        i = self._quoted(text, i, kind, escape, out)
        return self._continuations(text, i, kind, escape, out)

    def _continuations(
        self, text: str, i: int, kind: str, escape: str | None, out: list[str]
    ) -> int:
        """After a string closed just before ``i``: write the segments that continue it
        (``'...'`` after whitespace holding a line break, as PostgreSQL's ``quotecontinue``),
        each read as the same kind of string; return the index past the last one."""
        n = len(text)
        while i < n:
            gap = _QUOTE_CONTINUE.match(text, i)
            if gap is None:
                return i
            j = gap.end()
            if text.startswith("'", j):
                out.append(text[i:j])
                i = self._quoted(text, j, kind, escape, out)
                continue
            ref = self._parse(text, j + 1) if text.startswith("$", j) else None
            if ref is None:
                return i
            if kind == "u":
                raise SubstitutionError(
                    f"${ref.name} stands on a new line right after a U&'' string, so its value"
                    " would continue that string before its UESCAPE clause is read; put an"
                    " operator such as || between them"
                )
            out.append(text[i:j])
            i, written = self._code_reference(text, j, ref, out, continues=kind)
            if not written.endswith("'"):
                return i
        return i

    def _quoted(self, text: str, i: int, kind: str, escape: str | None, out: list[str]) -> int:
        """Write one quoted segment (string or identifier) whose opening quote is at ``i``,
        replacing the references inside it; return the index just past its closing quote
        (or the end of the text: PostgreSQL then reports the unterminated literal)."""
        quote = text[i]
        n = len(text)
        out.append(quote)
        j = chunk = i + 1
        unfinished = ""  # an escape sequence ending at `j` that more digits would extend
        while j < n:
            c = text[j]
            if c == quote:
                if kind not in ("b", "x") and text.startswith(quote, j + 1):
                    j += 2  # a doubled quote
                    unfinished = ""
                    continue
                out.append(text[chunk : j + 1])
                return j + 1
            if (kind == "e" and c == "\\") or (
                kind in ("u", "uident") and escape is not None and c == escape
            ):
                end, open_ended = _escape_end(text, j, kind, escape or "\\")
                unfinished = text[j:end] if open_ended else ""
                j = end
                continue
            if c == "$":
                ref = self._parse(text, j + 1)
                if ref is not None:
                    if unfinished:
                        raise SubstitutionError(
                            f"${ref.name} stands right after the unfinished escape sequence"
                            f" {unfinished}; PostgreSQL would read its value as part of it"
                        )
                    out.append(text[chunk:j])
                    self.context, self.escape, self.continues = kind, escape, None
                    rendered = self._render(ref)
                    out.append(text[j : ref.end] if rendered is None else rendered)
                    j = chunk = ref.end
                    continue
            unfinished = ""
            j += 1
        out.append(text[chunk:])
        return n

    def _code_reference(
        self, text: str, at: int, ref: _Ref, out: list[str], continues: str | None = None
    ) -> tuple[int, str]:
        """Write the reference at ``at``, standing in code; return the index past it and what
        was written."""
        self.context, self.escape, self.continues = "code", "\\", continues
        rendered = self._render(ref)
        # A missing field is left for PostgreSQL to report, but kept apart all the same.
        written = text[at : ref.end] if rendered is None else rendered
        # Set apart from neighbours it would fuse with, so that PostgreSQL's next token starts
        # where this reading's does.
        if _fuses(_last_char(out), written[:1]):
            out.append(" ")
        out.append(written)
        if _fuses(written[-1:], text[ref.end : ref.end + 1]):
            out.append(" ")
        return ref.end, written

    def _dollar_quoted(self, text: str, tag: re.Match[str], out: list[str]) -> int:
        """Write the dollar-quoted text opened by ``tag``; its body is code again."""
        delimiter = tag.group()
        close = text.find(delimiter, tag.end())
        body_end = len(text) if close == -1 else close
        body = self.run_sql(text[tag.end() : body_end])
        closing = "" if close == -1 else delimiter
        # PostgreSQL ends the text at the first delimiter, wherever it comes from.
        if (body + closing).find(delimiter) not in (-1, len(body)):
            raise SubstitutionError(
                f"a substituted value contains {delimiter}, which would end the dollar-quoted"
                " text around its reference"
            )
        out += [delimiter, body, closing]
        return body_end + len(closing)

    # -- references -----------------------------------------------------------------------

    def run(self, text: str) -> str:
        """Pass 2 in raw mode: replace each reference in ``text``."""
        out: list[str] = []
        pos = 0
        while (dollar := text.find("$", pos)) != -1:
            out.append(text[pos:dollar])
            ref = self._parse(text, dollar + 1)
            if ref is None:
                # `$$`, `$1`, `$unknown`: not ours; keep the `$` and scan on after it.
                out.append("$")
                pos = dollar + 1
                continue
            rendered = self._render(ref)
            out.append(text[dollar : ref.end] if rendered is None else rendered)
            pos = ref.end
        out.append(text[pos:])
        return "".join(out)

    def _parse(self, text: str, at: int) -> _Ref | None:
        for name in self.longest_first:
            if text.startswith(name, at):
                ref = _parse_suffix(text, name, at + len(name))
                if ref is not None:
                    return ref
        return None

    def _value(self, name: str) -> object:
        # Parsed once per text: a large row set may be referenced several times.
        if name not in self.parsed:
            self.parsed[name] = parse_result(self.results[name])
        return self.parsed[name]

    def _render(self, ref: _Ref) -> str | None:
        """The text replacing ``ref``, or None to leave it in place."""
        value = self._value(ref.name)
        rows = _row_set(value)
        if ref.field == "*":
            records = _records(rows)
            if records is None:
                raise SubstitutionError(f"${ref.name}.* — invalid result format")
            text: str | None = self._rows(ref.name, records)
        elif ref.field is None:
            text = self._first_column(ref, value, rows)
        else:
            text = self._field(ref, ref.field, value, rows)
        if self.sql and text is not None and "\x00" in text:
            raise SubstitutionError(
                f"${ref.name}: the value contains a NUL character, which SQL text cannot hold"
            )
        return text

    def _first_column(self, ref: _Ref, value: object, rows: list[object] | None) -> str:
        if rows is None:
            return self._whole(value)  # not a row set: the entire result
        if not rows:
            return self._no_rows(ref)
        first = rows[0]
        if not isinstance(first, dict) or not first:
            return self._whole(value)  # a row without columns has no first column
        cell = next(iter(first.values()))
        if cell is None:
            if ref.null_safe:
                return self._null()
            raise SubstitutionError(f"${ref.name} is NULL — first column of first row is NULL")
        return self._scalar(cell)

    def _field(self, ref: _Ref, field: str, value: object, rows: list[object] | None) -> str | None:
        if rows is not None:
            if not rows:
                return self._no_rows(ref)
            record = rows[0] if isinstance(rows[0], dict) else {}
        elif isinstance(value, dict):
            record = value  # an HTTP envelope, a signal result...: its top-level fields
        else:
            raise SubstitutionError(
                f"${ref.name}.{field}: result is neither a row set nor a JSON object"
            )
        if field not in record:
            if self.sql:
                return None  # left in the SQL, so PostgreSQL reports it in context
            if ref.null_safe:
                return self._null()
            available = ", ".join(sorted(record))
            raise SubstitutionError(
                f"${ref.name}.{field}: result has no field '{field}' (available: {available})"
            )
        cell = record[field]
        if cell is None:
            if ref.null_safe:
                return self._null()
            raise SubstitutionError(f"${ref.name}.{field} is NULL")
        return self._scalar(cell)

    def _no_rows(self, ref: _Ref) -> str:
        if ref.null_safe:
            return self._null()
        raise SubstitutionError(f"${ref.name} has no rows — query returned zero results")

    # -- rendering ------------------------------------------------------------------------

    def _null(self) -> str:
        return self._written("NULL", "NULL")

    def _scalar(self, value: object) -> str:
        """A non-null JSON value as a SQL literal or as raw text."""
        if isinstance(value, bool):
            text = "true" if value else "false"
            return self._written(text, text)
        if isinstance(value, int | float):
            text = _json(value)
            return self._written(text, f"({text})" if text.startswith("-") else text)
        if isinstance(value, str):
            return self._written(value, _quote_literal(value))
        text = _json(value)
        return self._written(text, _quote_literal(text))

    def _whole(self, value: object) -> str:
        """A whole result that is not read as a row set: its JSON text."""
        text = _json(value)
        return self._written(text, _quote_literal(text))

    def _written(self, raw: str, literal: str) -> str:
        """A value as written where the reference stands: ``raw`` text in raw mode, the SQL
        ``literal`` in code, ``raw`` escaped inside quotes."""
        if not self.sql:
            return raw
        if self.context != "code":
            return self._inside(self.context, raw)
        if self.continues is not None and literal.startswith("'"):
            # PostgreSQL reads this literal as a segment of the string before it.
            return "'" + self._inside(self.continues, raw) + "'"
        return literal

    def _inside(self, kind: str, raw: str) -> str:
        """``raw`` written inside a quoted string or identifier of ``kind``, so that
        PostgreSQL reads back exactly ``raw``."""
        if kind == "ident":
            return raw.replace('"', '""')
        if kind == "q":
            return raw.replace("'", "''")
        if kind == "e":
            return raw.replace("\\", "\\\\").replace("'", "''")
        if kind in ("b", "x"):
            if "'" in raw:
                raise SubstitutionError(
                    "a substituted value containing ' cannot stand inside a B'' or X'' string"
                )
            return raw
        # U&'' and U&"": the escape character is doubled, then the quote.
        if self.escape is None:
            raise SubstitutionError(
                "a reference cannot stand inside a U&'' string or U&\"\" identifier whose"
                " UESCAPE clause is not a plain one-character '...' literal"
            )
        quote = '"' if kind == "uident" else "'"
        return raw.replace(self.escape, self.escape * 2).replace(quote, quote * 2)

    def _rows(self, name: str, rows: list[dict[str, object]]) -> str:
        if not self.sql:
            return _json(rows)
        if self.context != "code":
            raise SubstitutionError(f"${name}.* cannot stand inside a quoted string or identifier")
        if len(rows) > MAX_EXPANDED_ROWS:
            raise SubstitutionError(
                f"${name}.* — result has {len(rows)} rows, exceeding the maximum of "
                f"{MAX_EXPANDED_ROWS} for row-set expansion. Use pagination or intermediate "
                "tables for large result sets."
            )
        if not rows:
            return f"(SELECT NULL WHERE false) AS {_quote_ident(name)}"
        columns = list(rows[0])
        values = ", ".join(
            "(" + ",".join(_values_cell(row.get(c)) for c in columns) + ")" for row in rows
        )
        column_list = ", ".join(_quote_ident(c) for c in columns)
        return f"(VALUES {values}) AS {_quote_ident(name)}({column_list})"


class _Typed(_Substitution):
    """Raw mode with every value written as JSON text, to be read back with its type."""

    def _null(self) -> str:
        return "null"

    def _scalar(self, value: object) -> str:
        return _json(value)

    def _whole(self, value: object) -> str:
        return _json(value)

    def _rows(self, name: str, rows: list[dict[str, object]]) -> str:
        return _json(rows)


# -- PostgreSQL's lexical rules (scan.l) ---------------------------------------------------------

_DECIMAL = r"[0-9](?:_?[0-9])*"
# A number token: the longest of PostgreSQL's integer, numeric and real forms (`1..` is 1
# and the `..` of a range).
_NUMBER = re.compile(
    r"0[xX](?:_?[0-9A-Fa-f])++|0[oO](?:_?[0-7])++|0[bB](?:_?[01])++"
    rf"|(?:{_DECIMAL}\.(?!\.)(?:{_DECIMAL})?|\.{_DECIMAL}|{_DECIMAL})(?:[Ee][-+]?{_DECIMAL})?"
)
# `quotecontinue` without its quote: whitespace holding a line break, `--` comments allowed
# (each ended by a line break once the first break is seen), no `/* */` comments.
_QUOTE_CONTINUE = re.compile(
    r"(?:[ \t\f\v]++|--[^\n\r]*+)*+[\n\r](?:[ \t\n\r\f\v]++|--[^\n\r]*+[\n\r])*+"
)
_UESCAPE = re.compile(r"uescape(?![A-Za-z0-9_$\x80-\U0010ffff])", re.IGNORECASE | re.ASCII)
_ESCAPE_CHAR = re.compile(r"'([^'])'")
_OCTAL = frozenset("01234567")
_HEX = frozenset(string.hexdigits)


def _ident_start(c: str) -> bool:
    return c in _IDENT_START or c >= "\x80"


def _ident_cont(c: str) -> bool:
    return c in _IDENT_CHARS or c == "$" or c >= "\x80"


def _fuses(before: str, after: str) -> bool:
    """Whether PostgreSQL may read a character ``before`` and the next ``after`` as one
    token (``E'`` is an E-string prefix, ``''`` a doubled quote, ``a1`` one identifier, ``1.5``
    one number)."""
    if not before or not after:
        return False
    if after == "'":
        return before in "'&" or _ident_cont(before)
    if "." in (before, after):  # 1 and .5 are 1.5
        return before + after != "." and (before in string.digits or after in string.digits)
    return _ident_cont(before) and _ident_cont(after)


def _last_char(out: list[str]) -> str:
    for piece in reversed(out):
        if piece:
            return piece[-1]
    return ""


def _escape_end(text: str, at: int, kind: str, escape: str) -> tuple[int, bool]:
    """The escape sequence at ``at`` in an E'' string (``kind`` "e") or after the Unicode
    escape character ``escape``: the index past it, and whether more characters could
    extend it (so a value must not follow it)."""
    nxt = text[at + 1 : at + 2]
    if kind == "e":
        if nxt == "":
            return at + 1, True
        if nxt in _OCTAL:
            end = _run_end(text, at + 1, _OCTAL, 3)
            return end, end - at < 4
        width = {"x": 2, "u": 4, "U": 8}.get(nxt)
        if width is None:
            return at + 2, False  # `\` and any character, a quote or a `$` too
        end = _run_end(text, at + 2, _HEX, width)
        return end, end - at - 2 < width
    if nxt == escape:
        return at + 2, False
    if nxt == "+":
        end = _run_end(text, at + 2, _HEX, 6)
        return end, end - at - 2 < 6
    end = _run_end(text, at + 1, _HEX, 4)
    return end, end - at - 1 < 4


def _run_end(text: str, at: int, chars: frozenset[str], limit: int) -> int:
    end = at
    while end < len(text) and end - at < limit and text[end] in chars:
        end += 1
    return end


def _quoted_end(text: str, at: int, quote: str) -> int:
    """Index just past the quote closing a standard string or identifier whose text starts
    at ``at`` (``''`` and ``""`` are doubled quotes), or the end of the text."""
    i = at
    while (i := text.find(quote, i)) != -1:
        if not text.startswith(quote, i + 1):
            return i + 1
        i += 2
    return len(text)


def _string_end(text: str, at: int) -> int:
    """Index just past the U&'' string whose opening quote is at ``at``, continuation
    segments included."""
    end = _quoted_end(text, at + 1, "'")
    while text[end - 1 : end] == "'" and (gap := _QUOTE_CONTINUE.match(text, end)) is not None:
        if not text.startswith("'", gap.end()):
            break
        end = _quoted_end(text, gap.end() + 1, "'")
    return end


def _uescape(text: str, end: int) -> str | None:
    """The Unicode escape character of the U& literal ending at ``end``: the one named by a
    ``UESCAPE '<c>'`` clause after it, else ``\\``; None if the clause is of another form."""
    keyword = _UESCAPE.match(text, _skip_blank(text, end))
    if keyword is None:
        return "\\"
    literal = _ESCAPE_CHAR.match(text, _skip_blank(text, keyword.end()))
    if literal is None or text.startswith("'", literal.end()):
        return None
    gap = _QUOTE_CONTINUE.match(text, literal.end())
    if gap is not None and text.startswith(("'", "$"), gap.end()):
        return None  # continued, perhaps by a reference
    return literal.group(1)


def _skip_blank(text: str, at: int) -> int:
    """Index of the next token at or after ``at``: whitespace and comments skipped."""
    while at < len(text):
        if text[at] in " \t\n\r\f\v":
            at += 1
        elif text.startswith(("--", "/*"), at):
            at = _comment_end(text, at)
        else:
            break
    return at


def _comment_end(text: str, at: int) -> int:
    """Index just past the comment starting at ``at`` (``--`` to the line end, which is a
    ``\\n`` or a ``\\r``; ``/* */`` nested, as PostgreSQL reads them)."""
    if text.startswith("--", at):
        match = _LINE_END.search(text, at)
        return len(text) if match is None else match.start()
    depth, i = 0, at
    while i < len(text):
        if text.startswith("/*", i):
            depth += 1
            i += 2
        elif text.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return len(text)


_LINE_END = re.compile(r"[\n\r]")


def _parse_suffix(text: str, name: str, at: int) -> _Ref | None:
    """The reference ``$name`` followed by ``text[at:]``, or None if there is none."""
    nxt = text[at : at + 1]
    if nxt == ".":
        after = text[at + 1 : at + 2]
        if after == "*":
            return _Ref(name, "*", null_safe=False, end=at + 2)
        if after in _IDENT_START:
            end = _identifier_end(text, at + 1)
            field = text[at + 1 : end]
            if text.startswith("?", end):
                return _Ref(name, field, null_safe=True, end=end + 1)
            return _Ref(name, field, null_safe=False, end=end)
        # `$x.` + a non-identifier: a bare `$x` followed by the dot.
        return _Ref(name, None, null_safe=False, end=at)
    if nxt == "?":
        return _Ref(name, None, null_safe=True, end=at + 1)
    if nxt == "" or nxt not in _IDENT_CHARS:
        return _Ref(name, None, null_safe=False, end=at)
    return None  # `$ab` is not a reference to `a`


def _row_set(value: object) -> list[object] | None:
    """The rows of a SQL result (`{"rows": [...]}`), or None if it is not one."""
    if isinstance(value, dict):
        rows = value.get("rows")
        if isinstance(rows, list):
            return rows
    return None


def _records(rows: list[object] | None) -> list[dict[str, object]] | None:
    """The rows as row objects, or None unless every row is an object."""
    if rows is None:
        return None
    records = [row for row in rows if isinstance(row, dict)]
    return records if len(records) == len(rows) else None


def _values_cell(value: object) -> str:
    """A value inside the VALUES list of ``$name.*`` (strings typed ``::text``)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _json(value)
    if isinstance(value, str):
        return _quote_literal(value) + "::text"
    return _quote_literal(_json(value)) + "::text"


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _quote_literal(text: str) -> str:
    # Assumes standard_conforming_strings=on (the default since PostgreSQL 9.1), as
    # pg_durable does: backslashes are ordinary characters.
    return "'" + text.replace("'", "''") + "'"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _is_identifier(text: str) -> bool:
    return text != "" and text[0] in _IDENT_START and _identifier_end(text, 0) == len(text)


def _identifier_end(text: str, start: int) -> int:
    end = start
    while end < len(text) and text[end] in _IDENT_CHARS:
        end += 1
    return end
