"""Benchmarks behind ``theorylab bench``: each module has ``run(quick) -> dict`` and ``format_table(dict)``."""
