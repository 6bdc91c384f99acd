"""cluster/: the launcher YAML against Ray's own schema, the KubeRay manifests against the CRD fields they use, and
the security promises (token auth everywhere, no Ray port outside the cluster, IMDSv2 on every node, NetworkPolicies
keeping Ray pods off the metadata address and private ranges). None of it can be started here."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from curate.cli import build_parser
from curate.core.pipeline import load_pipeline

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"

# The RayCluster / RayJob fields these manifests use (KubeRay ray.io/v1): types, required keys, and no others, so a
# misspelt field fails here instead of being dropped by the API server.
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}  # rayStartParams: map[string]string
POD_TEMPLATE = {
    "type": "object", "required": ["spec"],
    "properties": {"metadata": {"type": "object", "additionalProperties": False, "properties": {"labels": STRING_MAP}},
                   "spec": {
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


def test_launcher_nodes_require_imdsv2_one_hop_away():
    """IMDSv2 only (a token from a PUT first: a downloader's GET to 169.254.169.254 gets nothing), and a response hop
    limit of 1, so a container on a bridge network cannot fetch the instance role's credentials either; the nodes'
    own processes (Ray on the host) still can."""
    for name, node_type in _load("aws.yaml")["available_node_types"].items():
        assert node_type["node_config"].get("MetadataOptions") == {
            "HttpEndpoint": "enabled", "HttpTokens": "required", "HttpPutResponseHopLimit": 1}, name


POD_LABEL = ("app.kubernetes.io/name", "curate-ray")  # what the NetworkPolicies select Ray pods by
METADATA = ["169.254.169.254", "fd00:ec2::254", "169.254.170.2"]  # EC2/GCE/Azure metadata, ECS/EKS credentials
PRIVATE = ["10.0.0.1", "10.100.0.1", "172.16.0.10", "172.31.255.1", "192.168.1.1", "100.64.0.1", "fc00::1",
           "fe80::1"]


def _policies() -> list[dict]:
    docs = [doc for doc in yaml.safe_load_all((CLUSTER / "kuberay" / "networkpolicy.yaml").read_text()) if doc]
    assert docs and all(doc["apiVersion"] == "networking.k8s.io/v1" and doc["kind"] == "NetworkPolicy"
                        for doc in docs)
    return docs


def _pods(manifest: dict) -> list[tuple[str, dict]]:
    """(node type, pod labels) of every pod template of a RayCluster or RayJob, with the labels KubeRay adds."""
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    groups = [("head", spec["headGroupSpec"])] + [("worker", g) for g in spec.get("workerGroupSpecs", [])]
    return [(kind, {**group["template"].get("metadata", {}).get("labels", {}), "ray.io/node-type": kind})
            for kind, group in groups]


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions are not evaluated here
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _egress_allowed(labels: dict, address: str, port: int) -> bool:
    """Whether the policies that select a pod with ``labels`` let it open a connection to ``address`` (not a pod's
    address: podSelector and namespaceSelector peers never match it) on TCP ``port``. Not selected by any policy
    with Egress: everything is allowed, as Kubernetes does."""
    import ipaddress

    ip = ipaddress.ip_address(address)
    policies = [p for p in _policies() if "Egress" in p["spec"]["policyTypes"]
                and _selects(p["spec"]["podSelector"], labels)]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") in (None, port) and p.get("protocol", "TCP") == "TCP" for p in ports):
                continue
            for peer in rule.get("to") or [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}]:
                block = peer.get("ipBlock")
                if block is None:
                    continue
                net = ipaddress.ip_network(block["cidr"])
                if ip.version == net.version and ip in net and not any(
                        ip in ipaddress.ip_network(e) for e in block.get("except", []) if
                        ipaddress.ip_network(e).version == ip.version):
                    return True
    return False


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_pods_cannot_reach_the_metadata_address_or_private_ranges(name):
    pods = _pods(_load(name))
    assert all(labels.get(POD_LABEL[0]) == POD_LABEL[1] for _, labels in pods), pods  # the policies select them
    for kind, labels in pods:
        for address in METADATA:
            assert not any(_egress_allowed(labels, address, port) for port in (80, 443, 8080)), (kind, address)
        assert _egress_allowed(labels, "93.184.215.14", 443) and _egress_allowed(labels, "2606:2800:21f::1", 8080)
        if kind == "worker":  # the download nodes; the head's autoscaler must reach the API server (443, 6443)
            for address in PRIVATE:
                assert not any(_egress_allowed(labels, address, port) for port in (22, 80, 443, 6379, 8265)), address


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_dashboard_is_loopback_or_open_to_the_operator_only(name):
    """The Jobs API runs any command it is sent: on a RayCluster it listens on the head pod's loopback (kubectl
    port-forward reaches it there); a RayJob's operator polls it through the head Service, so there it listens on
    the pod's address and only the KubeRay operator and the cluster's own pods may connect."""
    manifest = _load(name)
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host")
    if manifest["kind"] == "RayCluster":
        assert host == "127.0.0.1"
        return
    assert manifest["spec"]["submissionMode"] == "SidecarMode"  # the submitter in the head pod: 127.0.0.1
    head = next(labels for kind, labels in _pods(manifest) if kind == "head")
    ingress = [p for p in _policies() if "Ingress" in p["spec"]["policyTypes"]
               and _selects(p["spec"]["podSelector"], head)]
    assert ingress
    for policy in ingress:
        for rule in policy["spec"].get("ingress", []):
            ports = [p.get("port") for p in rule.get("ports") or [{}]]
            if None not in ports and 8265 not in ports and "dashboard" not in ports:
                continue
            for peer in rule.get("from") or [{}]:
                assert "ipBlock" not in peer and peer, rule  # no address range, no "from anywhere"
                pods = peer.get("podSelector", {}).get("matchLabels", {})
                assert pods in ({POD_LABEL[0]: POD_LABEL[1]}, {"app.kubernetes.io/name": "kuberay-operator"}), rule
