"""Training outside the step's process: one training on 1 and on 2 CPU processes (torchrun, gloo) samples the
same completions and trains on the same advantages; ``fine_tuned_policy`` through Dagster Pipes as a
subprocess and as 2 torchrun processes logs the same MLflow history, each step once; launches that would run
another number of processes than asked for are refused; ``compare_methods`` under the multiprocess executor
gives the in-process comparison; the deploy/ configs build the exact launch argv and Kubernetes pod.
Real processes, real TRL and Dagster, tiny sizes, temporary directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from pipeline_fixtures import definitions, mlflow_resource, smoke_run_config, subprocess_env, workspace
from trainer_fixtures import tiny_warm_start

from pipelines.assets.policies import LAUNCH_SETTINGS
from pipelines.config import METHODS
from pipelines.resources import (
    GPU_RESOURCE,
    TRAIN_ENTRY_MODULE,
    LaunchConfigError,
    TrainingLauncherResource,
    pipes_k8s_request,
)
from pipelines.tracking import TAG_ROOT_RUN, TAG_STAGE, find_runs
from pipelines.validation import InvalidSettingsError, launcher_problems

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
DEPLOY = REPO / "deploy"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _env(**settings: str) -> dict[str, str]:
    """A child's environment: this checkout (and tests/) first on the import path, one thread."""
    return subprocess_env(PYTHONPATH=f"{REPO}{os.pathsep}{TESTS}", **settings)


# ------------------------------------------------------------------------------------------------------------
# 1 process vs 2 processes: same completions, credit and advantages for the same global batch
# ------------------------------------------------------------------------------------------------------------


def _worker_run(policy: Path, out: Path, nproc: int, sampling: str = "row_seeded") -> list[dict[str, Any]]:
    """tests/distributed_worker.py on ``nproc`` torchrun processes; each rank's record."""
    out.mkdir(parents=True)
    worker = [str(TESTS / "distributed_worker.py"), str(policy), str(out), sampling]
    cmd = [*TORCHRUN, "--nproc_per_node", str(nproc), *worker]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_one_and_two_cpu_processes_train_alike(tmp_path) -> None:
    policy = tiny_warm_start()
    (one,) = _worker_run(policy, tmp_path / "one", 1)
    two = _worker_run(policy, tmp_path / "two", 2)
    assert [r["world_size"] for r in (one, *two)] == [1, 2, 2]

    assert len(one["generations"]) == 2 and all(len(r["generations"]) == 2 for r in two)
    for step, single in enumerate(one["generations"]):
        halves = [r["generations"][step] for r in two]
        assert single["step"] == halves[0]["step"] == halves[1]["step"] == step
        assert [len(h["completions"]) for h in halves] == [4, 4]  # the 8-row global batch, split in two
        # the same completions, token for token, and the same per-token advantages, bit for bit
        assert single["completions"] == halves[0]["completions"] + halves[1]["completions"]
        assert single["advantages"] == halves[0]["advantages"] + halves[1]["advantages"]
        assert any(abs(a) > 0 for row in single["advantages"] for a in row)  # a real signal, not all zeros
        assert len({tuple(c) for c in single["completions"]}) > 1

    logged = [[h for h in r["log_history"] if "loss" in h] for r in (one, two[0])]
    assert [len(x) for x in logged] == [2, 2]
    for a, b in zip(*logged, strict=True):
        credit = {k for k in a if k.startswith("shapegrpo/") and k != "shapegrpo/credit_seconds"}
        assert len(credit) > 10
        # credit metrics are computed on the gathered batch: equal exactly
        assert {k: a[k] for k in credit} == {k: b[k] for k in credit}
        for key in ("reward", "reward_std", "completions/mean_length", "num_tokens"):
            assert a[key] == b[key], key
        # forward-pass numbers are sums over ranks in another order: equal to float32 rounding
        for key in FORWARD_PASS[:3]:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_without_row_seeded_sampling_two_processes_sample_otherwise(tmp_path) -> None:
    """The control: TRL's own sampling is seeded per process, so the split changes what is sampled."""
    policy = tiny_warm_start()
    (one,) = _worker_run(policy, tmp_path / "one", 1, "batched")
    two = _worker_run(policy, tmp_path / "two", 2, "batched")
    first = [r["generations"][0]["completions"] for r in two]
    assert one["generations"][0]["completions"] != first[0] + first[1]


# ------------------------------------------------------------------------------------------------------------
# fine_tuned_policy through Dagster Pipes: subprocess and torchrun with 2 processes
# ------------------------------------------------------------------------------------------------------------

TRAIN_ASSETS = ("task_dataset", "base_policy", "fine_tuned_policy")
SMOKE_EXPERIMENT = "shapegrpo-smoke"  # configs/smoke.yaml's


MAX_STEPS = 2


def _pipes_run_config(tmp_path: Path, launcher: dict[str, Any], assets: tuple[str, ...]) -> dict[str, Any]:
    """The smoke profile for ``assets``, one method, 2 steps, samples independent of the process count, and a
    warm start long enough for format-valid candidates (a nonzero training signal)."""
    config = smoke_run_config(tmp_path)
    config["ops"] = {k: v for k, v in config["ops"].items() if k in assets}
    if "base_policy" in assets:
        config["ops"]["base_policy"]["config"].update(num_demos=256, max_steps=60, learning_rate=1e-2)
    train = config["ops"]["fine_tuned_policy"]["config"]
    train.update(max_steps=MAX_STEPS, save_steps=MAX_STEPS, eval_every=MAX_STEPS)
    train["training_options"] = {"row_seeded_sampling": True}
    config["resources"]["launcher"] = {"config": launcher}
    return config


def _train_through_pipes(
    tmp_path: Path, instance: dg.DagsterInstance, launcher: dict[str, Any], assets: tuple[str, ...]
) -> tuple[dg.ExecuteInProcessResult, list[str]]:
    job = definitions(tmp_path).resolve_job_def("compare_methods")
    tags = {f"dagster/asset_partition_range_{end}": "shapegrpo" for end in ("start", "end")}  # one method
    result = job.execute_in_process(
        run_config=_pipes_run_config(tmp_path, launcher, assets),
        instance=instance,
        asset_selection=[dg.AssetKey(a) for a in assets],
        tags=tags,
    )
    assert result.success
    logs = [e.message for e in instance.all_logs(result.run_id) if e.message and "step" in e.message]
    return result, logs


def _history(tmp_path: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    mlflow = mlflow_resource(tmp_path).model_copy(update={"experiment_name": SMOKE_EXPERIMENT})
    (train,) = find_runs(mlflow, {TAG_ROOT_RUN: run_id, TAG_STAGE: "train"})
    assert train.info.status == "FINISHED"
    client = mlflow.client()
    return {
        key: [(m.step, m.value) for m in client.get_metric_history(train.info.run_id, key)]
        for key in train.data.metrics
    }


# Computed from the policy's forward pass over each process's rows, summed across processes in another order:
# equal to float32 rounding. Everything sampled or scored (completions, rewards, credit) is equal exactly.
FORWARD_PASS = ("loss", "grad_norm", "entropy", "train_loss")


def test_fine_tuned_policy_through_pipes_on_one_and_two_processes(tmp_path) -> None:
    runs = {}
    with dg.instance_for_test() as instance:
        # the second run trains from the first one's dataset and base policy (the IO manager reads the latest
        # materialization of an asset its run did not produce, as the retrain job does)
        for name, launcher, assets in (
            ("subprocess", {"mode": "subprocess"}, TRAIN_ASSETS),
            ("torchrun", {"mode": "torchrun", "nproc_per_node": 2}, ("fine_tuned_policy",)),
        ):
            result, logs = _train_through_pipes(tmp_path, instance, launcher, assets)
            record = result.asset_materializations_for_node("fine_tuned_policy")[0].metadata
            runs[name] = (result, _history(tmp_path, result.run_id), record)
            # progress came back over Pipes: a log line per logged step, then the final checkpoint
            assert any(f"shapegrpo: step {MAX_STEPS}/{MAX_STEPS} loss=" in m for m in logs), logs[-5:]
            assert record["shapegrpo/pipes_steps_reported"].value >= MAX_STEPS
            output = result.output_for_node("fine_tuned_policy")["shapegrpo"]
            assert (
                output["global_step"] == MAX_STEPS and (Path(output["path"]) / "model.safetensors").is_file()
            )
            assert output["model_version"] is not None  # registered by the step after training

    (_, single, rec1), (_, double, rec2) = runs["subprocess"], runs["torchrun"]
    assert rec1["shapegrpo/world_size"].value == 1 and rec2["shapegrpo/world_size"].value == 2
    for history in (single, double):  # rank 0 alone logged: every training step exactly once
        assert [s for s, _ in history["loss"]] == list(range(1, MAX_STEPS + 1))
        assert [s for s, _ in history["heldout/set_utility"]] == [0, MAX_STEPS]
    assert any(v != 0 for _, v in single["loss"]) and any(v > 0 for _, v in single["shapegrpo/mean_abs_phi"])
    timing = {"train_seconds", "seconds_per_step", "step_time", "shapegrpo/credit_seconds", "train_runtime"}
    timing |= {k for k in single if k.endswith(("_per_second", "pipeline/logged_records"))}
    assert set(single) == set(double)
    for key in sorted(set(single) - timing):
        a, b = single[key], double[key]
        assert [s for s, _ in a] == [s for s, _ in b], key
        if key in FORWARD_PASS:
            assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-5, abs=1e-7), key
        else:  # sampled completions, rewards and credit: identical
            assert a == b, key

    # Relaunched (by hand, one more step, no MLflow) on the same directory, the entry point resumes from
    # the last complete checkpoint instead of starting over.
    first = runs["subprocess"][0].output_for_node("fine_tuned_policy")["shapegrpo"]
    settings = json.loads((Path(first["path"]) / LAUNCH_SETTINGS).read_text())
    settings["train_kwargs"]["max_steps"] = MAX_STEPS + 1
    settings["mlflow"] = None
    again = tmp_path / "again.json"
    again.write_text(json.dumps(settings))
    done = subprocess.run(
        [sys.executable, "-m", TRAIN_ENTRY_MODULE, str(again)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads(done.stdout.strip().splitlines()[-1])
    assert resumed["resumed_from"].endswith(f"checkpoint-{MAX_STEPS}")
    assert resumed["global_step"] == MAX_STEPS + 1


# ------------------------------------------------------------------------------------------------------------
# Refusals: fewer processes than asked for
# ------------------------------------------------------------------------------------------------------------


def test_launcher_refuses_accelerate_with_several_processes_on_cpu(tmp_path) -> None:
    cpu_config = tmp_path / "cpu.yaml"
    cpu_config.write_text(
        yaml.safe_dump({"distributed_type": "MULTI_CPU", "use_cpu": True, "num_processes": 2})
    )
    gpu = str(DEPLOY / "accelerate" / "multi_gpu.yaml")
    on_cpu = TrainingLauncherResource(mode="accelerate", nproc_per_node=2, accelerate_config=gpu)
    with pytest.raises(
        LaunchConfigError, match=r"launcher.nproc_per_node=2 on CPU \(compute.device is cpu\)"
    ):
        on_cpu.command("s.json", use_cpu=True)
    file_says_cpu = TrainingLauncherResource(
        mode="accelerate", nproc_per_node=2, accelerate_config=str(cpu_config)
    )
    with pytest.raises(LaunchConfigError, match="the config file sets use_cpu: true"):
        file_says_cpu.command("s.json", use_cpu=False)
    with pytest.raises(LaunchConfigError, match=r"use launcher\.mode='torchrun'"):
        file_says_cpu.validate()
    # one accelerate process on CPU is what it is; several on GPUs are fine
    TrainingLauncherResource(mode="accelerate", accelerate_config=str(cpu_config)).validate(use_cpu=True)
    on_cpu.validate(use_cpu=False)
    with pytest.raises(LaunchConfigError, match=r"launcher.nproc_per_node=2 with launcher.mode='subprocess'"):
        TrainingLauncherResource(mode="subprocess", nproc_per_node=2).validate()
    with pytest.raises(LaunchConfigError, match=r"needs launcher\.accelerate_config"):
        TrainingLauncherResource(mode="accelerate", nproc_per_node=2).validate()

    # In a run, the refusal comes at its start, before any step acts (every step opens MLflow first).
    run_config = smoke_run_config(tmp_path)
    run_config["resources"]["launcher"] = {
        "config": {"mode": "accelerate", "nproc_per_node": 2, "accelerate_config": gpu}
    }
    assert (
        launcher_problems(run_config["resources"])
        and "compute.device is cpu" in launcher_problems(run_config["resources"])[0]
    )
    with dg.instance_for_test() as instance:
        result = (
            definitions(tmp_path)
            .resolve_job_def("compare_methods")
            .execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)
        )
    assert not result.success and not result.get_asset_materialization_events()
    failure = next(e for e in result.all_events if e.is_failure)
    assert "resources.launcher.config" in str(failure.event_specific_data.error)
    assert not (Path(workspace(tmp_path)["data_dir"]) / "runs").exists() or not any(
        (Path(workspace(tmp_path)["data_dir"]) / "runs").rglob("*.parquet")
    )


def test_entry_point_fails_when_world_size_differs_from_the_settings(tmp_path) -> None:
    settings = {
        "method": "shapegrpo",
        "task_dataset": {},
        "base_policy_path": str(tmp_path / "none"),
        "output_dir": str(tmp_path / "out"),
        "train_kwargs": {"max_steps": 1, "prompts_per_step": 2, "num_generations": 4},
        "num_processes": 2,
        "mlflow": None,
    }
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    # started as one plain process although the settings ask for two (what a launcher that silently starts
    # fewer processes does)
    done = subprocess.run(
        [sys.executable, "-m", TRAIN_ENTRY_MODULE, str(path)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "LaunchError: WORLD_SIZE is 1 but the settings ask for num_processes=2" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing trained


# ------------------------------------------------------------------------------------------------------------
# compare_methods under the multiprocess executor
# ------------------------------------------------------------------------------------------------------------

# Fields of the comparison record that name the run (ids, paths, versions, timings) rather than its results.
RUN_SPECIFIC = ("mlflow_run_id", "run_id", "path", "version", "report", "plot", "seconds", "uri")


def _comparable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if not any(s in k for s in RUN_SPECIFIC)}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def _stored_comparison(data_dir: Path, run_id: str) -> dict[str, Any]:
    return json.loads((data_dir / "assets" / run_id / "method_comparison.json").read_text())


def _warm_smoke_config(tmp_path: Path) -> dict[str, Any]:
    """configs/smoke.yaml with a warm start long enough for nonzero utilities (records that say something)."""
    config = smoke_run_config(tmp_path)
    config["ops"]["base_policy"]["config"].update(num_demos=256, max_steps=60, learning_rate=1e-2)
    return config


def test_compare_methods_under_the_multiprocess_executor_matches_in_process(tmp_path) -> None:
    in_proc_dir, multi_dir = tmp_path / "in_process", tmp_path / "multiprocess"
    job = definitions(in_proc_dir).resolve_job_def("compare_methods")
    with dg.instance_for_test() as instance:
        expected = job.execute_in_process(run_config=_warm_smoke_config(in_proc_dir), instance=instance)
    assert expected.success

    config = _warm_smoke_config(multi_dir)
    # forkserver: the step processes fork from one that imported the pipeline (torch, TRL, Dagster) once
    forkserver = {"forkserver": {"preload_modules": ["pipelines"]}}
    config["execution"] = {"config": {"multiprocess": {"max_concurrent": 2, "start_method": forkserver}}}
    config_file = multi_dir / "run.yaml"
    config_file.parent.mkdir(parents=True)
    config_file.write_text(yaml.safe_dump(config))
    home = multi_dir / "dagster_home"
    home.mkdir()
    loc = workspace(multi_dir)
    env = _env(
        DAGSTER_HOME=str(home),
        SHAPEGRPO_DATA_DIR=loc["data_dir"],
        MLFLOW_TRACKING_URI=loc["tracking_uri"],
        SHAPEGRPO_MLFLOW_ARTIFACTS=loc["artifact_root"],
    )
    cmd = [sys.executable, "-m", "dagster", "job", "execute", "-m", "pipelines", "-j", "compare_methods"]
    done = subprocess.run(
        [*cmd, "-c", str(config_file)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Executing steps using multiprocess executor" in done.stderr
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS
        step_pids = {
            r.event_log_entry.dagster_event.pid
            for r in instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_START).records
        }
    assert len(step_pids) > 5  # every step in its own process

    ours = _stored_comparison(Path(loc["data_dir"]), run.run_id)
    theirs = _stored_comparison(Path(workspace(in_proc_dir)["data_dir"]), expected.run_id)
    # as JSON text: NaN cells (the base policy's train columns) compare equal
    assert json.dumps(_comparable(ours), sort_keys=True) == json.dumps(_comparable(theirs), sort_keys=True)
    assert {row["method"] for row in ours["table"]} == {"base", *METHODS}
    assert any(row["set_utility"] > 0 for row in ours["table"])  # something nontrivial compared


# ------------------------------------------------------------------------------------------------------------
# deploy/: argv and pod specs
# ------------------------------------------------------------------------------------------------------------


def test_launch_specs_from_the_deploy_configs(tmp_path, monkeypatch) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    py = sys.executable
    settings = "/data/runs/r/fine_tuned_policy/shapegrpo/launch_settings.json"
    assert TrainingLauncherResource(mode="subprocess").command(settings) == [
        py,
        "-m",
        TRAIN_ENTRY_MODULE,
        settings,
    ]
    assert TrainingLauncherResource(mode="torchrun", nproc_per_node=2).command(settings, use_cpu=True) == [
        py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", TRAIN_ENTRY_MODULE, settings,
    ]  # fmt: skip
    for name, kind in (("multi_gpu", "MULTI_GPU"), ("deepspeed_zero2", "DEEPSPEED")):
        path = DEPLOY / "accelerate" / f"{name}.yaml"
        parsed = ClusterConfig.from_yaml_file(str(path))  # accelerate's own reader accepts the file
        assert (
            parsed.distributed_type.value == kind and not parsed.use_cpu and parsed.mixed_precision == "bf16"
        )
        launcher = TrainingLauncherResource(mode="accelerate", nproc_per_node=8, accelerate_config=str(path))
        assert launcher.command(settings, use_cpu=False) == [
            py, "-m", "accelerate.commands.launch", "--config_file", str(path), "--num_processes", "8",
            "-m", TRAIN_ENTRY_MODULE, settings,
        ]  # fmt: skip
    zero2 = ClusterConfig.from_yaml_file(str(DEPLOY / "accelerate" / "deepspeed_zero2.yaml"))
    assert zero2.deepspeed_config["zero_stage"] == 2

    # vLLM fragments: every option a train_policy/ShapEGRPOConfig field, the launcher valid on GPUs
    from pipelines.validation import settings_problems

    base = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    for name, mode in (("colocate", "colocate"), ("server", "server")):
        fragment = yaml.safe_load((DEPLOY / "vllm" / f"{name}.yaml").read_text())
        options = fragment["ops"]["fine_tuned_policy"]["config"]["training_options"]
        assert options["use_vllm"] is True and options["vllm_mode"] == mode
        ops = {
            **base["ops"],
            "fine_tuned_policy": {"config": {**fragment["ops"]["fine_tuned_policy"]["config"]}},
        }
        assert settings_problems(ops) == []
        assert launcher_problems(fragment["resources"]) == []  # device: cuda
        TrainingLauncherResource(**fragment["resources"]["launcher"]["config"]).command(
            settings, use_cpu=False
        )
    serve = yaml.safe_load((DEPLOY / "vllm" / "serve.yaml").read_text())
    from trl.scripts.vllm_serve import ScriptArguments

    assert set(serve) <= {f.name for f in __import__("dataclasses").fields(ScriptArguments)}

    # Kubernetes: the run launcher section is valid K8sRunLauncher config inside a valid instance config
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config_schema
    from dagster_k8s import K8sRunLauncher

    monkeypatch.setenv("DAGSTER_PG_URL", "postgresql+psycopg2://dagster@postgres:5432/dagster")
    instance_config = yaml.safe_load((DEPLOY / "dagster-k8s.yaml").read_text())
    checked = process_config(dagster_instance_config_schema(), instance_config)
    assert checked.success, checked.errors
    launcher_section = instance_config["run_launcher"]
    assert (launcher_section["module"], launcher_section["class"]) == ("dagster_k8s", "K8sRunLauncher")
    checked = process_config(K8sRunLauncher.config_type(), launcher_section["config"])
    assert checked.success, checked.errors

    # ... and the training pod parses into the pod PipesK8sClient would create
    from dagster_k8s.pipes import build_pod_body

    request = pipes_k8s_request(settings, DEPLOY / "k8s" / "training-pod.yaml")
    assert request["command"] == [
        "python", "-m", "accelerate.commands.launch",
        "--config_file", "deploy/accelerate/deepspeed_zero2.yaml", "--num_processes", "8",
        "-m", TRAIN_ENTRY_MODULE, settings,
    ]  # fmt: skip
    pod = build_pod_body(
        pod_name="dagster-train-shapegrpo",
        image=request["image"],
        command=request["command"],
        env_vars={**request["env"], "DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"},
        base_pod_meta=request["base_pod_meta"],
        base_pod_spec=request["base_pod_spec"],
    )
    (container,) = pod.spec.containers
    assert (
        container.command == request["command"] and container.image == "registry.example.com/shapegrpo:0.1.0"
    )
    assert container.resources.limits[GPU_RESOURCE] == "8" and pod.spec.restart_policy == "Never"
    assert {e.name: e.value for e in container.env}["SHAPEGRPO_DATA_DIR"] == "/data"
    assert {m.mount_path for m in container.volume_mounts} == {"/data", "/dev/shm"}

    # the launcher's k8s mode reads that file: 8 processes, the pod's command, no local argv
    k8s = TrainingLauncherResource(mode="k8s", k8s_pod_file="deploy/k8s/training-pod.yaml")
    k8s.validate()
    assert k8s.num_processes() == 8
    with pytest.raises(LaunchConfigError, match="pipes_k8s_request"):
        k8s.command(settings)
    with pytest.raises(LaunchConfigError, match="k8s_pod_file is needed by"):
        TrainingLauncherResource(mode="k8s").validate()

    # a pod with fewer GPUs than processes is refused
    spec = yaml.safe_load((DEPLOY / "k8s" / "training-pod.yaml").read_text())
    spec["base_pod_spec"]["containers"][0]["resources"]["limits"][GPU_RESOURCE] = "4"
    bad = tmp_path / "pod.yaml"
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(LaunchConfigError, match=r"gpu is 4 but launcher\.nproc_per_node asks for 8"):
        pipes_k8s_request(settings, bad)


def test_default_launcher_is_in_process() -> None:
    from pipelines import build_resources

    launcher = build_resources()["launcher"]
    assert launcher.mode == "in_process" and not launcher.launches
    with pytest.raises(LaunchConfigError, match="no command"):
        launcher.command("s.json")
    with pytest.raises(
        InvalidSettingsError, match=r"resources\.launcher\.config: launcher\.nproc_per_node=3"
    ):
        from pipelines.validation import require_valid_settings

        require_valid_settings(
            {"resources": {"launcher": {"config": {"mode": "subprocess", "nproc_per_node": 3}}}}
        )


def test_settings_carry_every_train_config_field() -> None:
    from pipelines.assets.policies import train_kwargs
    from pipelines.config import TrainConfig

    kwargs = train_kwargs(TrainConfig(training_options={"shapley_engine": "exact"}), {"use_cpu": True})
    # register_model is the step's own (it registers after training); training_options are merged in
    expected = set(TrainConfig.model_fields) - {"register_model", "training_options"}
    assert set(kwargs) == expected | {"use_cpu"}
