"""Training domain: the base policy (warm start or a local checkpoint) and a fine-tuned policy per method."""

import json
import shlex
from pathlib import Path
from typing import Any

import dagster as dg

from pipelines.config import BasePolicyConfig, TrainConfig
from pipelines.partitions import method_partitions
from pipelines.resources import (
    ComputeResource,
    GenerationResource,
    MLflowResource,
    StorageResource,
    TrainingLauncherResource,
    pipes_k8s_request,
)
from pipelines.taskio import load_split, load_task
from pipelines.tracking import MLflowMetricsCallback, log_file, log_metrics, log_policy_model, stage_run
from shapegrpo_core import policy
from shapegrpo_core.models import resolve_model


@dg.asset(
    group_name="training",
    kinds={"pytorch", "huggingface", "mlflow"},
    description="The starting policy every method fine-tunes: a tiny offline model with an SFT warm start on "
    "format-only demonstrations, or a local Hugging Face checkpoint. Logged and registered in MLflow "
    "(alias 'base').",
)
def base_policy(
    context: dg.AssetExecutionContext,
    config: BasePolicyConfig,
    task_dataset: dict[str, Any],
    storage: StorageResource,
    mlflow: MLflowResource,
    compute: ComputeResource,
) -> dg.Output[dict[str, Any]]:
    task = load_task(task_dataset)
    if config.model_path:
        # A local directory, the alias smollm2-135m-instruct (prepared here on first use) or a Hub id.
        path = resolve_model(config.model_path)
        source = "local_checkpoint"
        params: dict[str, Any] = {"model_path": config.model_path, "resolved_path": str(path)}
    else:
        source = "warm_start"
        params = config.model_dump(exclude={"model_path", "register_model"})
        path = policy.warm_start(
            task,
            storage.run_dir(context, "base_policy"),
            num_demos=config.num_demos,
            epochs=config.epochs,
            max_steps=config.max_steps,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            seed=config.seed,
            use_cpu=compute.use_cpu,
        )
    model, tokenizer = policy.load_policy(path)  # also validates a user-supplied checkpoint
    num_params = policy.num_parameters(model)
    del model

    metadata: dict[str, Any] = {"source": source, "path": dg.MetadataValue.path(str(path))}
    with stage_run(mlflow, context, "base_policy", method="base", params={"source": source, **params}) as rid:
        metrics: dict[str, Any] = {"num_parameters": num_params, "vocab_size": len(tokenizer)}
        if (path / policy.WARM_START_INFO).is_file():
            info = policy.read_warm_start_info(path)
            metrics |= {k: info[k] for k in ("train_loss", "global_steps", "wall_s")}
            log_file(mlflow, rid, path / policy.WARM_START_INFO)
        log_metrics(mlflow, rid, metrics)
        registered = log_policy_model(mlflow, rid, path, method="base") if config.register_model else {}
    metadata |= {k: v for k, v in metrics.items()} | {"mlflow_run_id": rid}
    metadata |= {k: str(v) for k, v in registered.items()}
    return dg.Output(
        {
            "path": str(path),
            "source": source,
            "mlflow_run_id": rid,
            **registered,
            "num_parameters": num_params,
        },
        metadata=metadata,
    )


# Written into a method's run directory once its policy is trained, logged and registered: a re-execution of
# the step (same root run, same directory) keeps that method's MLflow run and model version instead of
# training it again into a new, empty run.
METHOD_RESULT = "method_result.json"


def _finished_method(mlflow: MLflowResource, out_dir: Path) -> dict[str, Any] | None:
    record = out_dir / METHOD_RESULT
    if not record.is_file():
        return None
    done = json.loads(record.read_text())
    run = mlflow.call(mlflow.client().get_run, done["mlflow_run_id"])
    return done if run.info.status == "FINISHED" else None


# The settings file a launched training reads (pipelines/train_entry.py), in the method's run directory.
LAUNCH_SETTINGS = "launch_settings.json"


def train_kwargs(config: TrainConfig, options: dict[str, Any]) -> dict[str, Any]:
    """``train_policy`` keyword arguments from the run's TrainConfig (every field but ``register_model``;
    ``training_options`` and the compute options merged in ``options``), the same in and out of process."""
    return {
        "lam": config.lam,
        "max_steps": config.max_steps,
        "seed": config.seed,
        "num_generations": config.num_generations,
        "prompts_per_step": config.prompts_per_step,
        "learning_rate": config.learning_rate,
        "max_completion_length": config.max_completion_length,
        "temperature": config.temperature,
        "beta": config.beta,
        "scale_rewards": config.scale_rewards,
        "format_penalty": config.format_penalty,
        "save_steps": config.save_steps,
        "eval_every": config.eval_every,
        "eval_num_prompts": config.eval_num_prompts,
        "eval_num_samples": config.eval_num_samples,
        "logging_steps": config.logging_steps,
        **options,
    }


def launch_settings(
    *,
    method: str,
    task_dataset: dict[str, Any],
    base_policy_path: str,
    out_dir: Path,
    kwargs: dict[str, Any],
    num_processes: int,
    num_threads: int,
    mlflow: MLflowResource | None,
    run_id: str | None,
) -> dict[str, Any]:
    """What ``pipelines.train_entry`` reads: plain JSON, nothing passes between the step and the training
    processes but this file, the files it names and the MLflow run."""
    target = None
    if mlflow is not None and run_id is not None:
        target = {
            "tracking_uri": mlflow.resolved_tracking_uri,
            "artifact_root": mlflow.resolved_artifact_location,
            "experiment_name": mlflow.experiment_name,
            "run_id": run_id,
        }
    return {
        "method": method,
        "task_dataset": task_dataset,
        "base_policy_path": str(base_policy_path),
        "output_dir": str(out_dir),
        "train_kwargs": kwargs,
        "num_processes": num_processes,
        "num_threads": num_threads,
        "mlflow": target,
    }


def _launch(
    context: dg.AssetExecutionContext,
    launcher: TrainingLauncherResource,
    *,
    mlflow: MLflowResource,
    compute: ComputeResource,
    run_id: str,
    method: str,
    task_dataset: dict[str, Any],
    base_policy_path: str,
    out_dir: Path,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """Train ``method`` in the launcher's processes through Dagster Pipes; the result rank 0 reported."""
    # Not imported with the package: `python -m pipelines.train_entry` must find it unimported.
    from pipelines.train_entry import RESULT_EVENT, STEP_EVENT

    settings = launch_settings(
        method=method,
        task_dataset=task_dataset,
        base_policy_path=base_policy_path,
        out_dir=out_dir,
        kwargs=kwargs,
        num_processes=launcher.num_processes(),
        num_threads=compute.num_threads,
        mlflow=mlflow,
        run_id=run_id,
    )
    settings_path = out_dir / LAUNCH_SETTINGS
    settings_path.write_text(json.dumps(settings, indent=1, default=str))
    if launcher.mode == "k8s":  # configured, not run here: no cluster (deploy/k8s/training-pod.yaml)
        from dagster_k8s import PipesK8sClient

        assert launcher.k8s_pod_file is not None
        request = pipes_k8s_request(settings_path, launcher.k8s_pod_file)
        context.log.info(f"{method}: pod running {shlex.join(request['command'])}")
        invocation = PipesK8sClient().run(context=context, **request)
    else:
        command = launcher.command(settings_path, use_cpu=compute.use_cpu)
        context.log.info(f"{method}: {shlex.join(command)}")
        invocation = dg.PipesSubprocessClient().run(
            command=command, context=context, env=launcher.environment(num_threads=compute.num_threads)
        )
    messages = [m for m in invocation.get_custom_messages() if isinstance(m, dict)]
    results = [m for m in messages if m.get("event") == RESULT_EVENT]
    if len(results) != 1:
        raise RuntimeError(
            f"{method}: the training processes reported {len(results)} results over Pipes; expected one, "
            "from rank 0"
        )
    steps = [m for m in messages if m.get("event") == STEP_EVENT]
    return {**results[0], "steps_reported": len(steps)}


@dg.asset(
    group_name="training",
    kinds={"pytorch", "huggingface", "mlflow"},
    partitions_def=method_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=["shapley_credits"],  # its blocking checks (efficiency, finite advantages) gate training
    description="One fine-tuned policy per method (grpo = uniform credit, shapegrpo = Shapley credit, loo = "
    "leave-one-out credit), all from the same base policy with the same seed and step budget. Per-step "
    "training metrics go to MLflow; each policy is registered with an alias named after its method.",
)
def fine_tuned_policy(
    context: dg.AssetExecutionContext,
    config: TrainConfig,
    task_dataset: dict[str, Any],
    base_policy: dict[str, Any],
    storage: StorageResource,
    mlflow: MLflowResource,
    compute: ComputeResource,
    generation: GenerationResource,
    launcher: TrainingLauncherResource,
) -> dg.Output[dict[str, dict[str, Any]]]:
    from shapegrpo_core.training import train_policy  # TRL is slow to import; only training needs it

    task = load_task(task_dataset)
    train_dataset = load_split(task_dataset, "train")
    eval_dataset = load_split(task_dataset, "eval")
    results: dict[str, dict[str, Any]] = {}
    metadata: dict[str, Any] = {}
    for method in context.partition_keys:
        out_dir = storage.run_dir(context, "fine_tuned_policy", method)
        done = _finished_method(mlflow, out_dir)
        if done is not None:  # a re-execution after a crash later in the step: keep its run and version
            context.log.info(f"{method}: trained in this root run already (run {done['mlflow_run_id']})")
            results[method] = done
            metadata[f"{method}/mlflow_run_id"] = done["mlflow_run_id"]
            metadata[f"{method}/reused"] = True
            continue
        params = config.model_dump(exclude={"training_options", "register_model"}) | {
            "base_model_version": base_policy.get("model_version"),
            "base_path": base_policy["path"],
            **{f"option.{k}": v for k, v in config.training_options.items()},
        }
        with stage_run(mlflow, context, "train", method=method, params=params, resume=True) as rid:
            options = {"use_cpu": compute.use_cpu, **config.training_options}
            if generation.validate_backend() == "vllm":
                options.setdefault("use_vllm", True)
            kwargs = train_kwargs(config, options)
            if launcher.launches:
                outcome = _launch(
                    context,
                    launcher,
                    mlflow=mlflow,
                    compute=compute,
                    run_id=rid,
                    method=method,
                    task_dataset=task_dataset,
                    base_policy_path=base_policy["path"],
                    out_dir=out_dir,
                    kwargs=kwargs,
                )
                metadata[f"{method}/world_size"] = outcome["world_size"]
                metadata[f"{method}/pipes_steps_reported"] = outcome["steps_reported"]
            else:
                callback = MLflowMetricsCallback(mlflow, rid)
                result = train_policy(
                    task,
                    base_policy["path"],
                    out_dir,
                    method=method,
                    eval_dataset=eval_dataset,
                    train_dataset=train_dataset,
                    callbacks=[callback],
                    resume=True,
                    **kwargs,
                )
                outcome = {
                    "final_checkpoint": result.final_checkpoint,
                    "global_step": result.global_step,
                    "resumed_from": result.resumed_from,
                    "train_seconds": result.train_seconds,
                    "seconds_per_step": result.seconds_per_step,
                    "metrics_logged": callback.num_logged,
                }
            path = Path(outcome["final_checkpoint"])
            log_metrics(
                mlflow,
                rid,
                {"train_seconds": outcome["train_seconds"], "seconds_per_step": outcome["seconds_per_step"]},
                step=outcome["global_step"],
            )
            log_file(mlflow, rid, path / "train_result.json")
            registered = log_policy_model(mlflow, rid, path, method=method) if config.register_model else {}
        results[method] = result_record = {
            "path": str(path),
            "mlflow_run_id": rid,
            "method": method,
            "global_step": outcome["global_step"],
            "resumed_from": outcome["resumed_from"],
            "train_seconds": outcome["train_seconds"],
            "base_model_version": base_policy.get("model_version"),
            **registered,
        }
        (out_dir / METHOD_RESULT).write_text(json.dumps(result_record, indent=1, default=str))
        metadata[f"{method}/mlflow_run_id"] = rid
        metadata[f"{method}/metrics_logged"] = outcome["metrics_logged"]
        metadata[f"{method}/train_seconds"] = outcome["train_seconds"]
        if outcome["resumed_from"]:
            metadata[f"{method}/resumed_from"] = outcome["resumed_from"]
        if registered:
            metadata[f"{method}/model_version"] = registered["model_version"]
    return dg.Output(results, metadata=metadata)
