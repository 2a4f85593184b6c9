"""``shapegrpo-resume RUN_ID``: continue a pipeline run that was killed or failed, from where it stopped.

A run whose process was killed (SIGKILL, OOM, a closed terminal) stays STARTED in Dagster's run storage:
nothing is left to report its end, and Dagster refuses to re-execute a run that is not failed or canceled.
This command

1. marks such a run FAILED, after checking that the process that executed it (the pid in its "Executing steps
   in process" event) is gone from this machine;
2. re-executes it "from failure" in this process, as the UI's *Re-execute → From failure* does: the steps that
   succeeded are not run again, and the new run belongs to the same root run, so it reads that root run's
   stored values and directories. Training resumes from each method's last complete checkpoint, into the
   same MLflow run; methods that had finished keep their run and model version.

Run it with the environment of the original run (``DAGSTER_HOME``, ``SHAPEGRPO_DATA_DIR``,
``MLFLOW_TRACKING_URI``, ...). Exit status 0 when the resumed run succeeds.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import dagster as dg

_PID_RE = re.compile(r"\(pid: (\d+)\)")
_UNFINISHED = (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING)


def worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The pid of the process that executed the run's steps, from its engine events (None if not recorded)."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records
    for record in records:
        match = _PID_RE.search(record.event_log_entry.user_message or "")
        if match:
            return int(match.group(1))
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; it only waits for its parent to reap it.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def mark_killed_run_failed(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """Mark an unfinished run whose process is gone FAILED; False when it was not unfinished. Raises
    ``RuntimeError`` when its process is still alive."""
    if run.status not in _UNFINISHED:
        return False
    pid = worker_pid(instance, run.run_id)
    if pid is not None and _alive(pid):
        raise RuntimeError(f"run {run.run_id} is still executing in process {pid}; stop it first")
    instance.report_run_failed(run, f"marked failed by shapegrpo-resume: its process (pid {pid}) is gone")
    return True


def resume(run_id: str, instance: dg.DagsterInstance) -> dg.DagsterRunStatus:
    """Mark ``run_id`` failed if it was killed, re-execute it from failure; the new run's final status."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    run = instance.get_run_by_id(run_id)
    if run is None:
        raise ValueError(f"no run {run_id!r} in the Dagster instance at {instance.root_directory}")
    if run.status == dg.DagsterRunStatus.SUCCESS:
        raise ValueError(f"run {run_id} succeeded; there is nothing to resume")
    mark_killed_run_failed(instance, run)
    job = ReconstructableRepository.for_module("pipelines", "defs").get_reconstructable_job(run.job_name)
    options = dg.ReexecutionOptions.from_failure(run_id, instance)
    with dg.execute_job(job, instance=instance, reexecution_options=options, raise_on_error=False) as result:
        print(f"resumed {run_id} as run {result.run_id}: {'success' if result.success else 'failure'}")
        return result.dagster_run.status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shapegrpo-resume", description=__doc__.splitlines()[0])
    parser.add_argument("run_id", help="the Dagster run to resume (the killed or failed one)")
    args = parser.parse_args(argv)
    with dg.DagsterInstance.get() as instance:
        try:
            status = resume(args.run_id, instance)
        except (ValueError, RuntimeError) as err:
            print(f"shapegrpo-resume: {err}", file=sys.stderr)
            return 2
    return 0 if status == dg.DagsterRunStatus.SUCCESS else 1


if __name__ == "__main__":
    sys.exit(main())
