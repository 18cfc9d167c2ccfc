"""``python -m pgdurable`` is the ``pgdurable`` command."""

from .cli import main

main()
