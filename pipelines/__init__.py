"""Orchestration of ShapE-GRPO with Dagster (assets, checks, jobs, schedule, sensor) and MLflow (tracking and
registry). ``dagster dev -m pipelines`` / ``dagster job execute -m pipelines -j compare_methods``."""

import warnings

import dagster as dg

# backfill_policy (one run covering every method partition) is beta in Dagster 1.13; the jobs rely on it.
warnings.filterwarnings("ignore", category=dg.BetaWarning)

from pipelines.definitions import build_definitions, build_resources, defs  # noqa: E402

__all__ = ["build_definitions", "build_resources", "defs"]
