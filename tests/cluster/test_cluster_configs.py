"""cluster/: the launcher YAML against Ray's own schema, the KubeRay manifests against the CRD fields they use, and
the security promises (token auth everywhere, no Ray port outside the cluster). None of it can be started here."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from curate.cli import build_parser
from curate.config import load_pipeline

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"

# The RayCluster / RayJob fields these manifests use (KubeRay ray.io/v1): types, required keys, and no others, so a
# misspelt field fails here instead of being dropped by the API server.
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}  # rayStartParams: map[string]string
POD_TEMPLATE = {
    "type": "object", "required": ["spec"],
    "properties": {"spec": {
        "type": "object", "required": ["containers"],
        "properties": {
            "serviceAccountName": {"type": "string"},
            "containers": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "image"], "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "image": {"type": "string"},
                               "resources": {"type": "object", "additionalProperties": False,
                                             "properties": {"requests": STRING_MAP, "limits": STRING_MAP}},
                               "ports": {"type": "array"}, "volumeMounts": {"type": "array"},
                               "env": {"type": "array"}}}},
            "volumes": {"type": "array"}, "tolerations": {"type": "array"}}}},
}
CLUSTER_SPEC = {
    "type": "object", "required": ["rayVersion", "authOptions", "headGroupSpec"], "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "authOptions": {"type": "object", "required": ["mode"], "properties": {"mode": {"enum": ["token"]}}},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"], "additionalProperties": False,
                          "properties": {"serviceType": {"enum": ["ClusterIP"]}, "rayStartParams": STRING_MAP,
                                         "template": POD_TEMPLATE}},
        "workerGroupSpecs": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"],
            "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer", "minimum": 0},
                           "minReplicas": {"type": "integer", "minimum": 0},
                           "maxReplicas": {"type": "integer", "minimum": 1}, "rayStartParams": STRING_MAP,
                           "template": POD_TEMPLATE}}},
    },
}
MANIFEST = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "ray.io/v1"}, "metadata": {"type": "object", "required": ["name"]}}}
RAYCLUSTER = {**MANIFEST, "properties": {**MANIFEST["properties"], "kind": {"const": "RayCluster"}, "spec": CLUSTER_SPEC}}
RAYJOB = {**MANIFEST, "properties": {**MANIFEST["properties"], "kind": {"const": "RayJob"}, "spec": {
    "type": "object", "required": ["entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes"],
    "additionalProperties": False,
    "properties": {"entrypoint": {"type": "string"}, "shutdownAfterJobFinishes": {"type": "boolean"},
                   "ttlSecondsAfterFinished": {"type": "integer"}, "backoffLimit": {"type": "integer"},
                   "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "SidecarMode"]},
                   "runtimeEnvYAML": {"type": "string"}, "rayClusterSpec": CLUSTER_SPEC}}}}


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3])


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load("aws.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu"]["min_worker"] = 1  # a typo Ray's schema must catch
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_launcher_runs_ray_with_token_auth_and_no_public_dashboard():
    config = _load("aws.yaml")
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    for command in (c for c in starts if "ray start" in c):
        assert "export RAY_AUTH_MODE=token;" in command
        assert "0.0.0.0" not in command
    head = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head and "object_spilling_config" in head
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert "download_node" in config["available_node_types"]["download"]["resources"]


@pytest.mark.parametrize("name, schema", [("kuberay/raycluster.yaml", RAYCLUSTER), ("kuberay/rayjob.yaml", RAYJOB)])
def test_kuberay_manifests_match_the_crd_fields_they_use(name, schema):
    manifest = _load(name)
    jsonschema.validate(manifest, schema)
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    assert _version(spec["rayVersion"]) >= (2, 52, 0)  # token auth needs Ray 2.52+
    for group in spec.get("workerGroupSpecs", []):
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    bad = copy.deepcopy(manifest)
    bad_spec = bad["spec"].get("rayClusterSpec", bad["spec"])
    bad_spec["headGroupSpec"]["serviceType"] = "LoadBalancer"  # the Jobs API on the internet: refused
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_rayjob_entrypoint_is_a_valid_curate_run():
    entrypoint = shlex.split(_load("kuberay/rayjob.yaml")["spec"]["entrypoint"])
    assert entrypoint[:3] == ["python", "-m", "curate.cli"]
    args = build_parser().parse_args(entrypoint[3:])
    assert args.command == "run" and args.address == "auto"
    config = load_pipeline(Path(__file__).resolve().parents[2] / args.pipeline, args.set)
    download = next(stage for stage in config.stages if stage.stage == "download")
    assert download.resources.custom == {"download_node": 1.0}
    groups = _load("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any("download_node" in g["rayStartParams"].get("resources", "") for g in groups)
