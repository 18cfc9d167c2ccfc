"""Freeze the schema of this release: write what a fresh install runs to tests/schema/.

Run once, when a release is made: tests/test_upgrade.py then installs that file and upgrades
it with every later version of the code, which must reach what a fresh install creates.
"""

from pathlib import Path

from pgdurable import __version__, schema

target = (
    Path(__file__).resolve().parent.parent / "tests" / "schema" / f"pgdurable-{__version__}.sql"
)
target.write_text(
    f"-- The schema pgdurable {__version__} installs: frozen when it was released, never"
    " edited.\n" + schema.fresh_install_script(),
    encoding="utf-8",
)
print(f"wrote {target}")
