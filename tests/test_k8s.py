"""deploy/k8s/: the Kubernetes manifests, validated offline against Kubernetes' JSON schemas
(kubernetes-validate, strict) and against each other and the serving image. Nothing here
applies them to a cluster (docs/deploy.md)."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


K8S = DEPLOY / "k8s"
K8S_VERSIONS = ("1.29.0", None)  # an older cluster and the newest schema bundled (None)

# The Prometheus Operator's PodMonitor is a CRD, not in kubernetes-validate's schemas: the
# fields used here, checked against their documented types.
PODMONITOR_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["selector", "podMetricsEndpoints"], "additionalProperties": False,
                 "properties": {
                     "selector": {"type": "object", "required": ["matchLabels"],
                                  "properties": {"matchLabels": {"type": "object",
                                                                 "additionalProperties": {"type": "string"}}}},
                     "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "required": ["port"], "additionalProperties": False,
                         "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                        "interval": {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h))+$"}}}}}}},
}


def _docs():
    import yaml
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            out.append((path, doc))
    return out


def test_manifests_validate_against_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (the test extra)")
    import jsonschema
    checked = set()
    for path, doc in _docs():
        kind = doc["kind"]
        if kind == "Kustomization":  # kustomize's file, not an API object: checked below
            continue
        if kind == "PodMonitor":
            jsonschema.validate(doc, PODMONITOR_SCHEMA)
            checked.add(kind)
            continue
        for v in K8S_VERSIONS:
            kv.validate(doc, v or kv.latest_version(), strict=True)
        checked.add(kind)
    assert checked == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodMonitor", "PodDisruptionBudget",
                       "PersistentVolumeClaim", "Ingress", "ConfigMap"}
    # the validator does bite: an unknown field and a wrong type are refused
    import copy
    dep = copy.deepcopy(next(d for _, d in _docs() if d["kind"] == "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, kv.latest_version(), strict=True)
    dep = copy.deepcopy(next(d for _, d in _docs() if d["kind"] == "Deployment"))
    dep["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, kv.latest_version(), strict=True)


def test_manifests_agree_with_each_other_and_the_image():
    """What no schema checks: selectors, port names, the HPA's metrics and target, the probes'
    script, the volumes the entrypoint writes to, the kustomization's list."""
    import re

    import yaml
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _docs() if d["kind"] != "Kustomization"}
    dep = docs[("Deployment", "fewstep")]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 8001, "metrics": 8002}
    for (kind, name), d in docs.items():
        if kind == "Service":
            assert d["spec"]["selector"].items() <= labels.items(), name
            assert all(p["targetPort"] in ports for p in d["spec"]["ports"]), name
        if kind == "PodDisruptionBudget":
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs[("Service", "fewstep-grpc-headless")]["spec"]["clusterIP"] == "None"
    ing = docs[("Ingress", "fewstep-grpc")]
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] in \
        {n for k, n in docs if k == "Service"}
    pm = docs[("PodMonitor", "fewstep")]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] in ports
    # resources: CPU, memory and one GPU requested
    req = container["resources"]["requests"]
    assert {"cpu", "memory", "nvidia.com/gpu"} <= set(req)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == req["nvidia.com/gpu"]
    # the probes run the image's probe script in a mode it has
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    assert re.search(r"^COPY .*deploy/probe\.py deploy/$", dockerfile, re.M)
    for probe, mode in (("startupProbe", "infer"), ("readinessProbe", "ready"), ("livenessProbe", "infer")):
        cmd = container[probe]["exec"]["command"]
        assert cmd[:3] == ["python3", f"{workdir}/deploy/probe.py", mode], probe
        assert float(cmd[cmd.index("--timeout") + 1]) < container[probe]["timeoutSeconds"], probe
    # writable places: the repository the entrypoint writes ($FEWSTEP_REPO) and /dev/shm
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    repo = re.search(r"FEWSTEP_REPO=(\S+)", dockerfile).group(1)
    assert repo in mounts and not mounts[repo].get("readOnly")
    assert "/dev/shm" in mounts and mounts["/models"]["readOnly"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # the HPA scales this Deployment on the metrics the adapter rules define
    hpa = docs[("HorizontalPodAutoscaler", "fewstep")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "fewstep"
    rules = yaml.safe_load(docs[("ConfigMap", "fewstep-adapter-rules")]["data"]["config.yaml"])["rules"]
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} == {r["name"]["as"] for r in rules}
    for r in rules:  # the adapter maps results onto pods through these two
        assert {"<<.LabelMatchers>>", "<<.GroupBy>>"} <= set(re.findall(r"<<\.\w+>>", r["metricsQuery"]))
        assert r["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    # kustomization: lists every manifest of the app (the monitoring rules and the L7 proxy apart)
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S.glob("*.yaml")
                                               if p.name not in ("kustomization.yaml", "ingress-grpc.yaml"))
