"""What ``pgdurable ls``, ``show``, ``watch``, ``cancel`` and ``signal`` do.

``queries`` calls df's own SQL functions on a connection of the user's (so row-level
security scopes everything exactly as in psql); ``render`` turns their rows into terminal
output or JSON and does no I/O.
"""
