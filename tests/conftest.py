"""Shared fixtures. The tests mirror the code: tests/engine, models, data, toy, maps (extract/<subpackage>),
tests/core (analysis/core), tests/reports (the rest of analysis/), and at the top level the modules of
extract/ itself (score, evaluate, domains), the command line, the workflow and the layout rules. Helpers
every directory uses live here beside this file: tiny.py (tiny random models of real config classes),
tiny_tokenizer.py, reference.py (the naive eager oracle), fakes.py (small inputs in the real formats),
browser.py (headless Chromium over the DevTools protocol)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import functools
import os

import pytest


@pytest.fixture(scope="session")
def zoo_model():
    """Load a zoo model once per session: ``zoo_model(name) -> (model, tokenizer)``."""
    from extract.models.load import load_model

    return functools.lru_cache(maxsize=None)(lambda name: load_model(name))


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``optional`` unless DORMANT_RUN_OPTIONAL=1."""
    if os.environ.get("DORMANT_RUN_OPTIONAL") == "1":
        return
    skip = pytest.mark.skip(reason="optional (very slow): set DORMANT_RUN_OPTIONAL=1 to run")
    for item in items:
        if "optional" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    """A run that collects no tests fails loudly (exit 1) instead of pytest's ambiguous exit code 5."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.config.get_terminal_writer().line("error: no tests were collected or selected", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
