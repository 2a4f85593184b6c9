"""The method partitions: one fine-tuned policy (and one evaluation) per credit-allocation method."""

from __future__ import annotations

import dagster as dg

from pipelines.config import METHODS

method_partitions = dg.StaticPartitionsDefinition(list(METHODS))

# Run tags that make a run cover every method partition at once (a single-run backfill): jobs carry them so
# that `dagster job execute -j compare_methods` trains and evaluates all methods in one run, in one process.
ALL_METHODS_TAGS = {
    "dagster/asset_partition_range_start": METHODS[0],
    "dagster/asset_partition_range_end": METHODS[-1],
}
