"""The test session's fixture plugins; shared helpers live in plain modules (tests/helpers.py)."""

pytest_plugins = ["tests.fix_database", "tests.fix_otlp", "tests.fix_prometheus"]
