"""infra/ checked offline against the schemas and parsers of the tools it targets.

- KubeRay objects (every document under infra/kuberay/) against the v1.7.0 CRD schemas in
  ../shared/schemas/kuberay-v1.7.0 with unknown fields rejected, plus the rules KubeRay's operator applies
  on top of the schema (name lengths, token auth, deadlines, autoscaler options);
- every other Kubernetes object against the API's own schema (kubernetes-validate, strict), PodMonitors
  against the prometheus-operator fields they use;
- infra/aws/cluster.yaml against the cluster launcher's schema shipped in the installed ray package, its
  node configs against EC2's RunInstances input (botocore's service model);
- every RayJob entrypoint against the job script's own argument parser and the config it names, and against
  the cluster it runs on (its Train workers fit the cluster the job waits for);
- security: no credential in any file, nothing exposed outside the cluster, pods run as non-root;
- the Dockerfile installs exactly the pins of pyproject.toml.

New manifests are covered by dropping them into infra/kuberay/: every test iterates over the files.
Each check returns a list of problems; the mutation tests at the end show that each check rejects a broken
copy of a real manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import math
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
import zoneinfo
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from infra.docker.requirements_from_pyproject import pinned_requirements
from infra.render import RenderError, render, template_variables

REPO = Path(__file__).resolve().parent.parent
KUBERAY_DIR = REPO / "infra" / "kuberay"
AWS_CLUSTER = REPO / "infra" / "aws" / "cluster.yaml"
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
RUNBOOK = REPO / "docs" / "cluster.md"
KUBERAY_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay-v1.7.0"
KUBERAY_CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
                "RayCronJob": "ray.io_raycronjobs.yaml"}
# The oldest Kubernetes minor we support (docs/cluster.md); kubernetes-validate ships its API schemas.
KUBERNETES_VERSION = "1.33"
# Where the image puts the repository's jobs/ and configs/ (the Dockerfile's WORKDIR; checked below).
IMAGE_APP_DIR = "/home/ray/cellfm"
# Jobs that start Ray Train workers: their config's train.* must fit the cluster they run on.
TRAINING_JOBS = {"pretrain", "sweep"}
# Sample values for the ${VARIABLE}s that infra/render.py fills in (docs/cluster.md documents each).
TEMPLATE_VALUES = {
    "CELLFM_IMAGE": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/cellfm:5ed4fb1",
    "CELLFM_BUCKET": "example-cellfm-bucket",
    "AWS_REGION": "eu-west-1",
    "CELLFM_S3_ROLE_ARN": "arn:aws:iam::123456789012:role/cellfm-s3",
    "CELLFM_AMI": "ami-0123456789abcdef0",
    "CELLFM_HEAD_PROFILE_ARN": "arn:aws:iam::123456789012:instance-profile/cellfm-ray-head",
    "CELLFM_WORKER_PROFILE_ARN": "arn:aws:iam::123456789012:instance-profile/cellfm-ray-worker",
    "CELLFM_KUBECTL_IMAGE": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/kubectl:1.33",
}
# KubeRay v1.7.0 (utils/constant.go): a RayJob's cluster is named <job>-<5 chars>, a RayCronJob's RayJob
# <cronjob>-<minutes since epoch>.
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SECRET_ENV_NAME = re.compile(r"ACCESS_KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
SECRET_TEXT = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"aws_secret_access_key|aws_session_token", re.IGNORECASE),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
PUBLIC_KINDS = {"Ingress", "Gateway", "HTTPRoute", "GRPCRoute", "Route"}


# ----------------------------------------------------------------------------------------------------
# Loading manifests


def manifest_files() -> list[Path]:
    return sorted(KUBERAY_DIR.rglob("*.yaml"))


def _documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


@functools.cache
def rendered_documents(path: Path) -> tuple[dict, ...]:
    return tuple(_documents(render(path.read_text(), TEMPLATE_VALUES, source=str(path))))


def _document_params(kinds: set[str] | None = None, exclude: set[str] = frozenset()) -> list:
    """(path, index) of every document (optionally of these kinds), with readable ids."""
    params = []
    for path in manifest_files():
        for index, doc in enumerate(_documents(path.read_text())):
            kind = doc.get("kind", "?")
            if (kinds is None or kind in kinds) and kind not in exclude:
                name = (doc.get("metadata") or {}).get("name", "?")
                params.append(pytest.param(path, index, id=f"{path.name}:{kind}/{name}"))
    return params


def document(path: Path, index: int) -> dict:
    return copy.deepcopy(rendered_documents(path)[index])


def all_documents() -> list[dict]:
    return [copy.deepcopy(doc) for path in manifest_files() for doc in rendered_documents(path)]


def embedded_rayjobs(doc: dict) -> list[dict]:
    """The RayJob manifests a ConfigMap carries as *.yaml data (a template a scheduled pod creates)."""
    if doc.get("kind") != "ConfigMap":
        return []
    return [item for key, text in sorted((doc.get("data") or {}).items()) if key.endswith(".yaml")
            for item in _documents(text) if item.get("kind") == "RayJob"]


def job_specs(doc: dict) -> list[dict]:
    """The RayJob specs an object holds: a RayJob's own, a RayCronJob's template, a ConfigMap's RayJobs."""
    if doc.get("kind") == "RayJob":
        return [doc["spec"]]
    if doc.get("kind") == "RayCronJob":
        return [doc["spec"]["jobTemplate"]]
    return [job["spec"] for job in embedded_rayjobs(doc)]


def cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster specs an object holds (a RayCluster's, or one inside each RayJob spec)."""
    if doc.get("kind") == "RayCluster":
        return [doc["spec"]]
    return [spec["rayClusterSpec"] for spec in job_specs(doc) if "rayClusterSpec" in spec]


def ray_pods(cluster: dict) -> Iterator[tuple[str, dict, dict]]:
    """(node type as KubeRay labels it, group spec, pod template) for the head and each worker group."""
    yield "head", cluster["headGroupSpec"], cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield "worker", group, group["template"]


def pod_templates(node: Any) -> Iterator[dict]:
    """Every pod template anywhere in an object (Ray groups, submitter pods, CronJob/Job templates)."""
    if isinstance(node, dict):
        if isinstance(node.get("spec"), dict) and "containers" in node["spec"]:
            yield node
        for value in node.values():
            yield from pod_templates(value)
    elif isinstance(node, list):
        for value in node:
            yield from pod_templates(value)


def _named(obj: dict) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


# ----------------------------------------------------------------------------------------------------
# Template variables (infra/render.py)


def infra_templates() -> list[Path]:
    return manifest_files() + [AWS_CLUSTER]


def test_template_variables_are_the_documented_ones():
    used = set().union(*(template_variables(path.read_text()) for path in infra_templates()))
    assert used == set(TEMPLATE_VALUES), f"undocumented: {used - set(TEMPLATE_VALUES)}, unused: {set(TEMPLATE_VALUES) - used}"
    runbook = RUNBOOK.read_text()
    assert [name for name in sorted(used) if f"export {name}=" not in runbook] == []


def test_render_fills_only_template_variables():
    text = 'image: ${CELLFM_IMAGE}\ncmd: "$(echo ${CELLFM_IMAGE} | cut -d/ -f1)" $RAY_HEAD_IP ${lower}\n'
    assert render(text, {"CELLFM_IMAGE": "r/cellfm:1"}) == 'image: r/cellfm:1\ncmd: "$(echo r/cellfm:1 | cut -d/ -f1)" $RAY_HEAD_IP ${lower}\n'
    with pytest.raises(RenderError, match="needs AWS_REGION, CELLFM_IMAGE"):
        render("${CELLFM_IMAGE} ${AWS_REGION}", {"CELLFM_IMAGE": ""})


def test_render_command_names_the_missing_variable_and_writes_nothing():
    env = {"PATH": "/usr/bin:/bin", **{k: v for k, v in TEMPLATE_VALUES.items() if k != "CELLFM_BUCKET"}}
    target = KUBERAY_DIR / "pretrain-rayjob.yaml"
    done = subprocess.run([sys.executable, str(REPO / "infra" / "render.py"), str(target)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip().splitlines() == [
        f"error: {target} needs CELLFM_BUCKET: export them first (see docs/cluster.md)"]
    full = subprocess.run([sys.executable, str(REPO / "infra" / "render.py"), str(target)],
                          env={**env, "CELLFM_BUCKET": "b"}, capture_output=True, text=True, timeout=60)
    assert full.returncode == 0 and "s3://b/cellfm/runs" in full.stdout and "${" not in full.stdout


# ----------------------------------------------------------------------------------------------------
# KubeRay objects: CRD schemas with unknown fields rejected


def strict_schema(node: Any) -> Any:
    """A CRD's openAPIV3Schema as JSON Schema that rejects unknown fields, as the API server prunes them:
    every object schema with properties gets additionalProperties: false unless it preserves unknown fields
    (x-kubernetes-preserve-unknown-fields) or already says what extra keys may hold (maps). Embedded pod
    templates are spelled out in full by KubeRay's CRDs, so they are checked field by field too."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_schema(value) for key, value in node.items()}
    if (out.get("type") == "object" and isinstance(out.get("properties"), dict)
            and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def _cel_rules_not_checked(validator, rules, instance, schema):
    """CEL rules (x-kubernetes-validations) cannot be evaluated here. Transition rules (oldSelf) never fire
    on create; any other rule fails the check so nobody assumes it was verified."""
    unchecked = [rule["rule"] for rule in rules if "oldSelf" not in rule["rule"]]
    if unchecked:
        yield jsonschema.ValidationError(f"CEL rule(s) not checked offline, verify by hand: {unchecked}")


CRDValidator = jsonschema.validators.extend(jsonschema.Draft7Validator,
                                            {"x-kubernetes-validations": _cel_rules_not_checked})


def crd_validator(path: Path, version: str) -> jsonschema.Validator:
    crd = yaml.safe_load(path.read_text())
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return CRDValidator(strict_schema(entry["schema"]["openAPIV3Schema"]))


@functools.cache
def kuberay_validator(kind: str) -> jsonschema.Validator:
    return crd_validator(KUBERAY_SCHEMAS / KUBERAY_CRDS[kind], "v1")


def object_meta_problems(metadata: dict) -> list[str]:
    """A custom resource's metadata against Kubernetes' ObjectMeta (the CRD schemas leave it open): checked
    as the metadata of a ConfigMap, whose schema is ObjectMeta itself."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata},
                                     KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"metadata.{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def schema_problems(validator: jsonschema.Validator, doc: dict) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc))


def crd_problems(doc: dict) -> list[str]:
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion {doc.get('apiVersion')!r}: KubeRay v1.7.0 serves ray.io/v1"]
    return schema_problems(kuberay_validator(doc["kind"]), doc) + object_meta_problems(doc.get("metadata", {}))


needs_kuberay_schemas = pytest.mark.skipif(
    not KUBERAY_SCHEMAS.is_dir(),
    reason=f"KubeRay v1.7.0 CRD schemas not found at {KUBERAY_SCHEMAS} (the project's shared/ folder beside the repo)")


@needs_kuberay_schemas
@pytest.mark.parametrize("path,index", _document_params(set(KUBERAY_CRDS)))
def test_kuberay_object_matches_crd_schema(path, index):
    assert crd_problems(document(path, index)) == []


# ----------------------------------------------------------------------------------------------------
# KubeRay objects: the operator's own validation (utils/validation.go in v1.7.0) beyond the schema


def _ray_version(spec: dict) -> Version | None:
    try:
        return Version(str(spec.get("rayVersion", "")))
    except ValueError:
        return None


def operator_problems(doc: dict) -> list[str]:
    kind, name = doc["kind"], doc["metadata"].get("name", "")
    problems = []
    if kind in NAME_LIMITS and len(name) > NAME_LIMITS[kind]:
        problems.append(f"name {name!r} has {len(name)} characters; KubeRay allows {NAME_LIMITS[kind]} for a {kind}")
    if not DNS1035_LABEL.match(name):
        problems.append(f"name {name!r} is not a DNS-1035 label")
    if kind == "RayCronJob":
        schedule = doc["spec"]["schedule"]
        if "TZ" in schedule or len(schedule.split()) != 5:
            problems.append(f"schedule {schedule!r}: five cron fields, time zone in spec.timeZone")
        if "timeZone" in doc["spec"]:
            try:
                zoneinfo.ZoneInfo(doc["spec"]["timeZone"])
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                problems.append(f"timeZone {doc['spec']['timeZone']!r} is not a known time zone")
    for spec in job_specs(doc):
        shutdown = spec.get("shutdownAfterJobFinishes", False)
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown:
            problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if "deletionStrategy" in spec and shutdown:
            problems.append("deletionStrategy cannot be combined with shutdownAfterJobFinishes/ttlSecondsAfterFinished")
        for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
            if key in spec and spec[key] <= 0:
                problems.append(f"{key} must be positive")
        if spec.get("backoffLimit", 0) < 0:
            problems.append("backoffLimit must be >= 0")
        if spec.get("submissionMode") == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
            problems.append("backoffLimit is incompatible with InteractiveMode")
        if spec.get("suspend") and not shutdown:
            problems.append("a suspended RayJob needs shutdownAfterJobFinishes: true")
        if "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
            problems.append("one of rayClusterSpec or clusterSelector must be set")
    for cluster in cluster_specs(doc):
        problems += _cluster_operator_problems(cluster)
    return problems


def _cluster_operator_problems(cluster: dict) -> list[str]:
    problems = []
    autoscaling = cluster.get("enableInTreeAutoscaling", False)
    autoscaler_v2 = autoscaling and (cluster.get("autoscalerOptions") or {}).get("version") == "v2"
    if (cluster.get("authOptions") or {}).get("mode") == "token":
        version = _ray_version(cluster)
        if version is None or version < Version("2.52.0"):
            problems.append(f"authOptions.mode token needs rayVersion >= 2.52.0, got {cluster.get('rayVersion')!r}")
    for role, group, template in ray_pods(cluster):
        where = "head" if role == "head" else f"worker group {group.get('groupName')!r}"
        if not template["spec"].get("containers"):
            problems.append(f"{where}: no container")
        params = group.get("rayStartParams", {})
        if "labels" in params:
            problems.append(f"{where}: rayStartParams.labels is not supported; use the group's labels")
        if {"num-cpus", "num-gpus", "memory", "resources"} & set(params) and group.get("resources"):
            problems.append(f"{where}: resources set both in rayStartParams and in resources")
        if autoscaler_v2 and template["spec"].get("restartPolicy", "Never") != "Never":
            problems.append(f"{where}: restartPolicy must be Never or unset with autoscaler v2")
        if role == "worker":
            low, high = group.get("minReplicas"), group.get("maxReplicas")
            if not autoscaling and (low is None or high is None):
                problems.append(f"{where}: minReplicas and maxReplicas are required without autoscaling")
            if low is not None and high is not None and low > high:
                problems.append(f"{where}: minReplicas {low} > maxReplicas {high}")
            if "idleTimeoutSeconds" in group and not autoscaler_v2:
                problems.append(f"{where}: idleTimeoutSeconds needs autoscalerOptions.version v2")
    return problems


@pytest.mark.parametrize("path,index", _document_params(set(KUBERAY_CRDS)))
def test_kuberay_object_passes_operator_validation(path, index):
    assert operator_problems(document(path, index)) == []


@needs_kuberay_schemas
@pytest.mark.parametrize("path,index", _document_params({"ConfigMap"}))
def test_rayjob_template_in_a_configmap_is_a_valid_rayjob(path, index):
    jobs = embedded_rayjobs(document(path, index))
    assert [problem for job in jobs for problem in crd_problems(job) + operator_problems(job)] == []


# ----------------------------------------------------------------------------------------------------
# Plain Kubernetes objects


def podmonitor_schema() -> dict:
    """The PodMonitor fields we set, as prometheus-operator v0.93.0's CRD defines them (no other field
    allowed): enough to catch a misspelt or misplaced key without vendoring the whole CRD."""
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    closed = functools.partial(dict, type="object", additionalProperties=False)
    relabeling = closed(properties={
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep"]},
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "targetLabel": {"type": "string"}, "regex": {"type": "string"}, "replacement": {"type": "string"}})
    endpoint = closed(required=["port"], properties={
        "port": {"type": "string"}, "path": {"type": "string"}, "interval": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
        "relabelings": {"type": "array", "items": relabeling}})
    spec = closed(required=["selector", "podMetricsEndpoints"], properties={
        "selector": closed(properties={"matchLabels": string_map}),
        "namespaceSelector": closed(properties={"matchNames": {"type": "array", "items": {"type": "string"}},
                                                "any": {"type": "boolean"}}),
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": endpoint}})
    return closed(required=["apiVersion", "kind", "metadata", "spec"], properties={
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object"}, "spec": spec})


def kubernetes_problems(doc: dict) -> list[str]:
    import kubernetes_validate

    if doc.get("kind") == "PodMonitor":
        return (schema_problems(jsonschema.Draft7Validator(podmonitor_schema()), doc)
                + object_meta_problems(doc.get("metadata", {})))
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path)) or '<root>'}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


@pytest.mark.parametrize("path,index", _document_params(exclude=set(KUBERAY_CRDS)))
def test_kubernetes_object_matches_api_schema(path, index):
    assert kubernetes_problems(document(path, index)) == []


# ----------------------------------------------------------------------------------------------------
# Entrypoints: the job scripts' own parsers, the configs they name, the clusters they run on


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        self.namespace = namespace


class JobArgumentError(ValueError):
    pass


def parse_job_arguments(script: Path, args: list[str]) -> argparse.Namespace:
    """Parse `args` with the job script's own argument parser, exactly as `python <script> <args>` would,
    without running the job: the script runs as __main__ until its parser returns, and stops there.
    (Once jobs/<name>.py only call cellfm.cli.main([name, *argv]), this equals
    cellfm.cli.build_parser().parse_args([name, *args]).)"""
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise _Parsed(parse_args(parser, args, namespace))

    stderr = io.StringIO()
    with (mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop),
          mock.patch.object(sys, "argv", [str(script), *args]), contextlib.redirect_stderr(stderr)):
        try:
            runpy.run_path(str(script), run_name="__main__")
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit:
            raise JobArgumentError(f"{script.name} rejects {shlex.join(args)}: {stderr.getvalue().strip()}") from None
    raise JobArgumentError(f"{script.name} finished without parsing its arguments")


def image_path_to_repo(word: str) -> str:
    """A path inside the image's app folder, as the same path in this checkout (the Dockerfile copies
    jobs/ and configs/ there verbatim); any other word unchanged."""
    prefix = IMAGE_APP_DIR + "/"
    return str(REPO / word[len(prefix):]) if word.startswith(prefix) else word


def _cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_node_resources(group: dict, template: dict) -> dict[str, float]:
    """The logical CPUs/GPUs Ray sees on a pod: rayStartParams when given, else the container's limits."""
    limits = template["spec"]["containers"][0].get("resources", {}).get("limits", {})
    params = group.get("rayStartParams", {})
    return {"CPU": float(params.get("num-cpus", _cpu(limits.get("cpu", 0)))),
            "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}


def training_fit_problems(cfg, cluster: dict) -> list[str]:
    """A training job's Train workers must all fit the cluster as KubeRay first creates it (minReplicas):
    a placement group that never fits waits forever, and the job only counts as started once that cluster
    is up, so preRunningDeadlineSeconds covers getting the GPUs only if they are in the minimum."""
    bundle = {"CPU": cfg.train.cpus_per_worker, "GPU": cfg.train.gpus_per_worker if cfg.train.use_gpu else 0}
    has_gpus = False
    fits = 0
    for role, group, template in ray_pods(cluster):
        resources = ray_node_resources(group, template)
        has_gpus |= resources["GPU"] > 0
        per_pod = min(math.floor(resources[k] / v) for k, v in bundle.items() if v > 0)
        fits += per_pod * (1 if role == "head" else group.get("minReplicas", 0))
    problems = []
    if has_gpus and not cfg.train.use_gpu:
        problems.append("the cluster has GPUs but train.use_gpu is false")
    if fits < cfg.train.num_workers:
        problems.append(f"train.num_workers={cfg.train.num_workers} workers of {bundle} each, but the cluster "
                        f"at its minimum size holds {fits}")
    return problems


def entrypoint_problems(spec: dict) -> list[str]:
    from cellfm.cli import config_from_args
    from cellfm.config import ConfigError

    words = shlex.split(spec["entrypoint"])
    if len(words) < 2 or words[0] != "python":
        return [f"entrypoint {spec['entrypoint']!r} is not `python <job script> ...`"]
    script = Path(image_path_to_repo(words[1]))
    if script.parent != REPO / "jobs" or not script.is_file():
        return [f"{words[1]} is not a job script of this repository (jobs/*.py under {IMAGE_APP_DIR})"]
    try:
        namespace = parse_job_arguments(script, [image_path_to_repo(word) for word in words[2:]])
    except JobArgumentError as exc:
        return [str(exc)]
    if getattr(namespace, "config", None) is None:
        return []
    try:
        if script.stem == "sweep":
            # A sweep file, not a training config: its plan holds the base config every trial trains with
            # (its resources applied) and where the sweep and its trials' runs live.
            from cellfm.commands.sweep import plan_from_args

            plan = plan_from_args(namespace)
            cfg, stored = plan.base, [("storage", plan.spec.storage), *(
                (f"eval.manifests.{name}", path) for name, path in plan.objective_manifests().items())]
        else:
            cfg = config_from_args(namespace)
            stored = [("train.storage_path", cfg.train.storage_path)]
    except ConfigError as exc:
        return [f"{script.name}: {exc}"]
    problems = []
    if script.stem in TRAINING_JOBS:
        # Each retry of a RayJob is a new cluster: only remote storage carries the data and the run across.
        for key, value in (*stored, ("data.train_manifest", cfg.data.train_manifest)):
            if not value.startswith("s3://"):
                problems.append(f"{key}={value!r} is not on s3://")
        if "rayClusterSpec" in spec:
            problems += training_fit_problems(cfg, spec["rayClusterSpec"])
    return problems


@pytest.mark.parametrize("path,index", _document_params({"RayJob", "RayCronJob"}))
def test_entrypoint_runs_a_job_its_parser_and_config_accept(path, index):
    specs = job_specs(document(path, index))
    assert specs and all("entrypoint" in spec for spec in specs)
    assert [problem for spec in specs for problem in entrypoint_problems(spec)] == []


# ----------------------------------------------------------------------------------------------------
# Security: credentials, exposure, pod identity


def _containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def _env_lists(node: Any) -> Iterator[list]:
    if isinstance(node, dict):
        if isinstance(node.get("env"), list):
            yield node["env"]
        for value in node.values():
            yield from _env_lists(value)
    elif isinstance(node, list):
        for value in node:
            yield from _env_lists(value)


def credential_problems(doc: dict) -> list[str]:
    problems = []
    if doc.get("kind") == "Secret":
        problems.append(f"{_named(doc)}: credentials never live in a manifest")
    for env in _env_lists(doc):
        for var in env:
            if SECRET_ENV_NAME.search(var["name"]) and "value" in var:
                problems.append(f"env {var['name']} has a literal value; reference a secret or use workload identity")
    text = yaml.safe_dump(doc)
    problems += [f"credential-like text matching {pattern.pattern!r}" for pattern in SECRET_TEXT if pattern.search(text)]
    if re.search(r"RAY_AUTH_MODE\W+disabled", text):
        problems.append("Ray token authentication disabled")
    return problems


def exposure_problems(doc: dict) -> list[str]:
    """Nothing reachable from outside the Kubernetes cluster: the dashboard and job server are reached with
    `kubectl port-forward` only."""
    problems = []
    if doc.get("kind") in PUBLIC_KINDS:
        problems.append(f"{_named(doc)} exposes a service outside the cluster")
    if doc.get("kind") == "Service" and doc.get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
        problems.append(f"{_named(doc)} is of type {doc['spec']['type']}")
    for cluster in cluster_specs(doc):
        head = cluster["headGroupSpec"]
        if head.get("serviceType") != "ClusterIP":
            problems.append(f"head service type {head.get('serviceType')!r}: set ClusterIP explicitly")
        if head.get("enableIngress"):
            problems.append("head enableIngress is on")
        if head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
            problems.append("headService is not ClusterIP")
        if (cluster.get("authOptions") or {}).get("mode") != "token":
            problems.append("authOptions.mode is not token: anyone who reaches the head can run code")
    for template in pod_templates(doc):
        if template["spec"].get("hostNetwork"):
            problems.append("a pod uses the host network")
        problems += [f"container {c['name']} binds host port {p['hostPort']}" for c in _containers(template)
                     for p in c.get("ports", []) if "hostPort" in p]
    return problems


def pod_security_problems(doc: dict) -> list[str]:
    problems = []
    for template in pod_templates(doc):
        spec = template["spec"]
        if not (spec.get("securityContext") or {}).get("runAsNonRoot"):
            problems.append("a pod template lacks securityContext.runAsNonRoot: true")
        for container in _containers(template):
            context = container.get("securityContext") or {}
            if context.get("privileged") or context.get("allowPrivilegeEscalation", True):
                problems.append(f"container {container['name']} may escalate privileges")
    return problems


def identity_problems(doc: dict, service_accounts: dict[str, dict]) -> list[str]:
    """Ray pods run the cellfm image under a ServiceAccount defined here that carries the S3 role."""
    problems = []
    for cluster in cluster_specs(doc):
        for role, group, template in ray_pods(cluster):
            spec = template["spec"]
            name = spec.get("serviceAccountName")
            account = service_accounts.get(name)
            if account is None:
                problems.append(f"{role} pods run as ServiceAccount {name!r}, which infra/kuberay does not define")
            elif "eks.amazonaws.com/role-arn" not in account["metadata"].get("annotations", {}):
                problems.append(f"ServiceAccount {name!r} carries no IAM role (eks.amazonaws.com/role-arn)")
            images = {c["image"] for c in spec["containers"]}
            if images != {TEMPLATE_VALUES["CELLFM_IMAGE"]}:
                problems.append(f"{role} pods run {sorted(images)}, not the cellfm image ${{CELLFM_IMAGE}}")
        if cluster.get("rayVersion") != _installed_ray_version():
            problems.append(f"rayVersion {cluster.get('rayVersion')!r} differs from the image's Ray {_installed_ray_version()}")
    return problems


def _installed_ray_version() -> str:
    import ray

    return ray.__version__


def _service_accounts() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in all_documents() if doc.get("kind") == "ServiceAccount"}


@pytest.mark.parametrize("path,index", _document_params())
def test_manifest_is_secure_by_default(path, index):
    doc = document(path, index)
    assert (credential_problems(doc) + exposure_problems(doc) + pod_security_problems(doc)
            + identity_problems(doc, _service_accounts())) == []


def test_no_file_under_infra_holds_a_credential():
    files = [p for p in (REPO / "infra").rglob("*") if p.is_file() and p.suffix in {".yaml", ".py", ""}]
    assert files
    assert [f"{p.relative_to(REPO)}: {pattern.pattern}" for p in files for pattern in SECRET_TEXT
            if pattern.search(p.read_text())] == []


def pod_monitor_problems(monitor: dict, docs: list[dict]) -> list[str]:
    """A PodMonitor must select Ray pods defined here (their template labels plus the ray.io/node-type label
    KubeRay adds) and scrape ports those pods name."""
    wanted = monitor["spec"]["selector"].get("matchLabels", {})
    selected = [template for doc in docs for cluster in cluster_specs(doc) for role, _, template in ray_pods(cluster)
                if wanted.items() <= {**template.get("metadata", {}).get("labels", {}), "ray.io/node-type": role}.items()]
    if not selected:
        return [f"{_named(monitor)} selects no Ray pod of infra/kuberay"]
    return [f"{_named(monitor)}: port {endpoint['port']!r} is not named on a selected pod"
            for endpoint in monitor["spec"]["podMetricsEndpoints"] for template in selected
            if endpoint["port"] not in {p.get("name") for p in template["spec"]["containers"][0].get("ports", [])}]


@pytest.mark.parametrize("path,index", _document_params({"PodMonitor"}))
def test_pod_monitor_scrapes_ray_pods(path, index):
    assert pod_monitor_problems(document(path, index), all_documents()) == []


# ----------------------------------------------------------------------------------------------------
# infra/aws/cluster.yaml: the cluster launcher's schema, EC2's RunInstances input


def aws_cluster() -> dict:
    return yaml.safe_load(render(AWS_CLUSTER.read_text(), TEMPLATE_VALUES, source=str(AWS_CLUSTER)))


def botocore_shape_problems(value: Any, shape, where: str) -> list[str]:
    """`value` against a botocore input shape (structure keys, lists, scalar types)."""
    if shape.type_name == "structure":
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping"]
        problems = [f"{where}.{key}: not a field of {shape.name}" for key in value if key not in shape.members]
        for key in value.keys() & shape.members.keys():
            problems += botocore_shape_problems(value[key], shape.members[key], f"{where}.{key}")
        return problems
    if shape.type_name == "list":
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [p for i, item in enumerate(value) for p in botocore_shape_problems(item, shape.member, f"{where}[{i}]")]
    expected = {"string": str, "integer": int, "long": int, "boolean": bool}.get(shape.type_name)
    if expected and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
        return [f"{where}: expected {shape.type_name}, got {value!r}"]
    if shape.type_name == "string" and shape.enum and value not in shape.enum:
        return [f"{where}: {value!r} is not one of {shape.enum}"]
    return []


def aws_cluster_problems(config: dict) -> list[str]:
    import botocore.session
    from ray.autoscaler._private.util import prepare_config, validate_config

    import ray.autoscaler

    # As written, against the schema `ray up` uses; then as `ray up` fills it with its AWS defaults.
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    problems = [f"cluster launcher schema: {p}" for p in schema_problems(jsonschema.Draft7Validator(schema), config)]
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (jsonschema.ValidationError, ValueError, RuntimeError) as exc:
        problems.append(f"cluster launcher schema (with ray's defaults): {getattr(exc, 'message', exc)}")
    run_instances = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        problems += botocore_shape_problems(node_config, run_instances, f"available_node_types.{name}.node_config")
        if "Arn" not in node_config.get("IamInstanceProfile", {}):
            problems.append(f"node type {name}: no IamInstanceProfile (AWS access must come from the instance profile)")
        if node_config.get("MetadataOptions", {}).get("HttpTokens") != "required":
            problems.append(f"node type {name}: instance metadata without IMDSv2 tokens")
    if config.get("docker", {}).get("image") != TEMPLATE_VALUES["CELLFM_IMAGE"]:
        problems.append("docker.image is not the cellfm image ${CELLFM_IMAGE}")
    if "~/.ray/auth_token" not in config.get("file_mounts", {}):
        problems.append("the Ray auth token is not copied to the nodes (file_mounts ~/.ray/auth_token)")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config.get(key, []))
        if "RAY_AUTH_MODE=token" not in start:
            problems.append(f"{key} do not start Ray with RAY_AUTH_MODE=token")
        if "dashboard-host=0.0.0.0" in start:
            problems.append(f"{key} expose the dashboard and job server on every interface")
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        if any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])):
            problems.append(f"security group opens ports {rule.get('FromPort')}-{rule.get('ToPort')} to the internet")
    problems += credential_problems(config)
    return problems


def test_aws_cluster_matches_launcher_schema_and_is_secure():
    assert aws_cluster_problems(aws_cluster()) == []


def test_aws_gpu_nodes_hold_every_gpu_config():
    from cellfm.config import load_config

    gpu_types = [t for t in aws_cluster()["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    gpu_configs = [(p.name, cfg) for p in sorted((REPO / "configs").glob("*.yaml")) if (cfg := load_config(p)).train.use_gpu]
    assert gpu_types and gpu_configs
    for name, cfg in gpu_configs:
        per_node = [min(t["resources"]["CPU"] // cfg.train.cpus_per_worker, t["resources"]["GPU"] // cfg.train.gpus_per_worker)
                    for t in gpu_types]
        capacity = sum(n * t["max_workers"] for n, t in zip(per_node, gpu_types))
        assert capacity >= cfg.train.num_workers, f"{name}: {cfg.train.num_workers} Train workers, room for {capacity}"


# ----------------------------------------------------------------------------------------------------
# The image: infra/docker/Dockerfile and .dockerignore


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(arguments.split())))
            pending = ""
    return instructions


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pin(name: str) -> str:
    (req,) = [Requirement(r) for r in _pyproject()["project"]["dependencies"] if Requirement(r).name == name]
    (spec,) = req.specifier
    assert spec.operator == "==", f"{name} must be pinned exactly in pyproject.toml"
    return spec.version


def test_dockerfile_base_image_matches_the_pins():
    froms = [args for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    python = re.search(r">=\s*3\.(\d+)", _pyproject()["project"]["requires-python"]).group(1)
    assert froms == [f"rayproject/ray:{_pin('ray')}-py3{python}-gpu"]
    assert _pin("ray") == _installed_ray_version()


def test_dockerfile_runs_as_non_root_and_labels_the_revision():
    instructions = dockerfile_instructions()
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and all(user.split(":")[0] not in {"root", "0"} for user in users)
    assert instructions[-1] == ("USER", "ray")
    arg_at = instructions.index(("ARG", "GIT_REVISION"))
    labels = " ".join(args for keyword, args in instructions[arg_at:] if keyword == "LABEL")
    assert 'org.opencontainers.image.revision="${GIT_REVISION}"' in labels
    assert any(keyword == "RUN" and 'test -n "${GIT_REVISION}"' in args for keyword, args in instructions[arg_at:])


def test_dockerfile_installs_exactly_the_pins_of_pyproject():
    runs = [args for keyword, args in dockerfile_instructions() if keyword == "RUN"]
    (deps,) = [run for run in runs if "requirements_from_pyproject.py" in run]
    generated = re.search(r"requirements_from_pyproject\.py (\S+) ((?:--extra \S+ )*)> (\S+)", deps)
    assert generated, deps
    pyproject_in_image, extras, requirements_file = generated.group(1), generated.group(2).split()[1::2], generated.group(3)
    assert f"pip install --no-cache-dir -r {requirements_file}" in deps
    assert "torch.version.cuda" in deps  # a CPU torch build fails the image build
    # The pyproject.toml the script reads is the repository's own, copied in the same layer.
    copies = [args.split() for keyword, args in dockerfile_instructions() if keyword == "COPY"]
    assert any("pyproject.toml" in c and pyproject_in_image.startswith(c[-1]) for c in copies)
    # Every other pip install names no package: no pin is written twice.
    for run in runs:
        for install in re.findall(r"pip install ([^&|;]*)", run):
            words = install.split()
            packages = [w for i, w in enumerate(words) if not w.startswith("-") and words[i - 1] != "-r"]
            assert all(p.startswith("/") for p in packages), f"pip install of named packages: {install}"
    pins = pinned_requirements(REPO / "pyproject.toml", extras)
    optional = _pyproject()["project"]["optional-dependencies"]
    assert pins == _pyproject()["project"]["dependencies"] + [r for e in extras for r in optional[e]]
    assert f"torch=={_pin('torch')}" in pins and f"deepspeed=={_pin('deepspeed')}" in pins


def test_requirements_script_rejects_an_unknown_extra():
    done = subprocess.run([sys.executable, str(REPO / "infra" / "docker" / "requirements_from_pyproject.py"),
                           str(REPO / "pyproject.toml"), "--extra", "gpu"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no extra(s) gpu" in done.stderr and done.stdout == ""


def dockerignore_excludes(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    def regex(pattern: str) -> re.Pattern:
        out = re.escape(pattern.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        return re.compile("^" + out.replace(r"\*", "[^/]*").replace(r"\?", "[^/]") + "$")

    parts = relative.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if any(regex(pattern.lstrip("!")).match(c) for c in candidates):
            excluded = not negated
    return excluded


def test_dockerignore_sends_what_the_image_copies_and_nothing_else():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    sources = [src for keyword, args in dockerfile_instructions() if keyword == "COPY"
               for src in args.split()[:-1] if not src.startswith("--")]
    for source in sources:
        files = [f for f in tracked if f == source or f.startswith(source + "/")]
        assert files, f"COPY {source}: not in the repository"
        assert [f for f in files if dockerignore_excludes(f, patterns)] == [], f"COPY {source} is excluded"
    for private in (".venv/bin/python", ".git/config", "demo_output/runs/x", "tests/test_infra.py",
                    "benchmarks/results/x.json", ".env", "platform/cellfm/__pycache__/config.cpython-311.pyc"):
        assert dockerignore_excludes(private, patterns), private


def test_image_holds_the_paths_entrypoints_name():
    instructions = dockerfile_instructions()
    assert ("WORKDIR", IMAGE_APP_DIR) in instructions
    copies = {tuple(args.split()[-2:]) for keyword, args in instructions if keyword == "COPY"}
    assert {("jobs", f"{IMAGE_APP_DIR}/jobs"), ("configs", f"{IMAGE_APP_DIR}/configs")} <= copies


# ----------------------------------------------------------------------------------------------------
# The nightly feature refresh: a RayCronJob, or a CronJob whose pod creates a RayJob and waits for it

REFRESH_RAYCRONJOB = KUBERAY_DIR / "refresh-raycronjob.yaml"
REFRESH_CRONJOB = KUBERAY_DIR / "refresh-cronjob.yaml"
# The RayJob verbs the CronJob's pod needs: create the run's RayJob, poll its status, delete it when stopped.
# The refresh CronJob's pod: create/get/delete its RayJob, and get its own Job (the RayJob's owner).
SCHEDULER_RULES = [(["ray.io"], ["rayjobs"], ["create", "delete", "get"]), (["batch"], ["jobs"], ["get"])]
# Kubernetes names a CronJob's Job <cronjob>-<minutes since the epoch> (8 digits until the year 2160).
SCHEDULED_SUFFIX = len("-29000000")
# run-refresh.sh names the run's RayJob <Job>-ray: the RayJob's submitter Job carries the RayJob's name.
RAYJOB_SUFFIX = "-ray"
CRON_FIELDS = [("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7)]
CRON_NAMES = {3: ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
              4: ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]}


def cron_problems(schedule: str) -> list[str]:
    """A standard 5-field cron schedule (what Kubernetes' CronJob and KubeRay's RayCronJob parse, via
    robfig/cron's standard parser): each field *, a value, a range a-b, any of them with /step, or a
    comma list; month and weekday names allowed; no macros, no seconds, no TZ= prefix."""
    fields = schedule.split()
    if len(fields) != 5:
        return [f"schedule {schedule!r} has {len(fields)} fields; cron needs 5 (minute hour day month weekday)"]
    problems = []
    for index, (text, (name, low, high)) in enumerate(zip(fields, CRON_FIELDS)):
        names = CRON_NAMES.get(index, [])

        def value(word: str) -> int | None:
            if word.lower() in names:
                return names.index(word.lower()) + (1 if index == 3 else 0)
            return int(word) if word.isdigit() else None

        for part in text.split(","):
            span, _, step = part.partition("/")
            bounds = [low, high] if span == "*" else [value(w) for w in span.split("-", 1)]
            if step and (not step.isdigit() or int(step) == 0):
                problems.append(f"schedule {schedule!r}: {name} step {step!r} is not a positive number")
            if None in bounds or not all(low <= b <= high for b in bounds) or bounds[0] > bounds[-1]:
                problems.append(f"schedule {schedule!r}: {name} {part!r} is not within {low}-{high}")
    return problems


def _refresh_docs() -> dict[str, dict]:
    docs = {doc["kind"]: doc for doc in rendered_documents(REFRESH_CRONJOB)}
    (docs["RayCronJob"],) = rendered_documents(REFRESH_RAYCRONJOB)
    return copy.deepcopy(docs)


def refresh_schedule_problems(docs: dict[str, dict]) -> list[str]:
    """Both schedulers: a valid schedule and time zone, the same RayJob, names within the limits of the
    RayJobs they create; the CronJob forbids overlap, waits for its RayJob, and may do nothing else."""
    cron_job, ray_cron_job, config_map = docs["CronJob"], docs["RayCronJob"], docs["ConfigMap"]
    problems = []
    for doc in (cron_job, ray_cron_job):
        problems += cron_problems(doc["spec"]["schedule"])
        try:
            zoneinfo.ZoneInfo(doc["spec"].get("timeZone", ""))
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            problems.append(f"{_named(doc)}: timeZone {doc['spec'].get('timeZone')!r} is not a known time zone")
    (template,) = embedded_rayjobs(config_map) or [None]
    if template is None or template["spec"] != ray_cron_job["spec"]["jobTemplate"]:
        problems.append("the CronJob's RayJob template differs from the RayCronJob's jobTemplate")
    if cron_job["spec"].get("concurrencyPolicy") != "Forbid":
        problems.append("CronJob concurrencyPolicy is not Forbid: two refreshes could run at once")
    job_name = len(cron_job["metadata"]["name"]) + SCHEDULED_SUFFIX + len(RAYJOB_SUFFIX)
    if job_name > NAME_LIMITS["RayJob"]:
        problems.append(f"CronJob name gives RayJob names of {job_name} characters; KubeRay allows {NAME_LIMITS['RayJob']}")
    pod = cron_job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {var["name"]: var for var in container.get("env", [])}
    if env.get("JOB_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != \
            "metadata.labels['batch.kubernetes.io/job-name']":
        problems.append("the pod does not name its RayJob after its Job (JOB_NAME from the job-name label)")
    mounted = {v["name"]: v.get("configMap", {}).get("name") for v in pod.get("volumes", [])}
    script = next((m["mountPath"] + "/run-refresh.sh" for m in container.get("volumeMounts", [])
                   if mounted.get(m["name"]) == config_map["metadata"]["name"]), None)
    if script is None or container.get("command") != ["/bin/sh", script]:
        problems.append(f"the pod does not run run-refresh.sh of ConfigMap {config_map['metadata']['name']}")
    account = pod.get("serviceAccountName")
    bound = [b["roleRef"]["name"] for b in [docs["RoleBinding"]]
             if {"kind": "ServiceAccount", "name": account} in b["subjects"] and b["roleRef"]["kind"] == "Role"]
    rules = docs["Role"]["rules"] if docs["Role"]["metadata"]["name"] in bound else []
    if [(r["apiGroups"], r["resources"], sorted(r["verbs"])) for r in rules] != SCHEDULER_RULES:
        problems.append(f"ServiceAccount {account!r} must be bound to exactly {SCHEDULER_RULES} "
                        f"(apiGroups, resources, verbs), got {rules}")
    if docs["ServiceAccount"]["metadata"].get("annotations"):
        problems.append("the scheduler's ServiceAccount carries annotations (an IAM role?); it needs no AWS access")
    return problems


def test_refresh_schedulers_run_the_same_waited_for_refresh():
    docs = _refresh_docs()
    assert refresh_schedule_problems(docs) == []
    assert len(docs["RayCronJob"]["metadata"]["name"]) <= NAME_LIMITS["RayCronJob"]
    # The refresh: jobs/refresh.py parsed by cellfm's own parser, into an s3:// store and s3:// manifests.
    from cellfm.commands.refresh import feature_config

    spec = docs["RayCronJob"]["spec"]["jobTemplate"]
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["python", f"{IMAGE_APP_DIR}/jobs/refresh.py"] and entrypoint_problems(spec) == []
    cfg = feature_config(parse_job_arguments(REPO / "jobs" / "refresh.py", [image_path_to_repo(w) for w in words[2:]]))
    assert cfg.features.store.startswith("s3://") and cfg.train.storage_path.startswith("s3://")
    assert cfg.features.manifests and all(path.startswith("s3://") for path in cfg.features.manifests.values())
    assert cfg.features.checkpoint == "latest"  # the newest checkpoint of the run, found at every tick
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert spec["shutdownAfterJobFinishes"] and spec["ttlSecondsAfterFinished"] > 0
    assert spec["preRunningDeadlineSeconds"] > 0 and spec["activeDeadlineSeconds"] > 0
    # The CronJob's Job outlives every attempt of the RayJob, so its deadline never cuts a refresh short.
    attempts = spec.get("backoffLimit", 0) + 1
    job = docs["CronJob"]["spec"]["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] > attempts * (spec["preRunningDeadlineSeconds"] + spec["activeDeadlineSeconds"])


@pytest.mark.parametrize("schedule,expected", [
    ("0 2 * * *", []), ("*/15 1-5 * jan-mar mon,fri", []), ("30 23 1,15 * 0", []),
    ("0 2 * *", ["has 4 fields"]), ("TZ=UTC 0 2 * * *", ["has 6 fields"]), ("61 2 * * *", ["minute '61'"]),
    ("0 2 * * 8", ["day of week '8'"]), ("*/0 * * * *", ["step '0'"]), ("@daily", ["has 1 fields"])])
def test_cron_check(schedule, expected):
    problems = cron_problems(schedule)
    assert len(problems) == len(expected) and all(e in p for e, p in zip(expected, problems)), problems


REFRESH_BREAKS = [
    pytest.param(lambda d: _set(d["CronJob"], "spec.concurrencyPolicy", "Allow"), "not Forbid", id="overlap"),
    pytest.param(lambda d: d["Role"]["rules"][0]["verbs"].append("list"), "exactly", id="rbac-too-wide"),
    pytest.param(lambda d: _set(d["RoleBinding"]["subjects"][0], "name", "default"), "exactly", id="rbac-unbound"),
    pytest.param(lambda d: _set(d["RayCronJob"], "spec.schedule", "0 2 * * * *"), "has 6 fields", id="schedule"),
    pytest.param(lambda d: _set(d["RayCronJob"]["spec"]["jobTemplate"], "backoffLimit", 5), "differs", id="drift"),
    pytest.param(lambda d: _set(d["CronJob"]["metadata"], "name", "cellfm-" + "r" * 28), "KubeRay allows 47",
                 id="name-length"),
    pytest.param(lambda d: d["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"].pop(),
                 "JOB_NAME", id="name-not-from-job"),
]


@pytest.mark.parametrize("mutate,expected", REFRESH_BREAKS)
def test_refresh_check_rejects_a_broken_scheduler(mutate, expected):
    docs = _refresh_docs()
    mutate(docs)
    problems = refresh_schedule_problems(docs)
    assert any(expected in problem for problem in problems), problems


FAKE_KUBECTL = """#!/bin/sh
# A stand-in for kubectl: records each call, "creates" from stdin, answers status reads from a list.
echo "$*" >> "$FAKE_DIR/calls"
case "$*" in
  "get rayjob "*" -o name")
    test -f "$FAKE_DIR/exists" && exit 0
    line=$(head -n 1 "$FAKE_DIR/lookups" 2>/dev/null); sed -i 1d "$FAKE_DIR/lookups" 2>/dev/null
    if test "$line" = ERROR; then echo "Unable to connect to the server: i/o timeout" >&2
    else echo "Error from server (NotFound): rayjobs.ray.io \"${3}\" not found" >&2; fi
    exit 1 ;;
  "get job "*" -o jsonpath="*) printf %s 5f0c2a52-8d1e-4c1b-9a57-3f1d2b7e9c10 ;;
  "create -f -") cat > "$FAKE_DIR/created.yaml" && touch "$FAKE_DIR/exists" ;;
  "get rayjob "*" -o jsonpath="*)
    line=$(head -n 1 "$FAKE_DIR/statuses"); sed -i 1d "$FAKE_DIR/statuses"
    test "$line" != ERROR && printf %s "$line" ;;
  "delete rayjob "*) rm -f "$FAKE_DIR/exists" ;;
  *) echo "unexpected kubectl $*" >&2; exit 3 ;;
esac
"""


def _run_refresh_script(tmp_path: Path, statuses: list[str], job_name: str = "cellfm-refresh-29123456",
                        exists: bool = False, lookups: list[str] = ()) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The CronJob's own run-refresh.sh and RayJob template (from the rendered ConfigMap) against a fake
    kubectl that reports `statuses` one per poll; while the RayJob does not exist, each look-up for it fails
    as `lookups` says (ERROR: the API server is unreachable), then with NotFound."""
    config_map = _refresh_docs()["ConfigMap"]
    for name, text in config_map["data"].items():
        (tmp_path / name).write_text(text)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    (bin_dir / "kubectl").chmod(0o755)
    (tmp_path / "statuses").write_text("".join(f"{line}\n" for line in statuses))
    (tmp_path / "lookups").write_text("".join(f"{line}\n" for line in lookups))
    if exists:
        (tmp_path / "exists").touch()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_DIR": str(tmp_path), "JOB_NAME": job_name, "POLL_SECONDS": "0",
           "MAX_GET_FAILURES": "3", "RAYJOB_TEMPLATE": str(tmp_path / "rayjob.yaml")}
    done = subprocess.run(["/bin/sh", str(tmp_path / "run-refresh.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return done, calls


def test_refresh_script_creates_the_runs_rayjob_and_waits_for_success(tmp_path):
    done, calls = _run_refresh_script(tmp_path, ["/", "Initializing/", "Running/RUNNING", "Running/RUNNING",
                                                 "Complete/SUCCEEDED", "Complete/SUCCEEDED"])
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert calls[:3] == ["get rayjob cellfm-refresh-29123456-ray -o name",
                         "get job cellfm-refresh-29123456 -o jsonpath={.metadata.uid}", "create -f -"]
    assert len(calls) == 3 + 5  # polled until the RayJob completed, then stopped
    created = yaml.safe_load((tmp_path / "created.yaml").read_text())
    template = embedded_rayjobs(_refresh_docs()["ConfigMap"])[0]
    assert created["metadata"]["name"] == "cellfm-refresh-29123456-ray"
    # Owned by the pod's Job, so the CronJob's history limit deletes old RayJobs with their Jobs.
    assert created["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job",
                                                       "name": "cellfm-refresh-29123456",
                                                       "uid": "5f0c2a52-8d1e-4c1b-9a57-3f1d2b7e9c10"}]
    assert {**created, "metadata": template["metadata"]} == template  # only name and owner differ
    assert {k: v for k, v in created["metadata"].items() if k not in ("name", "ownerReferences")} == \
        {k: v for k, v in template["metadata"].items() if k != "name"}
    assert "RayJob cellfm-refresh-29123456-ray succeeded" in done.stdout


@pytest.mark.parametrize("final", ["Failed/FAILED", "Complete/FAILED", "Complete/STOPPED", "ValidationFailed/"])
def test_refresh_script_fails_when_the_rayjob_failed(tmp_path, final):
    done, calls = _run_refresh_script(tmp_path, ["Running/RUNNING", final])
    assert done.returncode == 1 and f"ended as {final}" in done.stderr, (done.returncode, done.stderr)
    assert calls.count("create -f -") == 1 and len(calls) == 5


def test_refresh_script_retried_pod_waits_for_the_existing_rayjob(tmp_path):
    done, calls = _run_refresh_script(tmp_path, ["Running/RUNNING", "Complete/SUCCEEDED"], exists=True)
    assert done.returncode == 0 and "create -f -" not in calls and "exists (a retried pod)" in done.stdout


def test_refresh_script_gives_up_when_the_rayjob_cannot_be_read(tmp_path):
    (tmp_path / "lost").mkdir()
    done, calls = _run_refresh_script(tmp_path / "lost", ["Running/RUNNING", "ERROR", "ERROR", "ERROR"])
    assert done.returncode == 1 and "3 attempts in a row" in done.stderr
    # Given up: the refresh it can no longer follow is stopped, not left running into the next night's.
    assert calls[-1].startswith("delete rayjob cellfm-refresh-29123456-ray") and \
        not (tmp_path / "lost" / "exists").exists()
    # Failed reads between successful ones do not add up.
    (tmp_path / "flaky").mkdir()
    done, _ = _run_refresh_script(tmp_path / "flaky", ["ERROR", "ERROR", "Running/RUNNING", "ERROR", "Complete/SUCCEEDED"])
    assert done.returncode == 0, done.stderr


def test_refresh_script_retries_a_failed_lookup_instead_of_creating_a_second_refresh(tmp_path):
    """A look-up that fails for another reason than NotFound (API server unreachable) is retried; only
    NotFound creates the RayJob, and a retried pod whose RayJob exists never creates one."""
    done, calls = _run_refresh_script(tmp_path, ["Complete/SUCCEEDED"], lookups=["ERROR", "ERROR"])
    assert done.returncode == 0, done.stderr
    assert calls.count("get rayjob cellfm-refresh-29123456-ray -o name") == 3 and calls.count("create -f -") == 1
    (tmp_path / "down").mkdir()
    done, calls = _run_refresh_script(tmp_path / "down", ["Complete/SUCCEEDED"], lookups=["ERROR"] * 5)
    assert done.returncode == 1 and "cannot create or read RayJob" in done.stderr and "create -f -" not in calls


def test_refresh_script_rejects_a_rayjob_name_over_kuberays_limit(tmp_path):
    done, calls = _run_refresh_script(tmp_path, ["Complete/SUCCEEDED"], job_name="cellfm-refresh-manual-" + "x" * 22)
    assert done.returncode == 2 and "KubeRay allows 47" in done.stderr and calls == []


# ----------------------------------------------------------------------------------------------------
# Each check rejects a broken copy of a real manifest


def _pretrain() -> dict:
    (doc,) = rendered_documents(KUBERAY_DIR / "pretrain-rayjob.yaml")
    return copy.deepcopy(doc)


def _gpu_group(doc: dict) -> dict:
    return next(g for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")


def _set(doc: dict, dotted: str, value: Any) -> dict:
    node = doc
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    return doc


def _break_entrypoint(old: str, new: str):
    return lambda doc: _set(doc, "spec.entrypoint", doc["spec"]["entrypoint"].replace(old, new))


MUTATIONS = [
    pytest.param(lambda d: _set(d, "spec.shutdownAfterJobFinish", True), crd_problems,
                 "'shutdownAfterJobFinish' was unexpected", id="crd-misspelt-field"),
    pytest.param(lambda d: _set(_gpu_group(d)["template"]["spec"]["containers"][0], "gpus", 1), crd_problems,
                 "'gpus' was unexpected", id="crd-unknown-field-in-pod-template"),
    pytest.param(lambda d: _set(d, "spec.rayClusterSpec.authOptions", {"mode": "on"}), crd_problems,
                 "'on' is not one of", id="crd-bad-enum"),
    pytest.param(lambda d: _set(d, "metadata.labelz", {}), crd_problems, "'labelz' was unexpected", id="crd-metadata"),
    pytest.param(lambda d: _set(d, "metadata.name", "cellfm-pretrain-" + "x" * 32), operator_problems,
                 "KubeRay allows 47 for a RayJob", id="operator-name-length"),
    pytest.param(lambda d: _set(d, "spec.shutdownAfterJobFinishes", False), operator_problems,
                 "ttlSecondsAfterFinished needs shutdownAfterJobFinishes", id="operator-ttl-without-shutdown"),
    pytest.param(lambda d: _set(d, "spec.rayClusterSpec.rayVersion", "2.49.0"), operator_problems,
                 "needs rayVersion >= 2.52.0", id="operator-token-auth-version"),
    pytest.param(_break_entrypoint("--num-workers", "--num-gpus"), lambda d: entrypoint_problems(d["spec"]),
                 "pretrain.py rejects", id="entrypoint-unknown-flag"),
    pytest.param(_break_entrypoint("train.max_failures=3", "train.max_failure=3"), lambda d: entrypoint_problems(d["spec"]),
                 "unknown config key(s) train.max_failure", id="entrypoint-unknown-config-key"),
    pytest.param(_break_entrypoint("jobs/pretrain.py", "jobs/pretrian.py"), lambda d: entrypoint_problems(d["spec"]),
                 "is not a job script", id="entrypoint-missing-script"),
    pytest.param(_break_entrypoint("s3://example-cellfm-bucket/cellfm/runs", "/tmp/runs"),
                 lambda d: entrypoint_problems(d["spec"]), "train.storage_path='/tmp/runs' is not on s3://",
                 id="entrypoint-local-storage"),
    pytest.param(lambda d: _set(_gpu_group(d), "minReplicas", 4), lambda d: entrypoint_problems(d["spec"]),
                 "at its minimum size holds 4", id="entrypoint-workers-do-not-fit"),
    pytest.param(lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}), credential_problems, "AWS_SECRET_ACCESS_KEY has a literal value",
        id="credential-in-env"),
    pytest.param(lambda d: _set(d, "spec.rayClusterSpec.headGroupSpec.serviceType", "LoadBalancer"), exposure_problems,
                 "head service type 'LoadBalancer'", id="exposed-dashboard"),
    pytest.param(lambda d: _set(d, "spec.rayClusterSpec.authOptions.mode", "disabled"), exposure_problems,
                 "authOptions.mode is not token", id="auth-off"),
    pytest.param(lambda d: _set(_gpu_group(d)["template"]["spec"], "securityContext", {}), pod_security_problems,
                 "runAsNonRoot", id="root-pod"),
    pytest.param(lambda d: _set(_gpu_group(d)["template"]["spec"], "serviceAccountName", "default"),
                 lambda d: identity_problems(d, _service_accounts()), "which infra/kuberay does not define",
                 id="pod-without-s3-identity"),
]


@pytest.mark.parametrize("mutate,check,expected", MUTATIONS)
def test_each_check_rejects_a_broken_manifest(mutate, check, expected):
    if check is crd_problems and not KUBERAY_SCHEMAS.is_dir():
        pytest.skip(f"KubeRay v1.7.0 CRD schemas not found at {KUBERAY_SCHEMAS}")
    assert check(_pretrain()) == []
    broken = _pretrain()
    mutate(broken)
    problems = check(broken)
    assert any(expected in problem for problem in problems), problems


def test_aws_checks_reject_a_broken_cluster():
    config = aws_cluster()
    config["available_node_types"]["gpu"]["node_config"]["InstanceTyp"] = "p5.48xlarge"
    del config["available_node_types"]["data"]["node_config"]["IamInstanceProfile"]
    config["head_start_ray_commands"][-1] += " --dashboard-host=0.0.0.0"
    config["provider"]["aws_access_key_id"] = "AKIAABCDEFGHIJKLMNOP"
    config["idle_timeout"] = 3
    problems = aws_cluster_problems(config)
    for expected in ("InstanceTyp: not a field of RunInstancesRequest", "node type data: no IamInstanceProfile",
                     "head_start_ray_commands expose the dashboard", "credential-like text",
                     "'idle_timeout' was unexpected"):
        assert any(expected in problem for problem in problems), (expected, problems)


def test_kubernetes_check_rejects_a_broken_object():
    account = copy.deepcopy(_service_accounts()["cellfm-ray"])
    account["automountServiceAccountTokens"] = False
    assert any("automountServiceAccountTokens" in p for p in kubernetes_problems(account))
    (head_monitor, _) = rendered_documents(KUBERAY_DIR / "podmonitor.yaml")
    monitor = copy.deepcopy(head_monitor)
    monitor["spec"]["podMetricsEndpoints"][0]["portName"] = "metrics"
    assert any("'portName' was unexpected" in p for p in kubernetes_problems(monitor))
    monitor = copy.deepcopy(head_monitor)
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = "prometheus"
    problems = pod_monitor_problems(monitor, all_documents())
    assert problems and set(problems) == {"PodMonitor/cellfm-ray-head: port 'prometheus' is not named on a selected pod"}
    monitor["spec"]["selector"]["matchLabels"]["ray.io/node-type"] = "driver"
    assert pod_monitor_problems(monitor, all_documents()) == ["PodMonitor/cellfm-ray-head selects no Ray pod of infra/kuberay"]


# ----------------------------------------------------------------------------------------------------
# infra/aws/eks-cluster.yaml: node groups every pod of infra/kuberay fits on

EKS_CLUSTER = REPO / "infra" / "aws" / "eks-cluster.yaml"
# Allocatable (CPUs, GiB, GPUs) of the runbook's instance types on the EKS AMI: capacity less kube-reserved
# (CPU 6% of the first core, 1% of the second, 0.5% of cores 3-4, 0.25% of the rest; memory 255 MiB +
# 11 MiB per allowed pod, maxPods 234 / 737) and 100 MiB eviction threshold.
ALLOCATABLE = {"m6i.4xlarge": (15.89, 61.1, 0), "p4d.24xlarge": (95.69, 1116.0, 8)}
# What the node's own pods (aws-node, kube-proxy, the NVIDIA device plugin) request, left free on every node.
DAEMON_RESERVE = (0.5, 1.0)
# The ClusterConfig fields (eksctl.io/v1alpha5) this file may use; a misspelt one would be rejected by eksctl.
EKSCTL_FIELDS = {
    "": {"apiVersion", "kind", "metadata", "iam", "managedNodeGroups"},
    "metadata": {"name", "region", "version"},
    "iam": {"withOIDC"},
    "managedNodeGroups": {"name", "instanceType", "desiredCapacity", "minSize", "maxSize", "volumeSize", "labels",
                          "taints"},
    "taints": {"key", "value", "effect"},
}
TAINT_EFFECTS = {"NoSchedule", "PreferNoSchedule", "NoExecute"}


def eks_cluster() -> dict:
    return yaml.safe_load(render(EKS_CLUSTER.read_text(), TEMPLATE_VALUES, source=str(EKS_CLUSTER)))


def eks_config_problems(config: dict) -> list[str]:
    problems = [f"{where or 'top level'}: unknown field {key!r}" for where, keys in
                [("", config), ("metadata", config.get("metadata", {})), ("iam", config.get("iam", {}))]
                for key in keys if key not in EKSCTL_FIELDS[where]]
    if (config.get("apiVersion"), config.get("kind")) != ("eksctl.io/v1alpha5", "ClusterConfig"):
        problems.append("not an eksctl.io/v1alpha5 ClusterConfig")
    for group in config.get("managedNodeGroups", []):
        problems += [f"node group {group.get('name')}: unknown field {key!r}" for key in group
                     if key not in EKSCTL_FIELDS["managedNodeGroups"]]
        if group.get("instanceType") not in ALLOCATABLE:
            problems.append(f"node group {group.get('name')}: instance type {group.get('instanceType')} has no "
                            "allocatable figures in this test")
        if not group.get("minSize", 0) <= group.get("desiredCapacity", 0) <= group.get("maxSize", 0):
            problems.append(f"node group {group.get('name')}: needs minSize <= desiredCapacity <= maxSize")
        for taint in group.get("taints", []):
            problems += [f"node group {group.get('name')}: taint field {key!r}" for key in taint
                         if key not in EKSCTL_FIELDS["taints"]]
            if taint.get("effect") not in TAINT_EFFECTS:
                problems.append(f"node group {group.get('name')}: taint effect {taint.get('effect')!r}")
    return problems


def _quantity(value: str | int | float, binary: bool) -> float:
    """A Kubernetes quantity as CPUs (`500m` -> 0.5) or GiB (`512Mi` -> 0.5)."""
    text = str(value)
    if text.endswith("m") and not binary:
        return float(text[:-1]) / 1000
    for suffix, scale in {"Ki": 2 ** -20, "Mi": 2 ** -10, "Gi": 1.0, "Ti": 2 ** 10}.items():
        if text.endswith(suffix):
            return float(text[:-2]) * scale
    return float(text) / (2 ** 30 if binary else 1)


def _tolerated(template: dict, taints: list[dict]) -> bool:
    tolerations = template["spec"].get("tolerations", [])
    return all(any(t.get("key") == taint["key"] and (t.get("operator") == "Exists" or t.get("value") == taint["value"])
                   and t.get("effect") in (None, taint["effect"]) for t in tolerations) for taint in taints)


def unschedulable_pods(docs: list[dict], config: dict) -> list[str]:
    """Pod templates no node group can ever hold: requests above one node's allocatable (less the daemon
    reserve), a GPU on a group without GPUs, or taints of every group that fits not tolerated."""
    problems = []
    for doc in docs:
        for template in pod_templates(doc):
            requests = {}
            for container in template["spec"]["containers"]:
                for key, value in container.get("resources", {}).get("requests", {}).items():
                    requests[key] = requests.get(key, 0.0) + _quantity(value, binary=key == "memory")
            fits = []
            for group in config["managedNodeGroups"]:
                cpus, gib, gpus = ALLOCATABLE[group["instanceType"]]
                if (requests.get("cpu", 0) <= cpus - DAEMON_RESERVE[0] and requests.get("memory", 0) <= gib - DAEMON_RESERVE[1]
                        and requests.get("nvidia.com/gpu", 0) <= gpus and _tolerated(template, group.get("taints", []))):
                    fits.append(group["name"])
            if not fits:
                problems.append(f"{_named(doc)}: a pod requesting {requests} fits no node group")
    return problems


def _scheduled_documents() -> list[dict]:
    docs = all_documents()
    return docs + [job for doc in docs if doc.get("kind") == "ConfigMap" for job in embedded_rayjobs(doc)]


def test_eks_cluster_config_uses_only_eksctl_fields_and_taints_the_gpu_group():
    config = eks_cluster()
    assert eks_config_problems(config) == []
    groups = {g["name"]: g for g in config["managedNodeGroups"]}
    assert groups["gpu"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]


def test_every_pod_of_infra_kuberay_fits_a_node_of_the_runbooks_cluster():
    docs = _scheduled_documents()
    assert sum(1 for doc in docs for _ in pod_templates(doc)) >= 14  # heads, worker groups, submitters, CronJob pod
    assert unschedulable_pods(docs, eks_cluster()) == []


def test_the_schedulability_check_rejects_what_would_stay_pending():
    config = eks_cluster()
    pretrain = _pretrain()
    data = next(g for g in pretrain["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "data")
    data["template"]["spec"]["containers"][0]["resources"]["requests"] = {"cpu": "16", "memory": "64Gi"}
    assert any("fits no node group" in p for p in unschedulable_pods([pretrain], config))
    untolerated = _pretrain()
    _gpu_group(untolerated)["template"]["spec"].pop("tolerations")
    assert any("nvidia.com/gpu" in p for p in unschedulable_pods([untolerated], config))
    assert any("unknown field 'nodeTaints'" in p for p in eks_config_problems(
        {**config, "managedNodeGroups": [{**config["managedNodeGroups"][1], "nodeTaints": []}]}))


def test_the_runbook_creates_the_cluster_from_the_config_file_and_uses_no_missing_eksctl_flag():
    runbook = (REPO / "docs" / "cluster.md").read_text()
    assert "eksctl create cluster -f eks-cluster.yaml" in runbook and "infra/aws/eks-cluster.yaml" in runbook
    assert "--node-taints" not in runbook  # not an eksctl flag: taints come from the ClusterConfig
