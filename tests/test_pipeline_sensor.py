"""The incoming-data sensor: fires on a new file, advances its cursor, never fires twice for the same file."""

import json
import os

import dagster as dg
from pipeline_fixtures import definitions

from pipelines.sensors import INCOMING_ENV


def _tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    sensor = defs.resolve_sensor_def("incoming_data_sensor")
    return sensor(dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs))


def test_sensor_fires_once_per_new_or_changed_file(tmp_path, monkeypatch) -> None:
    incoming = tmp_path / "incoming"
    monkeypatch.setenv(INCOMING_ENV, str(incoming))
    defs = definitions(tmp_path)
    with dg.instance_for_test() as instance:
        first = _tick(defs, instance, None)  # the directory does not exist yet
        assert not first.run_requests and first.skip_reason is not None

        incoming.mkdir()
        (incoming / "ratings_2026_11.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,1\n")
        (incoming / ".partial").write_text("hidden files are ignored")
        second = _tick(defs, instance, first.cursor)
        assert len(second.run_requests) == 1
        request = second.run_requests[0]
        assert request.tags["shapegrpo/new_files"] == "ratings_2026_11.csv"
        assert request.run_key and request.run_config == {}  # not a MovieLens folder: default config
        assert set(json.loads(second.cursor)) == {"ratings_2026_11.csv"}  # the cursor advanced

        third = _tick(defs, instance, second.cursor)  # nothing new: no request for the seen file
        assert not third.run_requests and third.cursor == second.cursor

        (incoming / "more.jsonl").write_text("{}\n")
        fourth = _tick(defs, instance, third.cursor)
        assert [r.tags["shapegrpo/new_files"] for r in fourth.run_requests] == ["more.jsonl"]

        path = incoming / "ratings_2026_11.csv"
        os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 10))  # the same file, rewritten
        fifth = _tick(defs, instance, fourth.cursor)
        assert [r.tags["shapegrpo/new_files"] for r in fifth.run_requests] == ["ratings_2026_11.csv"]
        keys = [r.run_key for r in (request, fourth.run_requests[0], fifth.run_requests[0])]
        assert len(set(keys)) == 3


def test_sensor_points_the_dataset_at_movielens_files(tmp_path, monkeypatch) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,1\n")
    (incoming / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Animation|Comedy\n")
    monkeypatch.setenv(INCOMING_ENV, str(incoming))
    defs = definitions(tmp_path)
    with dg.instance_for_test() as instance:
        result = _tick(defs, instance, None)
    (request,) = result.run_requests
    config = request.run_config["ops"]["task_dataset"]["config"]
    assert config == {"task": "recsys", "task_options": {"movielens_path": str(incoming.resolve())}}
    # The request's run config is valid for the job it launches.
    job = defs.resolve_job_def("compare_methods")
    assert dg.validate_run_config(job, request.run_config)
