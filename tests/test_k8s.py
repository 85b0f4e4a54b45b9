"""deploy/k8s/: the kustomize overlays rendered by kustomize itself (`kubectl kustomize`) and
validated offline against Kubernetes' JSON schemas (kubernetes-validate, strict), the CRDs
against schemas of their own, and against each other and the serving image; the Prometheus
adapter's values checked against the adapter's configuration and their queries run by
promtool on synthetic series. Nothing here applies them to a cluster (docs/deploy.md)."""
from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSIONS = ("1.29.0", None)  # an older cluster and the newest schema bundled (None)
OVERLAYS = ("gpu", "cpu", "gpu-s3", "gpu-rwx")  # deploy/k8s/overlays/*
DEVICES = ("gpu", "cpu")
MODEL_SOURCES = (None, "models-s3", "models-rwx")  # None: baked into the image
ADAPTER_VALUES = K8S / "monitoring" / "prometheus-adapter-values.yaml"

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

# The adapter's configuration file (kubernetes-sigs/prometheus-adapter, pkg/config: DiscoveryRule,
# ResourceMapping, NameMapping), which the chart writes from `rules.custom` under `rules:`.
_STR = {"type": "string"}
ADAPTER_CONFIG_SCHEMA = {
    "type": "object", "required": ["rules"], "additionalProperties": False,
    "properties": {"rules": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["seriesQuery", "resources", "name", "metricsQuery"],
        "additionalProperties": False,
        "properties": {
            "seriesQuery": _STR, "metricsQuery": _STR,
            "seriesFilters": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                                         "properties": {"is": _STR, "isNot": _STR}}},
            "resources": {"type": "object", "additionalProperties": False, "properties": {
                "template": _STR,
                "overrides": {"type": "object", "additionalProperties": {
                    "type": "object", "required": ["resource"], "additionalProperties": False,
                    "properties": {"group": _STR, "resource": _STR}}}}},
            "name": {"type": "object", "required": ["matches", "as"], "additionalProperties": False,
                     "properties": {"matches": _STR, "as": _STR}}}}}},
}
# The prometheus-adapter chart's (5.3.0) values this file may set, from its values.yaml.
CHART_VALUES = {"prometheus": {"url", "port", "path"}, "metricsRelistInterval": None,
                "rules": {"default", "custom", "existing", "external", "resource"}}


def _kustomize(path: Path) -> list[dict]:
    """The objects kustomize renders from a kustomization directory."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl (its built-in kustomize renders the overlays)")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _compose(tmp: Path, device: str, source: str | None, ingress: bool = False) -> Path:
    """A kustomization of the base and the components an operator would combine."""
    rel = lambda p: os.path.relpath(p, tmp)  # noqa: E731 - kustomize takes relative paths only
    comps = [device] + ([source] if source else []) + (["ingress-grpc"] if ingress else [])
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel(K8S / "base")], "components": [rel(K8S / "components" / c) for c in comps]}))
    return tmp


def _by_kind(docs: list[dict]) -> dict:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _validate(kv, doc: dict) -> None:
    import jsonschema
    if doc["kind"] == "PodMonitor":
        jsonschema.validate(doc, PODMONITOR_SCHEMA)
        return
    for v in K8S_VERSIONS:
        kv.validate(doc, v or kv.latest_version(), strict=True)


def test_overlays_are_the_shipped_ones_and_no_stray_manifests():
    assert sorted(p.name for p in (K8S / "overlays").iterdir()) == sorted(OVERLAYS)
    # every YAML file is part of a kustomization, the adapter values or the loader pod
    listed = set()
    for kust in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kust.read_text())
        for key in ("resources", "components"):
            listed |= {(kust.parent / r).resolve() for r in k.get(key, [])}
        listed |= {(kust.parent / p["path"]).resolve() for p in k.get("patches", []) if "path" in p}
    loose = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"} - listed
    assert loose == {ADAPTER_VALUES.resolve(), (K8S / "components/models-rwx/load-models-pod.yaml").resolve()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (the test extra)")
    docs = _kustomize(K8S / "overlays" / overlay)
    for doc in docs:
        _validate(kv, doc)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodMonitor", "PodDisruptionBudget"} <= kinds


def test_every_combination_renders_validates_and_means_what_it_says(tmp_path):
    """Device x model source (x the ingress component): what each adds, and nothing else."""
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (the test extra)")
    for device in DEVICES:
        for source in MODEL_SOURCES:
            ingress = source is None
            docs = _kustomize(_compose(tmp_path / f"{device}-{source}", device, source, ingress))
            for doc in docs:
                _validate(kv, doc)
            objs = _by_kind(docs)
            pod = objs[("Deployment", "fewstep")]["spec"]["template"]["spec"]
            (c,) = pod["containers"]
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["FEWSTEP_DEVICE"] == device
            gpu = c["resources"]["requests"].get("nvidia.com/gpu")
            if device == "gpu":
                assert gpu == 1 and c["resources"]["limits"]["nvidia.com/gpu"] == 1
                assert pod["nodeSelector"]["nvidia.com/gpu.product"]  # the documented GPU-model value
            else:
                assert gpu is None and "nodeSelector" not in pod and "tolerations" not in pod
            _check_model_source(objs, pod, c, source)
            target = objs[("HorizontalPodAutoscaler", "fewstep")]["spec"]["metrics"][0]["pods"]
            assert target["metric"]["name"] == "fewstep_requests_in_flight"
            assert target["target"]["averageValue"] == {"gpu": "8", "cpu": "4"}[device]
            assert (("Ingress", "fewstep-grpc") in objs) == ingress


def _check_model_source(objs: dict, pod: dict, c: dict, source: str | None) -> None:
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    pvcs = [d for (k, _), d in objs.items() if k == "PersistentVolumeClaim"]
    for pvc in pvcs:  # a claim that would stay Pending: no ReadOnlyMany, a class named
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"].get("storageClassName")
    if source is None:  # baked into the image: nothing over /models
        assert "/models" not in mounts and "models" not in volumes and not pvcs
        assert "initContainers" not in pod
        return
    assert mounts["/models"]["readOnly"] is True and mounts["/models"]["name"] == "models"
    if source == "models-rwx":
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == pvcs[0]["metadata"]["name"]
        assert "initContainers" not in pod
        return
    # models-s3: a real client (the AWS CLI, pinned) syncs the store into the pod's emptyDir
    assert "emptyDir" in volumes["models"] and not pvcs
    (init,) = pod["initContainers"]
    image, tag = init["image"].rsplit(":", 1)
    assert image == "amazon/aws-cli" and re.fullmatch(r"\d+\.\d+\.\d+", tag), init["image"]
    assert init["command"][:4] == ["aws", "s3", "sync", "$(FEWSTEP_MODELS_URI)"] and init["command"][4] == "/models"
    init_mounts = {m["mountPath"]: m for m in init["volumeMounts"]}
    assert init_mounts["/models"]["name"] == "models" and not init_mounts["/models"].get("readOnly")
    cm_refs = {e["valueFrom"]["configMapKeyRef"]["name"] for e in init["env"] if "valueFrom" in e}
    (cm,) = [d for (k, _), d in objs.items() if k == "ConfigMap"]
    assert cm_refs == {cm["metadata"]["name"]}  # kustomize's hashed name, followed
    assert cm["data"]["uri"].startswith("s3://")
    assert init["securityContext"]["readOnlyRootFilesystem"] is True


def test_loader_pod_validates_and_writes_the_claim():
    """components/models-rwx/load-models-pod.yaml, applied on its own to fill the volume."""
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (the test extra)")
    rwx = K8S / "components" / "models-rwx"
    pod = yaml.safe_load((rwx / "load-models-pod.yaml").read_text())
    _validate(kv, pod)
    claim = yaml.safe_load((rwx / "pvc.yaml").read_text())["metadata"]["name"]
    (volume,) = pod["spec"]["volumes"]
    (container,) = pod["spec"]["containers"]
    assert volume["persistentVolumeClaim"] == {"claimName": claim}  # read-write: it fills the volume
    assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": "/models"}]
    # the pod runs as the serving pods' user, so what it writes they can read
    dep = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    assert pod["spec"]["securityContext"]["runAsUser"] == dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"]


def test_validators_bite():
    """kubernetes-validate refuses an unknown field and a wrong type; the adapter schema a
    misspelt key."""
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (the test extra)")
    import jsonschema
    dep = _by_kind(_kustomize(K8S / "overlays" / "gpu"))[("Deployment", "fewstep")]
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.latest_version(), strict=True)
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kv.ValidationError):  # a gRPC probe takes a port number, not a name
        kv.validate(bad, "1.29.0", strict=True)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"rules": [{"seriesQuery": "x", "resources": {}, "name": {"matches": "", "as": ""},
                                        "metricQuery": "x"}]}, ADAPTER_CONFIG_SCHEMA)


def test_manifests_agree_with_each_other_and_the_image():
    """What no schema checks: selectors, port names, the probes, the HPA's metrics and
    target, the volumes the entrypoint writes to."""
    docs = _by_kind(_kustomize(K8S / "overlays" / "gpu") + _kustomize(K8S / "components" / "ingress-grpc"))
    dep = docs[("Deployment", "fewstep")]
    assert "replicas" not in dep["spec"]  # the HPA owns it: a re-apply must not reset it
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
    # the probes: readiness is the kubelet's gRPC health check on Triton's gRPC port; startup
    # and liveness run the image's probe script in a mode it has
    assert container["readinessProbe"]["grpc"] == {"port": ports["grpc"]}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    assert re.search(r"^COPY .*deploy/probe\.py deploy/$", dockerfile, re.M)
    modes = re.search(r'add_argument\("mode", choices=\(([^)]*)\)', (DEPLOY / "probe.py").read_text()).group(1)
    for probe, mode in (("startupProbe", "infer"), ("livenessProbe", "live")):
        cmd = container[probe]["exec"]["command"]
        assert cmd[:3] == ["python3", f"{workdir}/deploy/probe.py", mode] and f'"{mode}"' in modes, probe
        assert float(cmd[cmd.index("--timeout") + 1]) < container[probe]["timeoutSeconds"], probe
    # writable places: the repository the entrypoint writes ($FEWSTEP_REPO) and /dev/shm
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    repo = re.search(r"FEWSTEP_REPO=(\S+)", dockerfile).group(1)
    assert repo in mounts and not mounts[repo].get("readOnly")
    assert "/dev/shm" in mounts
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # SIGTERM's drain fits the pod's grace period: the preStop's sleep, then tritonserver's
    # exit timeout (the entrypoint's default, which is `fewstep serve --grace`'s)
    from fewstep.serving.launcher import GRACE_S
    entry_grace = re.search(r'--exit-timeout-secs="\$\{FEWSTEP_GRACE:-(\d+)\}"',
                            (DEPLOY / "entrypoint.sh").read_text()).group(1)
    assert float(entry_grace) == GRACE_S
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(pre_stop[1]) + GRACE_S
    # the HPA scales this Deployment on the metrics the adapter rules define
    hpa = docs[("HorizontalPodAutoscaler", "fewstep")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "fewstep"}
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} == {r["name"]["as"] for r in rules}


# --- the Prometheus adapter's configuration ----------------------------------------------------

def test_adapter_values_are_the_charts_and_the_adapters_shape():
    import jsonschema
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    for key, sub in values.items():
        assert key in CHART_VALUES, key
        if isinstance(sub, dict):
            assert set(sub) <= CHART_VALUES[key], (key, set(sub) - CHART_VALUES[key])
    # the chart's ConfigMap template: `rules:` then toYaml of rules.custom
    config = yaml.safe_load(yaml.safe_dump({"rules": values["rules"]["custom"]}))
    jsonschema.validate(config, ADAPTER_CONFIG_SCHEMA)
    for r in config["rules"]:  # the adapter maps results onto pods through these two
        assert {"<<.LabelMatchers>>", "<<.GroupBy>>"} <= set(re.findall(r"<<\.\w+>>", r["metricsQuery"]))
        assert r["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert re.fullmatch(r["name"]["matches"], r["seriesQuery"].split("{")[0])


def _adapter_query(rule: dict, namespace: str, pods: list[str]) -> str:
    """The PromQL the adapter sends for a pods metric (prometheus-adapter's naming package):
    the resource labels as matchers, grouped by the pod label."""
    return (rule["metricsQuery"].replace("<<.LabelMatchers>>", f'namespace="{namespace}",pod=~"{"|".join(pods)}"')
            .replace("<<.GroupBy>>", "pod"))


def test_adapter_queries_on_synthetic_series(tmp_path):
    """promtool evaluates the two queries on series shaped like Triton's (15 s scrapes):
    pod a runs 4 requests in flight on `tiny` and 1 on `toyc` (the sampler, stream and jump
    series beside them must not count), pod b 1; a pod of another namespace and one not asked
    for are left out. Pod a's jump waits twice as long as it computes; pod b's never waits;
    pod c's jump has no traffic at all (the ratio is 0, not NaN)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool (Debian's prometheus package; make system-deps installs it)")
    rules = {r["name"]["as"]: r for r in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]}
    per_s = lambda us_per_s: f"0+{us_per_s * 15:g}x40"  # noqa: E731 - a counter growing us_per_s each second

    def series(metric, pod, model, us_per_s, ns="serving"):
        return {"series": f'{metric}{{namespace="{ns}",pod="{pod}",model="{model}",version="1"}}',
                "values": per_s(us_per_s)}

    req, queue, compute = ("nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                           "nv_inference_compute_infer_duration_us")
    inputs = [series(req, "fewstep-a", "tiny", 4e6), series(req, "fewstep-a", "toyc", 1e6),
              series(req, "fewstep-a", "tiny_sampler", 4e6), series(req, "fewstep-a", "tiny_stream", 2e6),
              series(req, "fewstep-a", "tiny_jump", 3e6), series(req, "fewstep-b", "tiny", 1e6),
              series(req, "fewstep-x", "tiny", 9e6, ns="other"), series(req, "fewstep-z", "tiny", 9e6),
              series(queue, "fewstep-a", "tiny_jump", 1e6), series(compute, "fewstep-a", "tiny_jump", 5e5),
              series(queue, "fewstep-a", "tiny", 7e6), series(compute, "fewstep-a", "tiny", 7e5),
              series(queue, "fewstep-b", "tiny_jump", 0), series(compute, "fewstep-b", "tiny_jump", 2e5),
              series(queue, "fewstep-c", "tiny_jump", 0), series(compute, "fewstep-c", "tiny_jump", 0)]
    asked = ["fewstep-a", "fewstep-b", "fewstep-c", "fewstep-x"]
    tests = [{"expr": _adapter_query(rules["fewstep_requests_in_flight"], "serving", asked), "eval_time": "5m",
              "exp_samples": [{"labels": '{pod="fewstep-a"}', "value": 5}, {"labels": '{pod="fewstep-b"}', "value": 1}]},
             {"expr": _adapter_query(rules["triton_queue_compute_ratio"], "serving", asked), "eval_time": "5m",
              "exp_samples": [{"labels": '{pod="fewstep-a"}', "value": 2}, {"labels": '{pod="fewstep-b"}', "value": 0},
                              {"labels": '{pod="fewstep-c"}', "value": 0}]}]
    test_file = tmp_path / "adapter-test.yml"
    test_file.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "15s", "tests": [
        {"interval": "15s", "input_series": inputs, "promql_expr_test": tests}]}))
    out = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # and promtool does fail a wrong expectation
    tests[0]["exp_samples"][0]["value"] = 4
    test_file.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "15s", "tests": [
        {"interval": "15s", "input_series": inputs, "promql_expr_test": tests}]}))
    out = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "fewstep-a" in out.stdout + out.stderr
