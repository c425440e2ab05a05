"""Fixtures for the fault-injection tests; the helpers live in fault_helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from fault_helpers import FaultRuns


@pytest.fixture(scope="session")
def fault_runs(tiny_llama_dir, tmp_path_factory) -> FaultRuns:
    recipe = tmp_path_factory.mktemp("fault-recipe") / "recipe.yaml"
    recipe.write_text("{}\n")
    return FaultRuns(recipe, tiny_llama_dir)


@pytest.fixture(scope="session")
def reference_run(fault_runs, tmp_path_factory) -> Path:
    """An uninterrupted run of the fault tests' command."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = fault_runs.run(fault_runs.args(run_dir, "--no-eval"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir
