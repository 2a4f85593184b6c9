"""Dagster resources: connections and machines the assets use, each configured once per run.

* :class:`MLflowResource` — tracking store + model registry (default: SQLite under ``mlruns/``), with retries
  for SQLite's "database is locked" so that concurrent pipeline runs lose no record.
* :class:`GenerationResource` — how rollouts are generated: ``hf`` (transformers ``generate``, the default) or
  ``vllm`` (where installed).
* :class:`ComputeResource` — device and CPU threads.
* :class:`StorageResource` — where datasets, checkpoints and tables are written (``data/``).
* :class:`TrainingLauncherResource` — how ``fine_tuned_policy`` runs training: in the step's process (the
  default), or through Dagster Pipes as a subprocess, N ``torch.distributed.run`` processes or
  ``accelerate launch`` (``pipelines/train_entry.py``).
* :class:`ManifestIOManager` — passes asset values between steps: DataFrames as parquet, everything else as
  JSON manifests (paths, MLflow ids, numbers). Partitioned values are dicts ``{partition: value}``, so a
  single-run backfill over the method partitions stores each method on its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import dagster as dg
import pandas as pd
from pydantic import Field

T = TypeVar("T")

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_ARTIFACT_ROOT = "mlruns/artifacts"
DEFAULT_EXPERIMENT = "shapegrpo"
DEFAULT_MODEL_NAME = "shapegrpo-policy"

# Substrings of errors that SQLite raises under concurrent writers (or that a losing writer of a racing insert
# gets); the transaction was rolled back, so repeating the call is safe.
_TRANSIENT_MARKERS = (
    "database is locked",
    "database table is locked",
    "unable to open database file",
    "UNIQUE constraint failed: model_versions",
    "UNIQUE constraint failed: registered_models",
    "TEMPORARILY_UNAVAILABLE",
)


# Store calls retried because of contention, per process (evidence for logs and tests of contention).
RETRY_COUNT = {"transient_errors": 0}
# Stores this process has opened (schema checked/created) already.
_OPENED_STORES: set[str] = set()


def offline_environment() -> None:
    """No hub downloads, no telemetry: the pipeline runs without network access."""
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("HF_DATASETS_OFFLINE", "1"),
        ("MLFLOW_DISABLE_TELEMETRY", "true"),
        ("DO_NOT_TRACK", "true"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(key, value)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths resolved against the working directory)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return Path(uri[len(prefix) :]).resolve()


def _is_transient(err: BaseException) -> bool:
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    if isinstance(err, OperationalError):
        return True
    if isinstance(err, MlflowException):
        text = f"{err.error_code} {err.message}"
        return any(marker in text for marker in _TRANSIENT_MARKERS)
    return False


class MLflowResource(dg.ConfigurableResource):
    """MLflow tracking and registry for the pipeline.

    Sets the tracking and registry URIs from ``tracking_uri`` (a relative ``sqlite:///`` path is made
    absolute so that every step process agrees), creates ``experiment_name`` with its artifacts under
    ``artifact_root``, and wraps every store call in :meth:`call`, which retries on SQLite lock errors with
    jittered backoff.
    """

    # Locations default to None = "from the environment at use time", so that a run config overriding only
    # some fields (a smoke profile's experiment and model name) keeps the deployment's store: Dagster resets
    # the fields a partial override leaves out to these defaults, not to the values the Definitions gave.
    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking (and registry) URI; None = $MLFLOW_TRACKING_URI, else "
        f"{DEFAULT_TRACKING_URI}.",
    )
    artifact_root: str | None = Field(
        default=None,
        description="Artifact location of the experiment (a local dir or URI); None = "
        f"$SHAPEGRPO_MLFLOW_ARTIFACTS, else {DEFAULT_ARTIFACT_ROOT}.",
    )
    experiment_name: str = Field(default=DEFAULT_EXPERIMENT, description="One experiment holds every run.")
    registered_model_name: str = Field(
        default=DEFAULT_MODEL_NAME,
        description="Registered model holding base and fine-tuned policy versions.",
    )
    registry_aliases: bool = Field(
        default=True,
        description="Move the registry aliases (base, one per method, champion) at the end of a successful "
        "comparison. Smoke and test profiles turn it off (and use their own experiment and model name), so "
        "their models are registered but never named by an alias.",
    )
    max_attempts: int = Field(default=30, description="Attempts per store call under lock contention.")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Every asset logs to MLflow, so this runs before the first step of any run acts: a run whose settings
        # are invalid stops here, before anything reaches MLflow or the data directory (pipelines.validation).
        if context.dagster_run is not None:
            from pipelines.validation import require_valid_settings

            require_valid_settings(context.dagster_run.run_config)

    # ------------------------------------------------------------------------------------------- locations

    @property
    def store_uri(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI

    @property
    def resolved_tracking_uri(self) -> str:
        db = _sqlite_path(self.store_uri)
        return f"sqlite:///{db}" if db is not None else self.store_uri

    @property
    def resolved_artifact_location(self) -> str:
        root = self.artifact_root or os.environ.get("SHAPEGRPO_MLFLOW_ARTIFACTS") or DEFAULT_ARTIFACT_ROOT
        if "://" in root:
            return root
        return Path(root).resolve().as_uri()

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An inter-process lock next to a SQLite store (no-op for server stores, which serialise themselves).

        Guards find-or-create sequences (store schema creation, the experiment, a Dagster run's parent run)
        that two processes could otherwise both decide to create.
        """
        db = _sqlite_path(self.store_uri)
        if db is None:
            yield
            return
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.parent / f".{db.name}.{name}.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ------------------------------------------------------------------------------------------- calls

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, retried while SQLite reports contention (never on other errors)."""
        delay = 0.05
        for attempt in range(1, self.max_attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if attempt == self.max_attempts or not _is_transient(err):
                    raise
                RETRY_COUNT["transient_errors"] += 1
                time.sleep(delay * (1.0 + random.random()))
                delay = min(delay * 2.0, 2.0)
        raise AssertionError("unreachable")

    def configure(self) -> None:
        """Point the (fluent) MLflow API at this store and make sure its schema exists."""
        import mlflow

        uri = self.resolved_tracking_uri
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        self.client()

    def client(self) -> Any:
        """An ``mlflow.MlflowClient`` on this store.

        Creating a client opens the store, and opening a fresh SQLite store runs its schema migrations; two
        processes doing that at once corrupt each other's migration ("duplicate column"), so the first client
        of each process is created under the inter-process lock.
        """
        offline_environment()
        from mlflow import MlflowClient

        uri = self.resolved_tracking_uri
        if uri in _OPENED_STORES:
            return MlflowClient(tracking_uri=uri, registry_uri=uri)
        with self.lock("init"):
            client = self.call(MlflowClient, tracking_uri=uri, registry_uri=uri)
            self.call(client.search_registered_models, max_results=1)  # opens the registry store too
        _OPENED_STORES.add(uri)
        return client

    def experiment_id(self) -> str:
        """Id of ``experiment_name``, created (artifact location under ``artifact_root``) if missing."""
        self.configure()
        client = self.client()
        with self.lock("experiment"):
            exp = self.call(client.get_experiment_by_name, self.experiment_name)
            if exp is not None:
                return exp.experiment_id
            return self.call(
                client.create_experiment,
                self.experiment_name,
                artifact_location=self.resolved_artifact_location,
                tags={"project": "shapegrpo"},
            )


class GenerationResource(dg.ConfigurableResource):
    """Rollout backend. ``hf``: transformers ``generate`` (default, CPU-friendly). ``vllm``: vLLM, where
    installed (GPU); the trainer then uses TRL's ``use_vllm``. Selecting vllm without it installed is an
    error, not a silent fallback."""

    backend: str = Field(default="hf", description="'hf' or 'vllm'.")
    batch_size: int = Field(default=64, description="Prompts per generate call (hf).")
    vllm_gpu_memory_utilization: float = Field(default=0.3, description="vLLM colocate memory share.")

    def validate_backend(self) -> str:
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"generation backend must be 'hf' or 'vllm', got {self.backend!r}")
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError(
                "generation backend 'vllm' selected but vllm is not installed (pip install '.[vllm]')"
            )
        return self.backend

    def generate(
        self,
        model: Any,
        tokenizer: Any,
        prompts: list[Any],
        *,
        model_path: str,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> list[list[str]]:
        """``num_samples`` completions per prompt, decoded as TRL decodes them."""
        backend = self.validate_backend()
        if backend == "hf":
            from shapegrpo_core.evaluation import generate_completions

            return generate_completions(
                model,
                tokenizer,
                prompts,
                num_samples=num_samples,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
                batch_size=self.batch_size,
            )
        from vllm import LLM, SamplingParams  # type: ignore[import-not-found]

        llm = LLM(model=model_path, gpu_memory_utilization=self.vllm_gpu_memory_utilization, seed=seed)
        params = SamplingParams(n=num_samples, temperature=temperature, max_tokens=max_new_tokens, seed=seed)
        if prompts and isinstance(prompts[0], list):
            outputs = llm.chat(prompts, params)
        else:
            outputs = llm.generate(prompts, params)
        return [[o.text for o in out.outputs] for out in outputs]


class ComputeResource(dg.ConfigurableResource):
    """Where the math runs: ``device`` (cpu, cuda or auto) and ``num_threads`` (0 keeps torch's default)."""

    device: str = Field(default="cpu", description="'cpu', 'cuda' or 'auto'.")
    num_threads: int = Field(
        default=1,
        description="torch intra-op threads (0 = torch's default, one per core). 1 is fastest for the tiny "
        "CPU policies and avoids OpenMP oversubscription when other processes share the cores (40x slower).",
    )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        import torch

        if self.num_threads > 0:
            torch.set_num_threads(self.num_threads)

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no GPU")
        return self.device

    @property
    def use_cpu(self) -> bool:
        return self.resolved_device() == "cpu"


# The training entry point the launcher starts (pipelines/train_entry.py; console script shapegrpo-train).
TRAIN_ENTRY_MODULE = "pipelines.train_entry"
LaunchMode = Literal["in_process", "subprocess", "torchrun", "accelerate", "k8s"]


class LaunchConfigError(ValueError):
    """A launcher configuration that would not run the processes it asks for."""


REPO_ROOT = Path(__file__).resolve().parents[1]


def _repo_path(path: str | Path) -> Path:
    """``path``; a relative one that is not there from the working directory is taken from the checkout."""
    found = Path(path)
    return found if found.is_absolute() or found.exists() else REPO_ROOT / found


def _accelerate_config(path: str) -> dict[str, Any]:
    """The accelerate config file (a relative path: from the working directory, else from the checkout)."""
    import yaml

    config_path = _repo_path(path)
    if not config_path.is_file():
        raise LaunchConfigError(f"launcher.accelerate_config: {path} does not exist")
    loaded = yaml.safe_load(config_path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise LaunchConfigError(f"launcher.accelerate_config: {path} is not a YAML mapping")
    return loaded


class TrainingLauncherResource(dg.ConfigurableResource):
    """How ``fine_tuned_policy`` trains each method.

    * ``in_process`` (default): ``train_policy`` in the step's own process, as before.
    * ``subprocess``: one ``python -m pipelines.train_entry SETTINGS`` process through
      ``dg.PipesSubprocessClient`` (progress, metrics and the result come back over Pipes).
    * ``torchrun``: ``nproc_per_node`` processes through ``python -m torch.distributed.run --standalone``
      (gloo on CPU, NCCL on GPUs; the global batch is split over them).
    * ``accelerate``: ``accelerate launch --config_file accelerate_config --num_processes nproc_per_node``
      (DeepSpeed/FSDP/multi-GPU configs in ``deploy/accelerate/``). GPU only for more than one process:
      on CPU ``accelerate launch --cpu --num_processes 2`` starts one process, so that is refused.
    * ``k8s``: a GPU pod per method through ``dagster_k8s.PipesK8sClient``, described by ``k8s_pod_file``
      (``deploy/k8s/training-pod.yaml``: image, pod spec and the launcher that runs inside it), built by
      :func:`pipes_k8s_request`. Configured, not run by this project's tests (no cluster).

    :meth:`command` is a pure function of the configuration (and the device) giving the exact argv; the
    entry point checks ``WORLD_SIZE`` against the number of processes asked for and fails if they differ.
    """

    mode: LaunchMode = Field(
        default="in_process", description="in_process | subprocess | torchrun | accelerate | k8s."
    )
    nproc_per_node: int = Field(default=1, ge=1, description="Training processes (torchrun, accelerate).")
    accelerate_config: str | None = Field(
        default=None,
        description="accelerate config file (mode accelerate), e.g. deploy/accelerate/multi_gpu.yaml.",
    )
    python: str | None = Field(
        default=None,
        description="Interpreter for the training processes; None = the step's own (sys.executable).",
    )
    k8s_pod_file: str | None = Field(
        default=None,
        description="mode k8s: the training pod description, e.g. deploy/k8s/training-pod.yaml.",
    )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.validate()

    @property
    def launches(self) -> bool:
        """Whether training leaves the step's process (any mode but in_process)."""
        return self.mode != "in_process"

    def validate(self, *, use_cpu: bool | None = None) -> None:
        """Refuse configurations that would silently run another number of processes than asked for."""
        if (self.mode == "k8s") != (self.k8s_pod_file is not None):
            raise LaunchConfigError(
                "launcher.k8s_pod_file is needed by, and only read by, launcher.mode='k8s' "
                f"(mode {self.mode!r}, k8s_pod_file {self.k8s_pod_file!r})"
            )
        if self.mode == "k8s":
            if self.nproc_per_node != 1 or self.accelerate_config is not None:
                raise LaunchConfigError(
                    "launcher.mode='k8s' takes the processes from the launcher section of "
                    f"launcher.k8s_pod_file ({self.k8s_pod_file}); leave nproc_per_node and "
                    "accelerate_config unset"
                )
            return
        if self.mode in ("in_process", "subprocess") and self.nproc_per_node != 1:
            raise LaunchConfigError(
                f"launcher.nproc_per_node={self.nproc_per_node} with launcher.mode={self.mode!r}: that mode "
                "runs one process; use mode 'torchrun' (or 'accelerate' on GPUs) for more"
            )
        if self.mode != "accelerate":
            if self.accelerate_config is not None:
                raise LaunchConfigError(
                    f"launcher.accelerate_config is set but launcher.mode is {self.mode!r}; it is read only "
                    "by mode 'accelerate'"
                )
            return
        if self.accelerate_config is None:
            raise LaunchConfigError(
                "launcher.mode='accelerate' needs launcher.accelerate_config (a config file)"
            )
        config = _accelerate_config(self.accelerate_config)
        on_cpu = bool(config.get("use_cpu")) or (use_cpu is True)
        if self.nproc_per_node > 1 and on_cpu:
            where = "the config file sets use_cpu: true" if config.get("use_cpu") else "compute.device is cpu"
            raise LaunchConfigError(
                f"launcher.mode='accelerate' with launcher.nproc_per_node={self.nproc_per_node} on CPU "
                f"({where}): `accelerate launch --cpu --num_processes N` starts one process, not N; use "
                "launcher.mode='torchrun' for several CPU processes"
            )

    def num_processes(self) -> int:
        if self.mode == "k8s":
            import yaml

            assert self.k8s_pod_file is not None
            spec = yaml.safe_load(_repo_path(self.k8s_pod_file).read_text())
            return TrainingLauncherResource(**spec["launcher"]).num_processes()
        return self.nproc_per_node if self.mode in ("torchrun", "accelerate") else 1

    def command(self, settings_path: str | Path, *, use_cpu: bool | None = None) -> list[str]:
        """The argv that starts training for ``settings_path`` (validated first)."""
        self.validate(use_cpu=use_cpu)
        python = self.python or sys.executable
        entry = ["-m", TRAIN_ENTRY_MODULE, str(settings_path)]
        if self.mode == "subprocess":
            return [python, *entry]
        if self.mode == "torchrun":
            return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(self.nproc_per_node), *entry]  # fmt: skip
        if self.mode == "accelerate":
            assert self.accelerate_config is not None  # validate() checked it
            return [python, "-m", "accelerate.commands.launch", "--config_file", self.accelerate_config,
                    "--num_processes", str(self.nproc_per_node), *entry]  # fmt: skip
        if self.mode == "k8s":
            raise LaunchConfigError(
                "launcher.mode='k8s' runs the pod file's launcher in a pod: see pipes_k8s_request"
            )
        raise LaunchConfigError(
            "launcher.mode='in_process' trains in the step's process; there is no command"
        )

    def environment(self, *, num_threads: int) -> dict[str, str]:
        """Environment for the training processes on top of the step's: this checkout first on the import
        path (so they run the same code as the step), one OpenMP/torch thread count, offline hubs."""
        root = str(REPO_ROOT)
        path = os.environ.get("PYTHONPATH")
        env = {"PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}"}
        if num_threads > 0:
            env["OMP_NUM_THREADS"] = str(num_threads)
        offline_environment()
        env |= {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
        return env


GPU_RESOURCE = "nvidia.com/gpu"


def pipes_k8s_request(settings_path: str | Path, pod_file: str | Path) -> dict[str, Any]:
    """Keyword arguments of ``dagster_k8s.PipesK8sClient().run(context=..., **these)`` that train on
    Kubernetes as ``pod_file`` (e.g. ``deploy/k8s/training-pod.yaml``) describes: its launcher section's argv
    (a GPU pod: accelerate runs there) on ``settings_path``, image, namespace, environment and pod
    metadata/spec. Refuses a pod whose first container's ``nvidia.com/gpu`` limit is not the launcher's
    number of processes (fewer GPUs than processes would fail or share devices; more would sit idle)."""
    import yaml

    spec = yaml.safe_load(_repo_path(pod_file).read_text())
    for key in ("image", "launcher", "base_pod_spec"):
        if key not in spec:
            raise LaunchConfigError(f"{pod_file}: missing {key!r}")
    launcher = TrainingLauncherResource(**spec["launcher"])
    if launcher.mode in ("in_process", "k8s"):
        raise LaunchConfigError(f"{pod_file}: launcher.mode {launcher.mode!r} cannot run inside a pod")
    command = launcher.command(settings_path, use_cpu=False)
    containers = spec["base_pod_spec"].get("containers") or [{}]
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    gpus = int(limits.get(GPU_RESOURCE, 0))
    if gpus != launcher.num_processes():
        raise LaunchConfigError(
            f"{pod_file}: base_pod_spec.containers[0].resources.limits.{GPU_RESOURCE} is {gpus} but "
            f"launcher.nproc_per_node asks for {launcher.num_processes()} processes (one per GPU)"
        )
    return {
        "image": spec["image"],
        "command": command,
        "namespace": spec.get("namespace"),
        "env": {str(k): str(v) for k, v in (spec.get("env") or {}).items()},
        "base_pod_meta": spec.get("base_pod_meta"),
        "base_pod_spec": spec["base_pod_spec"],
    }


class StorageResource(dg.ConfigurableResource):
    """Local files of the pipeline: ``root_dir``/runs/<root Dagster run id>/<asset>/<partition>.

    The root run id (not the run id) is used so that re-executing a failed run ("from failure") writes into
    the same directory and training resumes from the last complete checkpoint there.
    """

    root_dir: str = Field(default="data", description="Root directory for datasets, checkpoints and tables.")

    def run_dir(self, context: dg.AssetExecutionContext, *parts: str) -> Path:
        run = context.run
        root_run_id = run.root_run_id or run.run_id
        path = Path(self.root_dir).resolve() / "runs" / root_run_id / Path(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path


class ManifestIOManager(dg.ConfigurableIOManager):
    """Stores DataFrames as parquet and other values as JSON under
    ``base_dir``/<root run id>/<asset key>[/<partition>].

    Values are kept per *root* run (the run and its re-executions share one), so two runs at once never read
    each other's values, and a re-execution reads exactly what its own root run produced. An input whose
    upstream was not produced in this root run (e.g. the ``retrain`` job reading the base policy) is read from
    the root run of the upstream's latest materialization, as recorded in Dagster's event log; the step logs
    which run that was.

    A partitioned asset's value is always a dict keyed by the partitions the run covers (one key, or several
    in a single-run backfill); each partition is stored on its own. Loading a partitioned asset returns such a
    dict too, so partitioned assets simply loop over ``context.partition_keys``.
    """

    base_dir: str = Field(default="data/assets", description="Where asset values are stored.")

    def _path(self, root_run_id: str, asset_key: dg.AssetKey, partition: str | None) -> Path:
        path = Path(self.base_dir).resolve().joinpath(root_run_id, *asset_key.path)
        return path / partition if partition is not None else path

    @staticmethod
    def _root_of(instance: dg.DagsterInstance, run_id: str) -> str:
        run = instance.get_run_by_id(run_id)
        return (run.root_run_id or run.run_id) if run is not None else run_id

    def _producer_path(
        self, context: dg.InputContext, own_root: str, asset_key: dg.AssetKey, partition: str | None
    ) -> Path:
        """Where the value of ``asset_key[partition]`` this step should read lives: its own root run's copy,
        else the copy of the root run that materialized it last."""
        own = self._path(own_root, asset_key, partition)
        if self._exists(own):
            return own
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition] if partition else None),
            limit=1,
        ).records
        if not records:
            return own  # never materialized: _read names the path and says what to do
        producer = self._root_of(context.instance, records[0].run_id)
        context.log.info(
            f"{asset_key.to_user_string()}{f'[{partition}]' if partition else ''} not produced by this root "
            f"run; reading the latest materialization (root run {producer})"
        )
        return self._path(producer, asset_key, partition)

    @staticmethod
    def _exists(path: Path) -> bool:
        return any(path.with_name(path.name + ext).exists() for ext in (".parquet", ".json"))

    @staticmethod
    def _write(path: Path, obj: Any) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(obj, pd.DataFrame):
            target = path.with_name(path.name + ".parquet")
            tmp = target.with_name(target.name + ".tmp")
            obj.to_parquet(tmp, index=False)
        else:
            target = path.with_name(path.name + ".json")
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_text(json.dumps(obj, indent=1, default=str))
        os.replace(tmp, target)  # readers never see a half-written value
        for stale in (path.with_name(path.name + ext) for ext in (".parquet", ".json")):
            if stale != target and stale.exists():
                stale.unlink()
        return target

    @staticmethod
    def _read(path: Path) -> Any:
        parquet, js = path.with_name(path.name + ".parquet"), path.with_name(path.name + ".json")
        if parquet.exists():
            return pd.read_parquet(parquet)
        if js.exists():
            return json.loads(js.read_text())
        raise FileNotFoundError(
            f"no stored value at {path}(.parquet|.json); materialize the upstream asset first"
        )

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        run = context.step_context.dagster_run
        root = run.root_run_id or run.run_id
        if context.has_asset_partitions:
            keys = list(context.asset_partition_keys)
            if not isinstance(obj, Mapping) or set(obj) != set(keys):
                raise ValueError(
                    f"{context.asset_key.to_user_string()} covers partitions {keys}; "
                    "return a dict keyed by exactly those partitions"
                )
            targets = [self._write(self._path(root, context.asset_key, k), obj[k]) for k in keys]
        else:
            targets = [self._write(self._path(root, context.asset_key, None), obj)]
        context.add_output_metadata({"stored_at": dg.MetadataValue.path(str(targets[0].parent))})

    def load_input(self, context: dg.InputContext) -> Any:
        if not context.has_asset_key:
            # Reading a result back outside a step (``result.output_for_node``): the upstream output knows the
            # asset and the run that produced it.
            upstream = context.upstream_output
            if upstream is None or not upstream.has_asset_key:
                raise ValueError("ManifestIOManager only stores asset values; this input has no asset key")
            root = self._root_of(context.instance, upstream.run_id)
            return self._read(self._path(root, upstream.asset_key, None))
        run = context.step_context.dagster_run
        root = run.root_run_id or run.run_id
        if context.has_asset_partitions:
            keys = list(context.asset_partition_keys)
            # Always a dict, even for one partition: consumers loop over ``context.partition_keys``. An input
            # declared with metadata allow_missing_partitions=True skips partitions never materialized.
            allow_missing = bool((context.definition_metadata or {}).get("allow_missing_partitions", False))
            values = {}
            for key in keys:
                try:
                    values[key] = self._read(self._producer_path(context, root, context.asset_key, key))
                except FileNotFoundError:
                    if not allow_missing:
                        raise
                    context.log.warning(
                        f"{context.asset_key.to_user_string()}[{key}] not materialized; skipped"
                    )
            return values
        return self._read(self._producer_path(context, root, context.asset_key, None))
