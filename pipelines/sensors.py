"""A sensor that refreshes the data and retrains when new files land in the incoming directory.

The directory is ``$SHAPEGRPO_INCOMING_DIR`` (default ``data/incoming``), read at every evaluation so that
tests and deployments can point it elsewhere. The cursor is the JSON map {file name: mtime} of files already
seen; a file is new when its name is not in the cursor or its mtime changed. One run request covers all new
files of a tick, with a run key derived from them, so a file never triggers twice.

When the directory holds a MovieLens dataset (``ratings.csv`` + ``movies.csv``, or ``u.data`` + ``u.item``)
the run rebuilds the recsys task from it; other files are recorded in the run's tags and the run uses its
defaults.
"""

import hashlib
import json
import os
from pathlib import Path

import dagster as dg

from shapegrpo_core.tasks import movielens

INCOMING_ENV = "SHAPEGRPO_INCOMING_DIR"
DEFAULT_INCOMING = "data/incoming"


def incoming_dir() -> Path:
    return Path(os.environ.get(INCOMING_ENV, DEFAULT_INCOMING))


def scan(directory: Path) -> dict[str, float]:
    """Visible regular files directly in ``directory`` -> mtime (an absent directory has none)."""
    if not directory.is_dir():
        return {}
    return {
        p.name: p.stat().st_mtime
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


def run_config_for(directory: Path) -> dict:
    """Run config that points the dataset at ``directory`` when it holds MovieLens files, else none."""
    try:
        movielens.detect_layout(directory)
    except ValueError:
        return {}
    options = {"movielens_path": str(directory.resolve())}
    return {"ops": {"task_dataset": {"config": {"task": "recsys", "task_options": options}}}}


@dg.sensor(
    name="incoming_data_sensor",
    job_name="compare_methods",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="New or changed files in $SHAPEGRPO_INCOMING_DIR (default data/incoming) -> refresh the "
    "dataset and retrain/compare every method (compare_methods).",
)
def incoming_data_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    directory = incoming_dir()
    seen: dict[str, float] = json.loads(context.cursor) if context.cursor else {}
    current = scan(directory)
    new = {name: mtime for name, mtime in current.items() if seen.get(name) != mtime}
    cursor = json.dumps({**seen, **current}, sort_keys=True)
    if not new:
        return dg.SensorResult(skip_reason=f"no new files in {directory}", cursor=cursor)
    key = hashlib.sha256(json.dumps(sorted(new.items())).encode()).hexdigest()[:16]
    request = dg.RunRequest(
        run_key=f"incoming-{key}",
        run_config=run_config_for(directory),
        tags={"shapegrpo/trigger": "incoming_data", "shapegrpo/new_files": ",".join(sorted(new))[:1000]},
    )
    context.log.info(f"{len(new)} new file(s) in {directory}: {sorted(new)}")
    return dg.SensorResult(run_requests=[request], cursor=cursor)


all_sensors = [incoming_data_sensor]
