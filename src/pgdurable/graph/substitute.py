"""Variable substitution in step text (spec §7.5).

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
So the template is read the way PostgreSQL's lexer reads it, and a reference is written for
the place it stands in: in code, a literal; inside a quoted string, the value's text with
quotes (and, in ``E''`` strings, backslashes) doubled; inside a quoted identifier, with ``"``
doubled; inside a comment, not at all. Dollar-quoted text (a ``DO`` or function body) is read
as code again, and a value that contains the closing ``$tag$`` is refused.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass

from .truth import parse_result

__all__ = ["MAX_EXPANDED_ROWS", "SubstitutionError", "substitute_raw", "substitute_sql"]

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
    submitter's ``df.vars``. Raises :class:`SubstitutionError` with the spec's error text.
    """
    text = _substitute_braces(template, variables, instance_id, label)
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
        # Where the reference being rendered stands (SQL mode): "code", "string", "estring"
        # (backslash escapes), "ident"; and the dollar quotes around it.
        self.context = "code"
        self.tags: tuple[str, ...] = ()

    def run_sql(self, text: str, tags: tuple[str, ...] = ()) -> str:
        """Pass 2 in SQL mode: each stretch of ``text`` rendered for its lexical context."""
        out: list[str] = []
        code_from = 0
        i, n = 0, len(text)

        def code_until(end: int) -> None:
            out.append(self._run_in("code", tags, text[code_from:end]))

        while i < n:
            c = text[i]
            if c == "$":
                tag = _DOLLAR_TAG.match(text, i)
                # A reference wins over a dollar quote of the same spelling ($r$r is two
                # references): it is replaced, so PostgreSQL never sees that tag.
                if (
                    tag is None
                    or self._parse(text, i + 1) is not None
                    or _after_identifier(text, i)
                ):
                    i += 1
                    continue
                code_until(i)
                delimiter = tag.group()
                close = text.find(delimiter, tag.end())
                body_end = n if close == -1 else close
                out.append(delimiter)
                out.append(self.run_sql(text[tag.end() : body_end], (*tags, delimiter)))
                i = code_from = n if close == -1 else close + len(delimiter)
                out.append(text[body_end:i])
            elif c in "'\"":
                context = "ident" if c == '"' else "estring" if _escapes(text, i) else "string"
                end, closed = _quoted_end(text, i + 1, c, backslashes=context == "estring")
                code_until(i)
                inner_end = end - 1 if closed else end
                out.append(c + self._run_in(context, tags, text[i + 1 : inner_end]))
                out.append(text[inner_end:end])
                i = code_from = end
            elif text.startswith("--", i) or text.startswith("/*", i):
                end = _comment_end(text, i)
                code_until(i)
                out.append(text[i:end])  # references in comments are left alone
                i = code_from = end
            else:
                i += 1
        code_until(n)
        return "".join(out)

    def _run_in(self, context: str, tags: tuple[str, ...], text: str) -> str:
        self.context, self.tags = context, tags
        return self.run(text)

    def run(self, text: str) -> str:
        """Pass 2 over text of one context: replace each reference."""
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
            return self._rows(ref.name, records)
        if ref.field is None:
            return self._first_column(ref, value, rows)
        return self._field(ref, ref.field, value, rows)

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
                return "NULL"
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
                return "NULL"
            available = ", ".join(sorted(record))
            raise SubstitutionError(
                f"${ref.name}.{field}: result has no field '{field}' (available: {available})"
            )
        cell = record[field]
        if cell is None:
            if ref.null_safe:
                return "NULL"
            raise SubstitutionError(f"${ref.name}.{field} is NULL")
        return self._scalar(cell)

    def _no_rows(self, ref: _Ref) -> str:
        if ref.null_safe:
            return "NULL"
        raise SubstitutionError(f"${ref.name} has no rows — query returned zero results")

    # -- rendering ------------------------------------------------------------------------

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
        if self.context == "code":
            text = literal
        elif self.context == "ident":
            text = raw.replace('"', '""')
        elif self.context == "estring":
            text = raw.replace("\\", "\\\\").replace("'", "''")
        else:
            text = raw.replace("'", "''")
        for tag in self.tags:
            if tag in text:
                raise SubstitutionError(
                    f"a substituted value contains {tag}, which would end the dollar-quoted"
                    " text around its reference"
                )
        return text

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


def _after_identifier(text: str, at: int) -> bool:
    # `a$b$` is one identifier to PostgreSQL, not a dollar quote.
    return at > 0 and (
        text[at - 1] in _IDENT_CHARS or text[at - 1] in "$" or text[at - 1] >= "\x80"
    )


def _escapes(text: str, quote: int) -> bool:
    """Whether the string starting at ``quote`` reads backslash escapes: E'...' or U&'...'."""

    def starts_word(at: int) -> bool:
        return at == 0 or not (text[at - 1] in _IDENT_CHARS or text[at - 1] >= "\x80")

    if quote >= 1 and text[quote - 1] in "eE" and starts_word(quote - 1):
        return True
    return quote >= 2 and text[quote - 2 : quote] in ("U&", "u&") and starts_word(quote - 2)


def _quoted_end(text: str, at: int, quote: str, *, backslashes: bool) -> tuple[int, bool]:
    """Index just past the quote closing the text that starts at ``at``, and whether there
    was one (else the text runs to the end)."""
    i = at
    while i < len(text):
        c = text[i]
        if backslashes and c == "\\":
            i += 2
        elif c == quote:
            if text.startswith(quote, i + 1):
                i += 2  # a doubled quote
            else:
                return i + 1, True
        else:
            i += 1
    return len(text), False


def _comment_end(text: str, at: int) -> int:
    """Index just past the comment starting at ``at`` (``--`` to the line end; ``/* */``
    nested, as PostgreSQL reads them)."""
    if text.startswith("--", at):
        newline = text.find("\n", at)
        return len(text) if newline == -1 else newline
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
