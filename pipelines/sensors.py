"""A sensor that retrains when a MovieLens dataset lands in the incoming directory, once it is fully copied.

Settings, read at every evaluation so that tests and deployments can change them without a reload:

    SHAPEGRPO_INCOMING_DIR             where datasets land (default ``data/incoming``)
    SHAPEGRPO_SENSOR_SETTLE_SECONDS    how long a dataset must stay unchanged before a run (default 60)
    SHAPEGRPO_SENSOR_RUN_CONFIG        a YAML run config of ``compare_methods`` (e.g. ``configs/smoke.yaml``)
                                       that sizes the runs the sensor starts; unset = the job's defaults

A *dataset* is a subfolder of the incoming directory, or the loose MovieLens files directly in it. It is
complete when it holds every file of one MovieLens layout (``ratings.csv`` + ``movies.csv``, or ``u.data`` +
``u.item``) and settled when the size and mtime of every file in it (for loose files: of its MovieLens files)
were the same at two evaluations at least the settle interval apart. A complete, settled dataset becomes
exactly one run of ``compare_methods`` whose ``task_dataset`` reads it (task ``recsys``,
``task_options.movielens_path``), on top of the sizing run config. Files that form no MovieLens layout never
start a run (the skip reason names what is missing), so a ``u.data`` without its ``u.item``, or a folder still
being copied, waits. A sizing file that is not a valid run config of the job fails the tick (the dataset stays
pending and runs once the file is fixed), never a run.

The cursor (JSON) holds, per dataset, the fingerprint (hash of every file's path, size and mtime) first seen
and when, and the fingerprint of the last run started: the same unchanged data never starts a second run,
changed data starts a new one once it has settled again. Run keys are derived from the dataset and its
fingerprint, so Dagster itself also drops a repeated request.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from pipelines.validation import require_valid_settings
from shapegrpo_core.tasks import movielens

INCOMING_ENV = "SHAPEGRPO_INCOMING_DIR"
DEFAULT_INCOMING = "data/incoming"
SETTLE_ENV = "SHAPEGRPO_SENSOR_SETTLE_SECONDS"
DEFAULT_SETTLE_SECONDS = 60.0
RUN_CONFIG_ENV = "SHAPEGRPO_SENSOR_RUN_CONFIG"
JOB_NAME = "compare_methods"
LOOSE = "."  # the name of the dataset formed by the loose files of the incoming directory
CURSOR_VERSION = 2


def incoming_dir() -> Path:
    return Path(os.environ.get(INCOMING_ENV, DEFAULT_INCOMING))


def settle_seconds() -> float:
    raw = os.environ.get(SETTLE_ENV, str(DEFAULT_SETTLE_SECONDS))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{SETTLE_ENV}={raw!r} is not a number of seconds") from None
    if not value >= 0.0:
        raise ValueError(f"{SETTLE_ENV}={raw!r} must be >= 0")
    return value


@dataclass(frozen=True)
class Dataset:
    """One candidate dataset of the incoming directory, as seen at one evaluation."""

    name: str  # subfolder name, or LOOSE
    path: Path
    layout: str | None  # the complete MovieLens layout it holds, else None
    missing: tuple[str, ...]  # files still missing for the nearest layout (empty when complete)
    fingerprint: str  # hash of (relative path, size, mtime_ns) of every file in it
    num_files: int
    num_bytes: int


def _files(folder: Path, recursive: bool) -> list[Path]:
    """Every regular file of ``folder``, hidden ones too (an rsync temp file means a copy is running)."""
    entries = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in entries if p.is_file())


def _layout(names: set[str]) -> tuple[str | None, tuple[str, ...]]:
    """(complete layout or None, files missing for the layout with most files present)."""
    best: tuple[int, str, tuple[str, ...]] | None = None
    for layout, files in movielens.LAYOUT_FILES.items():
        missing = tuple(f for f in files if f not in names)
        if not missing:
            return layout, ()
        present = len(files) - len(missing)
        if present and (best is None or present > best[0]):
            best = (present, layout, missing)
    return None, (best[2] if best else ())


def describe(name: str, folder: Path, recursive: bool) -> Dataset | None:
    """The dataset at ``folder``, or None when it holds no file of any MovieLens layout."""
    files = _files(folder, recursive)
    names = {p.name for p in files if p.parent == folder}
    layout, missing = _layout(names)
    if layout is None and not missing:
        return None
    stats = []
    for p in files:
        try:
            stats.append((p.relative_to(folder).as_posix(), p.stat()))
        except FileNotFoundError:  # renamed or removed since the listing (a copy tool at work)
            stats.append((p.relative_to(folder).as_posix() + " (vanished)", None))
    if not recursive:  # loose files: only the MovieLens files belong to the dataset
        known = {f for fs in movielens.LAYOUT_FILES.values() for f in fs} | {"u.genre"}
        stats = [(rel, st) for rel, st in stats if rel in known]
    entries = [(rel, st.st_size, st.st_mtime_ns) if st else (rel,) for rel, st in stats]
    digest = hashlib.sha256(json.dumps(entries).encode())
    return Dataset(
        name=name,
        path=folder,
        layout=layout,
        missing=missing,
        fingerprint=digest.hexdigest()[:16],
        num_files=len(stats),
        num_bytes=sum(st.st_size for _, st in stats if st),
    )


def scan(directory: Path) -> dict[str, Dataset]:
    """Datasets of the incoming directory: each visible subfolder and the loose files (absent dir: none)."""
    if not directory.is_dir():
        return {}
    found: dict[str, Dataset] = {}
    for entry in sorted(directory.iterdir()):
        if entry.is_dir() and not entry.name.startswith("."):
            dataset = describe(entry.name, entry, recursive=True)
            if dataset is not None:
                found[entry.name] = dataset
    loose = describe(LOOSE, directory, recursive=False)
    if loose is not None:
        found[LOOSE] = loose
    return found


def load_run_config() -> tuple[dict[str, Any], str]:
    """The sizing run config named by $SHAPEGRPO_SENSOR_RUN_CONFIG (empty when unset), and its source."""
    raw = os.environ.get(RUN_CONFIG_ENV, "").strip()
    if not raw:
        return {}, "job defaults"
    path = Path(raw)
    if not path.is_file():
        raise ValueError(f"{RUN_CONFIG_ENV}={raw!r} is not a file")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{RUN_CONFIG_ENV}={raw!r} is not valid YAML: {e}") from None
    if config is None:
        return {}, str(path)
    if not isinstance(config, dict):
        raise ValueError(
            f"{RUN_CONFIG_ENV}={raw!r} must hold a mapping (a run config), got {type(config).__name__}"
        )
    return config, str(path)


def run_config_for(dataset: Dataset, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with task_dataset pointed at the dataset (task recsys); other settings kept as given."""
    config = json.loads(json.dumps(base))  # a deep copy of plain YAML data
    ops = config.setdefault("ops", {})
    dataset_config = ops.setdefault("task_dataset", {}).setdefault("config", {})
    task = dataset_config.get("task", "recsys")
    if task != "recsys":
        raise ValueError(
            f"{RUN_CONFIG_ENV} sets task {task!r}, but a MovieLens dataset is read by task 'recsys'"
        )
    dataset_config["task"] = "recsys"
    options = dict(dataset_config.get("task_options") or {})
    options["movielens_path"] = str(dataset.path.resolve())
    dataset_config["task_options"] = options
    return config


def _read_cursor(cursor: str | None) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(seen: name -> {fingerprint, since}, fired: name -> fingerprint); an older format starts afresh."""
    state = json.loads(cursor) if cursor else {}
    if state.get("version") != CURSOR_VERSION:
        return {}, {}
    return dict(state["seen"]), dict(state["fired"])


def _write_cursor(seen: dict[str, dict[str, Any]], fired: dict[str, str]) -> str:
    return json.dumps({"version": CURSOR_VERSION, "seen": seen, "fired": fired}, sort_keys=True)


def _request(dataset: Dataset, run_config: dict[str, Any], source: str) -> dg.RunRequest:
    key = hashlib.sha256(f"{dataset.name}\0{dataset.fingerprint}".encode()).hexdigest()[:16]
    return dg.RunRequest(
        run_key=f"incoming-{key}",
        run_config=run_config,
        tags={
            "shapegrpo/trigger": "incoming_data",
            "shapegrpo/dataset": str(dataset.path.resolve())[:1000],
            "shapegrpo/layout": str(dataset.layout),
            "shapegrpo/fingerprint": dataset.fingerprint,
            "shapegrpo/run_config": source[:1000],
        },
    )


def build_incoming_sensor(
    name: str = "incoming_data_sensor",
    job_name: str = JOB_NAME,
    minimum_interval_seconds: int = 60,
    clock: Callable[[], float] = time.time,
) -> dg.SensorDefinition:
    """The incoming-data sensor; ``clock`` (seconds) is what the settle interval is measured with."""

    @dg.sensor(
        name=name,
        job_name=job_name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=f"A MovieLens dataset (folder or loose files) in ${INCOMING_ENV} "
        f"(default {DEFAULT_INCOMING}), complete and unchanged for ${SETTLE_ENV} seconds -> one "
        f"{job_name} run sized by ${RUN_CONFIG_ENV}.",
    )
    def incoming_data_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        directory, settle, now = incoming_dir(), settle_seconds(), clock()
        seen, fired = _read_cursor(context.cursor)
        current = scan(directory)
        # Forget datasets that were removed, so one dropped again later is new.
        seen = {k: v for k, v in seen.items() if k in current}
        fired = {k: v for k, v in fired.items() if k in current}
        ready: list[Dataset] = []
        waiting: list[str] = []
        for key, dataset in current.items():
            label = f"{directory}/" if key == LOOSE else f"{key}/"
            if seen.get(key, {}).get("fingerprint") != dataset.fingerprint:
                seen[key] = {"fingerprint": dataset.fingerprint, "since": now}
                waiting.append(f"{label} new or changing")
            elif fired.get(key) == dataset.fingerprint:
                continue  # this exact data already started its run
            elif dataset.layout is None:
                waiting.append(f"{label} lacks {', '.join(dataset.missing)}")
            elif now - seen[key]["since"] < settle:
                waiting.append(f"{label} unchanged for {now - seen[key]['since']:.0f}s of {settle:.0f}s")
            else:
                ready.append(dataset)
        requests = []
        if ready:
            base, source = load_run_config()
            job = context.repository_def.get_job(job_name) if context.repository_def else None
            for dataset in ready:
                run_config = run_config_for(dataset, base)
                if job is not None:
                    # A bad sizing file fails this tick (and keeps the dataset pending), never a run.
                    dg.validate_run_config(job, run_config)
                require_valid_settings(run_config)  # ranges, task options, the dataset itself
                requests.append(_request(dataset, run_config, source))
                fired[dataset.name] = dataset.fingerprint
                context.log.info(
                    f"dataset {dataset.path} ({dataset.layout}, {dataset.num_files} files, "
                    f"{dataset.num_bytes} bytes) settled -> {job_name} with {source}"
                )
        cursor = _write_cursor(seen, fired)
        if not requests:
            reason = "; ".join(waiting) if waiting else f"no new MovieLens dataset in {directory}"
            return dg.SensorResult(skip_reason=reason[:2000], cursor=cursor)
        return dg.SensorResult(run_requests=requests, cursor=cursor)

    return incoming_data_sensor


incoming_data_sensor = build_incoming_sensor()
all_sensors = [incoming_data_sensor]
