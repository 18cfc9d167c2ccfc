"""Everything pgdurable installs, read back from PostgreSQL's catalog as comparable data.

`snapshot(conn)` describes every object in pgdurable's schemas (df, _duroxide, and dblink's
own schema when pgdurable installed it) and the DSL operators wherever they live: tables and
their columns, constraints, indexes, triggers, row-level security policies, functions with
their full definitions, operators, types, extensions, owners, privileges and comments, and
the version row. Two databases with equal snapshots have the same pgdurable schema; the
upgrade test compares an upgraded database with a fresh install this way.

Privileges are compared as sets (an upgrade may grant in another order), columns by position
among the live ones (an upgrade may have dropped some), never by oid or attnum.
"""

from __future__ import annotations

from typing import Any

import psycopg

SCHEMAS = ("df", "_duroxide", "_pgdurable_dblink")

# A sorted text[] of an aclitem[]: grants in any order compare equal.
_ACL = "(SELECT array_agg(a::text ORDER BY a::text) FROM unnest({}) AS a)"

_QUERIES: dict[str, str] = {
    "schemas": f"""
        SELECT n.nspname, pg_get_userbyid(n.nspowner), {_ACL.format("n.nspacl")},
               obj_description(n.oid, 'pg_namespace')
          FROM pg_namespace n WHERE n.nspname = ANY (%(schemas)s)""",
    "relations": f"""
        SELECT c.oid::regclass::text, c.relkind, pg_get_userbyid(c.relowner),
               {_ACL.format("c.relacl")}, c.reloptions, c.relrowsecurity,
               c.relforcerowsecurity, c.relpersistence, c.relreplident,
               obj_description(c.oid, 'pg_class'),
               CASE WHEN c.relkind = 'i' THEN pg_get_indexdef(c.oid) END,
               CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = ANY (%(schemas)s)""",
    "columns": f"""
        SELECT c.oid::regclass::text,
               row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum),
               a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated,
               (SELECT co.collname FROM pg_collation co
                 WHERE co.oid = a.attcollation AND a.attcollation <> 100),
               {_ACL.format("a.attacl")}, col_description(c.oid, a.attnum)
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE n.nspname = ANY (%(schemas)s) AND a.attnum > 0 AND NOT a.attisdropped
           AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c')""",
    "constraints": """
        SELECT co.conrelid::regclass::text, co.conname, co.contype,
               pg_get_constraintdef(co.oid), co.condeferrable, co.condeferred,
               co.convalidated, obj_description(co.oid, 'pg_constraint')
          FROM pg_constraint co JOIN pg_namespace n ON n.oid = co.connamespace
         WHERE n.nspname = ANY (%(schemas)s)""",
    "triggers": """
        SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled,
               obj_description(t.oid, 'pg_trigger')
          FROM pg_trigger t
          JOIN pg_class c ON c.oid = t.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = ANY (%(schemas)s) AND NOT t.tgisinternal""",
    "policies": """
        SELECT p.schemaname || '.' || p.tablename, p.policyname, p.permissive, p.roles::text,
               p.cmd, p.qual, p.with_check
          FROM pg_policies p WHERE p.schemaname = ANY (%(schemas)s)""",
    "rules": """
        SELECT r.schemaname || '.' || r.tablename, r.rulename, r.definition
          FROM pg_rules r WHERE r.schemaname = ANY (%(schemas)s)""",
    "functions": f"""
        SELECT p.oid::regprocedure::text, p.prokind, pg_get_userbyid(p.proowner),
               {_ACL.format("p.proacl")}, obj_description(p.oid, 'pg_proc'),
               CASE WHEN p.prokind <> 'a' THEN pg_get_functiondef(p.oid) END
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = ANY (%(schemas)s)
           AND NOT EXISTS (SELECT 1 FROM pg_depend d
                            WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                              AND d.deptype = 'e')""",
    # The DSL operators: in pg_catalog when a superuser installed, else in df.
    "operators": """
        SELECT o.oprnamespace::regnamespace::text, o.oprname, o.oprleft::regtype::text,
               o.oprright::regtype::text, o.oprcode::regprocedure::text,
               pg_get_userbyid(o.oprowner), obj_description(o.oid, 'pg_operator')
          FROM pg_operator o
          JOIN pg_proc p ON p.oid = o.oprcode
          JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = ANY (%(schemas)s)""",
    "types": """
        SELECT t.oid::regtype::text, t.typtype, pg_get_userbyid(t.typowner),
               obj_description(t.oid, 'pg_type')
          FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE n.nspname = ANY (%(schemas)s)
           AND (t.typtype IN ('e', 'd', 'r', 'm')
                OR (t.typtype = 'c' AND (SELECT c.relkind FROM pg_class c
                                          WHERE c.oid = t.typrelid) = 'c'))""",
    "extensions": """
        SELECT e.extname, e.extnamespace::regnamespace::text
          FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
         WHERE n.nspname = ANY (%(schemas)s)""",
    "default_privileges": f"""
        SELECT pg_get_userbyid(d.defaclrole), d.defaclobjtype, {_ACL.format("d.defaclacl")}
          FROM pg_default_acl d JOIN pg_namespace n ON n.oid = d.defaclnamespace
         WHERE n.nspname = ANY (%(schemas)s)""",
}

# Rows that are part of the schema's definition, not of its use.
_DATA: dict[str, str] = {
    "version": "SELECT release, migration FROM df._schema",
    "retention": "SELECT singleton FROM df._retention",
}

Snapshot = dict[str, list[tuple[Any, ...]]]


def _row(values: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(tuple(v) if isinstance(v, list) else v for v in values)


def snapshot(conn: psycopg.Connection[Any]) -> Snapshot:
    """Every object of pgdurable's schemas in the connected database, sorted by category."""
    found: Snapshot = {}
    for category, query in _QUERIES.items():
        rows = conn.execute(query, {"schemas": list(SCHEMAS)}).fetchall()
        found[category] = sorted((_row(r) for r in rows), key=repr)
    for category, query in _DATA.items():
        found[category] = sorted((_row(r) for r in conn.execute(query).fetchall()), key=repr)
    return found


def differences(a: Snapshot, b: Snapshot) -> list[str]:
    """What one snapshot has that the other lacks, one line per object, '-' for a, '+' for b."""
    lines: list[str] = []
    for category in sorted(set(a) | set(b)):
        left, right = set(a.get(category, [])), set(b.get(category, []))
        lines += [f"{category} - {row!r}" for row in sorted(left - right, key=repr)]
        lines += [f"{category} + {row!r}" for row in sorted(right - left, key=repr)]
    return lines
