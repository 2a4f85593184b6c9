"""The incoming-data sensor, evaluated by Dagster on temp dirs: a MovieLens dataset (a folder or loose files)
becomes one run once it is complete and unchanged for the settle interval; half-copied or still-changing data
never starts one; the run is sized by the run config file the settings name; the cursor stops re-firing."""

import os
from pathlib import Path

import dagster as dg
import pytest
import yaml
from pipeline_fixtures import definitions
from test_movielens import write_100k as _write_100k
from test_movielens import write_latest as _write_latest

from pipelines.sensors import INCOMING_ENV, RUN_CONFIG_ENV, SETTLE_ENV, build_incoming_sensor
from pipelines.validation import InvalidSettingsError

REPO = Path(__file__).resolve().parents[1]


class Clock:
    """Seconds the sensor measures the settle interval with; the test moves it."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


# A dataset the recsys task accepts with the job's defaults and with configs/smoke.yaml (the sensor checks
# every setting, the dataset included, before it requests a run): 40 movies, 30 users x 16 ratings.
_GENRES = ["Action", "Comedy", "Drama", "Romance", "Thriller"]
MOVIES = [(m, f"Movie {m} ({1990 + m % 10})", [_GENRES[m % 5], _GENRES[(m // 5) % 5]]) for m in range(1, 41)]
RATINGS = [
    (u, 1 + (u * 7 + j * 3) % 40, float(1 + (u + j) % 5), 1000 + j) for u in range(1, 31) for j in range(16)
]


def write_latest(root: Path) -> Path:
    return _write_latest(root, movies=MOVIES, ratings=RATINGS)


def write_100k(root: Path) -> Path:
    return _write_100k(root, movies=MOVIES, ratings=RATINGS)


@pytest.fixture(scope="module")
def defs_and_instance(tmp_path_factory):
    """One set of definitions and one Dagster instance for the module (building them takes seconds)."""
    defs = definitions(tmp_path_factory.mktemp("workspace"))
    with dg.instance_for_test() as instance:
        yield defs, instance


@pytest.fixture
def env(tmp_path, monkeypatch, defs_and_instance):
    defs, instance = defs_and_instance
    incoming = tmp_path / "incoming"
    monkeypatch.setenv(INCOMING_ENV, str(incoming))
    monkeypatch.setenv(SETTLE_ENV, "30")
    monkeypatch.delenv(RUN_CONFIG_ENV, raising=False)
    clock = Clock()
    sensor = build_incoming_sensor(clock=clock)
    state = {"cursor": None}

    def tick(after: float = 0.0, sensor: dg.SensorDefinition = sensor) -> dg.SensorResult:
        """Advance the clock by ``after`` seconds and evaluate the sensor from the last cursor."""
        clock.now += after
        context = dg.build_sensor_context(instance=instance, cursor=state["cursor"], definitions=defs)
        result = sensor(context)
        state["cursor"] = result.cursor
        return result

    return incoming, tick, defs


def _movielens_config(request: dg.RunRequest) -> dict:
    return request.run_config["ops"]["task_dataset"]["config"]


def _touch(path: Path, seconds: float) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds * 1e9)))


def test_a_folder_fires_once_when_complete_and_settled(env) -> None:
    incoming, tick, defs = env
    assert tick().skip_reason  # the incoming directory does not exist yet

    folder = write_100k(incoming / "ml-100k")
    (folder / "u.item").unlink()  # half-copied: u.data without its u.item
    assert not tick().run_requests
    stalled = tick(after=3600)  # however long it stays that way
    assert not stalled.run_requests and "ml-100k/ lacks u.item" in stalled.skip_reason.skip_message

    write_100k(incoming / "ml-100k")  # the copy completes
    assert not tick().run_requests  # just changed
    early = tick(after=10)
    assert not early.run_requests and "unchanged for 10s of 30s" in early.skip_reason.skip_message
    (request,) = tick(after=20).run_requests
    assert _movielens_config(request) == {
        "task": "recsys",
        "task_options": {"movielens_path": str(folder.resolve())},
    }
    assert (
        request.tags["shapegrpo/layout"] == "100k" and request.tags["shapegrpo/run_config"] == "job defaults"
    )
    assert dg.validate_run_config(defs.resolve_job_def("compare_methods"), request.run_config)

    for after in (0, 60, 3600):  # the same unchanged data never fires again
        assert not tick(after=after).run_requests

    with open(folder / "u.data", "a") as f:  # new ratings arrive: a new run once they have settled
        f.write("4\t30\t3\t900\n")
    assert not tick().run_requests
    (again,) = tick(after=30).run_requests
    assert again.run_key != request.run_key
    assert _movielens_config(again)["task_options"]["movielens_path"] == str(folder.resolve())


def test_data_still_being_written_never_fires(env) -> None:
    incoming, tick, _ = env
    folder = write_latest(incoming / "ml-latest-small")
    ratings = folder / "ratings.csv"
    for step in range(4):  # complete from the start, but growing at every evaluation
        with open(ratings, "a") as f:
            f.write(f"31,{5 + step},3.0,{1000 + step}\n")
        assert not tick(after=40).run_requests
    _touch(ratings, 5)  # same size, new mtime (rewritten in place): still not settled
    assert not tick(after=40).run_requests
    (request,) = tick(after=30).run_requests
    assert request.tags["shapegrpo/layout"] == "latest"


def test_loose_files_and_several_folders_each_make_one_run(env, monkeypatch) -> None:
    incoming, tick, _ = env
    monkeypatch.setenv(SETTLE_ENV, "0")  # the second evaluation of unchanged data fires
    write_latest(incoming)  # loose ratings.csv + movies.csv in the incoming directory itself
    write_100k(incoming / "b")
    (incoming / "notes").mkdir()
    (incoming / "notes" / "README.txt").write_text("not a dataset\n")
    (incoming / "ratings_2026_11.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,1\n")
    (incoming / "half").mkdir()
    (incoming / "half" / "movies.csv").write_text("movieId,title,genres\n")

    assert not tick().run_requests  # all new
    result = tick()
    paths = sorted(_movielens_config(r)["task_options"]["movielens_path"] for r in result.run_requests)
    assert paths == sorted([str(incoming.resolve()), str((incoming / "b").resolve())])
    assert len({r.run_key for r in result.run_requests}) == 2
    # The folder without ratings.csv and the files that form no layout start nothing.
    assert not tick().run_requests
    assert "half/ lacks ratings.csv" in tick().skip_reason.skip_message

    # A file beside the loose dataset that is not part of any layout does not change it.
    (incoming / "ratings_2026_12.csv").write_text("userId,movieId,rating,timestamp\n")
    assert not tick().run_requests and not tick().run_requests


def test_run_size_comes_from_the_named_run_config(env, tmp_path, monkeypatch) -> None:
    incoming, tick, defs = env
    smoke = REPO / "configs" / "smoke.yaml"
    monkeypatch.setenv(RUN_CONFIG_ENV, str(smoke))
    folder = write_latest(incoming / "ml")
    tick()
    (request,) = tick(after=30).run_requests
    expected = yaml.safe_load(smoke.read_text())
    expected["ops"]["task_dataset"]["config"]["task_options"]["movielens_path"] = str(folder.resolve())
    assert request.run_config == expected  # the smoke sizes, and the dataset
    assert request.tags["shapegrpo/run_config"] == str(smoke)
    assert dg.validate_run_config(defs.resolve_job_def("compare_methods"), request.run_config)


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [
        (None, ValueError, "is not a file"),
        ("- just\n- a list\n", ValueError, "must hold a mapping"),
        ("ops: {task_dataset: {config: {task: code}}}\n", ValueError, "sets task 'code'"),
        ("ops: {base_policy: {config: {max_stepz: 3}}}\n", dg.DagsterInvalidConfigError, "max_stepz"),
        ("ops: {fine_tuned_policy: {config: {learning_rate: -1}}}\n", InvalidSettingsError, "learning_rate"),
        (  # settings the dataset cannot satisfy: a run would fail in its first step
            "ops: {task_dataset: {config: {task_options: {holdout: 16}}}}\n",
            InvalidSettingsError,
            "holdout=16",
        ),
    ],
)
def test_a_bad_run_config_fails_the_tick_and_keeps_the_dataset_pending(
    env, tmp_path, monkeypatch, content, error, match
) -> None:
    incoming, tick, _ = env
    config = tmp_path / "sensor_run.yaml"
    if content is not None:
        config.write_text(content)
    monkeypatch.setenv(RUN_CONFIG_ENV, str(config))
    write_latest(incoming / "ml")
    tick()
    with pytest.raises(error, match=match):
        tick(after=30)
    config.write_text("ops: {base_policy: {config: {max_steps: 3}}}\n")  # fixed: the pending dataset runs
    (request,) = tick().run_requests
    assert request.run_config["ops"]["base_policy"]["config"] == {"max_steps": 3}


def test_the_registered_sensor_and_its_settings(env, monkeypatch) -> None:
    incoming, tick, defs = env
    registered = defs.resolve_sensor_def("incoming_data_sensor")  # real clock
    monkeypatch.setenv(SETTLE_ENV, "0")
    write_100k(incoming / "ml")
    old_cursor = '{"u.data": 1.0}'  # the format of the earlier sensor: read as no state
    context = dg.build_sensor_context(
        instance=dg.DagsterInstance.ephemeral(), cursor=old_cursor, definitions=defs
    )
    assert not registered(context).run_requests
    assert not tick(sensor=registered).run_requests
    assert len(tick(sensor=registered).run_requests) == 1
    assert not tick(sensor=registered).run_requests
    monkeypatch.setenv(SETTLE_ENV, "soon")
    with pytest.raises(ValueError, match=f"{SETTLE_ENV}='soon'"):
        tick(sensor=registered)
