"""The peers' servers under test: each serves ``GET /events`` and ``POST /publish``.

Each is written in its library's idiomatic form (the recipe its documentation
shows), and runs in its own process; none is imported by the bench itself.
"""
