"""deploy/kubernetes, checked offline: every overlay rendered by `kubectl kustomize`, every object validated against
the Kubernetes schemas (kubernetes-validate, strict: no unknown fields), and the invariants the deployment rests
on: probes, resources, the models volume, who may reach Triton, commands the CLI accepts, an autoscaler whose
metric comes from series a real server exports, and the hardening (pod and container security contexts, network
policies for every pod, the control key from the Secret, a disruption budget that lets nodes drain)."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from sdtrt.client.apps.cli import HEALTH_PORT, build_parser

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("gpu", "cpu", "kserve")
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests are for (the preStop `sleep` action is beta there)
CUSTOM_KINDS = {"InferenceService", "PodMonitor"}  # CRDs: no schema in kubernetes-validate; checked below
KUBECTL = shutil.which("kubectl")

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its kustomize) is not installed")


def render(path: Path) -> list[dict]:
    done = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def config(objects: list[dict]) -> dict[str, str]:
    return find(objects, "ConfigMap", "sdtrt-config")["data"]


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) substitution in a container's args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(KUBE / "overlays" / request.param)


def test_every_object_of_every_overlay_is_valid_kubernetes(overlay):
    import kubernetes_validate

    name, objects = overlay
    assert objects
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} at "
                                 f"{'.'.join(map(str, exc.path))}") from None
        assert obj["metadata"].get("namespace") == "sdtrt" or obj["kind"] in ("Namespace",), obj["metadata"]


def test_every_container_asks_for_resources_and_runs_as_non_root(overlay):
    name, objects = overlay
    for obj in objects:
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        spec = pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
        for container in spec["containers"] + spec.get("initContainers", []):
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), (name, container["name"])
            assert "memory" in resources["limits"], (name, container["name"])
        if name in ("gpu", "kserve") and obj["kind"] == "Job":  # TensorRT engines are built on the GPU
            assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert "nvidia.com/gpu.product" in spec["nodeSelector"]


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_triton_probes_volumes_drain_and_command(variant):
    objects = render(KUBE / "overlays" / variant)
    triton = find(objects, "Deployment", "sdtrt-triton")
    spec = pod_spec(triton)
    container = spec["containers"][0]
    # sdtrt serve's own health port: readiness false while healing, liveness only for a stuck sdtrt serve
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == HEALTH_PORT
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    live = container["livenessProbe"]
    assert live["httpGet"] == {"path": "/livez", "port": "health"}
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/readyz", "port": "health"}
    values = config(objects)
    args = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in container["args"]]
    args = args[:args.index("--")] if "--" in args else args  # (what follows goes to tritonserver)
    parsed = build_parser().parse_args(container["command"][1:] + args)
    # the startup probe covers engine loading (sdtrt serve's --timeout); liveness allows a heal's reload
    assert startup["periodSeconds"] * startup["failureThreshold"] >= parsed.timeout >= 900
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    models = volumes[mounts["/models"]["name"]]
    assert models["persistentVolumeClaim"]["claimName"] == "sdtrt-models" and mounts["/models"]["readOnly"]
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"  # the Python backend's tensors
    env = config(objects)
    args = expand(container["args"], env)
    parsed = build_parser().parse_args(container["command"][1:] + args[:args.index("--")] if "--" in args
                                       else container["command"][1:] + args)
    assert str(parsed.model_repository) == env["MODEL_REPO"] and parsed.host == "0.0.0.0"
    # a pod being scaled in drains (sdtrt serve waits for its generations) before Kubernetes kills it
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert parsed.drain_timeout == float(env["DRAIN_SECONDS"])
    assert spec["terminationGracePeriodSeconds"] > parsed.drain_timeout + pre_stop
    # the export Job writes where Triton reads
    export = find(objects, "Job", "sdtrt-export")
    script = pod_spec(export)["containers"][0]["args"][0]
    assert 'sdtrt export "${source}" --out "${MODEL_REPO}" ${EXPORT_ARGS}' in script
    build_parser().parse_args(["export", "/models/checkpoints/x", "--out", env["MODEL_REPO"], *env["EXPORT_ARGS"].split()])
    if variant == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert spec["nodeSelector"] == pod_spec(export)["nodeSelector"]  # engines run on the GPU they were built on
        assert "--format trt" in env["EXPORT_ARGS"] and env["MODEL_REPO"] != "/models/repos/cpu"
        assert "--cuda-memory-pool-byte-size=0:268435456" in args
    else:
        assert "nvidia.com/gpu" not in str(triton)


def test_only_the_gateway_and_the_page_face_the_outside(overlay):
    name, objects = overlay
    services = [o for o in objects if o["kind"] == "Service"]
    assert all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in services)
    ingress = find(objects, "Ingress", "sdtrt")
    backends = {p["backend"]["service"]["name"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]}
    assert backends == {"sdtrt-gateway", "sdtrt-page"}
    for deployment, variable, key, command in (("sdtrt-gateway", "SDTRT_API_AUTH", "api-auth", "api"),
                                               ("sdtrt-page", "SDTRT_GRADIO_AUTH", "gradio-auth", "ui")):
        container = pod_spec(find(objects, "Deployment", deployment))["containers"][0]
        secret = next(e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == variable)
        assert secret == {"name": "sdtrt-auth", "key": key}
        parsed = build_parser().parse_args([command, *container["args"]])
        assert parsed.host == "0.0.0.0" and str(parsed.out) == "/outputs"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(find(objects, "Deployment", deployment))["volumes"]}
        assert volumes[mounts["/outputs"]]["persistentVolumeClaim"]["claimName"] == "sdtrt-outputs"
        triton = "sdtrt-predictor:80" if name == "kserve" else "sdtrt-triton:8001"
        assert parsed.url == triton
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    assert set(claims) == {"sdtrt-models", "sdtrt-outputs"}
    assert claims["sdtrt-models"]["spec"]["accessModes"] == ["ReadWriteMany"]  # every Triton pod reads it


def triton_pod_labels(name: str, objects: list[dict]) -> dict:
    if name == "kserve":
        return find(objects, "InferenceService", "sdtrt")["spec"]["predictor"]["labels"]
    return find(objects, "Deployment", "sdtrt-triton")["spec"]["template"]["metadata"]["labels"]


def test_the_network_policy_lets_only_the_gateway_page_and_prometheus_reach_triton(overlay):
    name, objects = overlay
    policy = find(objects, "NetworkPolicy", "sdtrt-triton")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], triton_pod_labels(name, objects))
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and policy["spec"]["egress"] == []
    clients, prometheus = policy["spec"]["ingress"]
    allowed = [peer["podSelector"]["matchLabels"] for peer in clients["from"]]
    for deployment in ("sdtrt-gateway", "sdtrt-page"):
        labels = find(objects, "Deployment", deployment)["spec"]["template"]["metadata"]["labels"]
        assert any(selects(a, labels) for a in allowed), deployment
    assert len(allowed) == 2
    assert [p["port"] for p in prometheus["ports"]] == [8002] and "namespaceSelector" in prometheus["from"][0]
    pdb = find(objects, "PodDisruptionBudget", "sdtrt-triton")
    assert selects(pdb["spec"]["selector"]["matchLabels"], triton_pod_labels(name, objects))


def adapter_rules() -> dict[str, dict]:
    values = yaml.safe_load((KUBE / "prometheus-adapter" / "values.yaml").read_text())
    return {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}


def test_the_autoscaler_scales_triton_on_a_metric_the_adapter_serves(overlay):
    name, objects = overlay
    hpa = find(objects, "HorizontalPodAutoscaler", "sdtrt-triton")
    target = hpa["spec"]["scaleTargetRef"]
    if name == "kserve":  # KServe's raw deployment names the predictor's Deployment <service>-predictor
        assert target["name"] == "sdtrt-predictor"
        assert find(objects, "InferenceService", "sdtrt")["metadata"]["annotations"][
            "serving.kserve.io/autoscalerClass"] == "external"
    else:
        assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sdtrt-triton"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in adapter_rules()
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # slow to give back: a pod's engines take minutes to load again
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_the_adapters_series_exist_on_a_real_servers_metrics(server):
    """Every metric the adapter rules query, with the job models' label, is on Triton's /metrics after a request."""
    from sdtrt.client import Client

    Client(server.url).txt2img("a cat", steps=2, width=64, height=64)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for rule in adapter_rules().values():
        queries = rule["seriesQuery"] + " " + rule["metricsQuery"]
        for metric in set(re.findall(r"\b(nv_[a-z_]+|sdtrt_[a-z_]+)\{", queries)):
            assert re.search(rf'^{metric}{{[^}}]*model="txt2img"', text, re.M), metric


def test_the_prometheus_component_scrapes_the_triton_pods(tmp_path):
    for variant in ("gpu", "cpu"):
        shutil.copytree(KUBE, tmp_path / variant / "deploy")  # kustomize reads only below its own folder
        (tmp_path / variant / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [f"deploy/overlays/{variant}"], "components": ["deploy/components/prometheus"]}))
        objects = render(tmp_path / variant)
        monitor = find(objects, "PodMonitor", "sdtrt-triton")
        assert selects(monitor["spec"]["selector"]["matchLabels"], triton_pod_labels(variant, objects))
        ports = {p["name"] for p in pod_spec(find(objects, "Deployment", "sdtrt-triton"))["containers"][0]["ports"]}
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports


def test_the_kserve_variant_runs_sdtrt_serve_on_kserves_triton_runtime():
    objects = render(KUBE / "overlays" / "kserve")
    assert not [o for o in objects if o["metadata"]["name"] == "sdtrt-triton" and o["kind"] in ("Deployment", "Service")]
    isvc = find(objects, "InferenceService", "sdtrt")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == "kserve-tritonserver" and model["modelFormat"]["name"] == "triton"
    repo = config(objects)["MODEL_REPO"]
    assert model["storageUri"] == "pvc://sdtrt-models/" + repo.removeprefix("/models/")  # what the export wrote
    args = model["args"]
    parsed = build_parser().parse_args(model["command"][1:] + args[:args.index("--")])
    assert str(parsed.model_repository) == "/mnt/models" and (parsed.http_port, parsed.grpc_port) == (8080, 9000)
    assert model["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": HEALTH_PORT}
    assert model["livenessProbe"]["httpGet"] == {"path": "/livez", "port": HEALTH_PORT}
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] > parsed.drain_timeout
    assert model["image"].startswith("registry.example.com/sdtrt:")  # sdtrt's image: its models import sdtrt


# --- hardening -------------------------------------------------------------------------------------------------

# Containers allowed a writable root filesystem, with the reason: {(overlay, "Kind/name", container): "why"}.
# Empty: every process here writes only to volumes (the models and outputs volumes, emptyDirs for /tmp, $HOME and
# /dev/shm). A container that cannot live with a read-only root goes here, with a comment in its manifest too.
WRITABLE_ROOT: dict[tuple[str, str, str], str] = {}
SECRET = "sdtrt-auth"
DNS_PORT = 53


def pod_templates(objects: list[dict]) -> list[tuple[str, dict, dict]]:
    """(where, pod spec, pod labels) of every pod the objects create: Deployments, Jobs and KServe's predictor (an
    InferenceService's predictor is a pod spec whose `model` is the serving container)."""
    found = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "Job"):
            found.append((where, obj["spec"]["template"]["spec"], obj["spec"]["template"]["metadata"]["labels"]))
        elif obj["kind"] == "InferenceService":
            predictor = obj["spec"]["predictor"]
            model = {"name": "kserve-container", **predictor["model"]}  # the name KServe gives it
            spec = {**predictor, "containers": [model, *predictor.get("containers", [])]}
            found.append((where, spec, predictor["labels"]))
    return found


def all_containers(spec: dict) -> list[dict]:
    return spec["containers"] + spec.get("initContainers", [])


def policies(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] == "NetworkPolicy"]


def selecting(objects: list[dict], labels: dict) -> list[dict]:
    """The network policies that apply to a pod with these labels (an empty podSelector selects every pod)."""
    return [p for p in policies(objects) if selects(p["spec"]["podSelector"].get("matchLabels", {}), labels)]


def is_dns(rule: dict) -> bool:
    return bool(rule.get("ports")) and all(p["port"] == DNS_PORT for p in rule["ports"])


def test_every_container_is_hardened(overlay):
    """No privilege escalation, no capabilities, a read-only root filesystem (or a listed reason) and the runtime's
    seccomp profile; the processes' writable places (/tmp, $HOME) are emptyDirs, so a read-only root does not break
    them."""
    name, objects = overlay
    templates = pod_templates(objects)
    assert {where for where, _, _ in templates} >= {"Job/sdtrt-export", "Deployment/sdtrt-gateway",
                                                    "Deployment/sdtrt-page"}
    for where, spec, _ in templates:
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, (name, where)
        assert spec["securityContext"]["runAsNonRoot"] is True, (name, where)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in all_containers(spec):
            what = (name, where, container["name"])
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, what
            assert context.get("capabilities", {}).get("drop") == ["ALL"], what
            assert not context.get("capabilities", {}).get("add"), what
            assert not context.get("privileged"), what
            if what in WRITABLE_ROOT:
                assert WRITABLE_ROOT[what] and context.get("readOnlyRootFilesystem") is not True, what
                continue
            assert context.get("readOnlyRootFilesystem") is True, what
            if container in spec.get("initContainers", []):
                continue  # the wait loop writes nothing
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            home = next((e["value"] for e in container.get("env", []) if e["name"] == "HOME"), None)
            for path in ("/tmp", home):
                assert path in mounts and "emptyDir" in volumes[mounts[path]], (what, path)


def test_no_pod_gets_a_service_account_token(overlay):
    name, objects = overlay
    accounts = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceAccount"}
    for where, spec, _ in pod_templates(objects):
        assert spec.get("automountServiceAccountToken") is False, (name, where)
        account = spec.get("serviceAccountName", "default")
        assert account in accounts and accounts[account].get("automountServiceAccountToken") is False, (name, where)
    assert not [o for o in objects if o["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]


def test_every_pod_has_its_own_network_policy_both_ways_under_a_default_deny(overlay):
    name, objects = overlay
    deny = [p for p in policies(objects) if not p["spec"]["podSelector"]]
    assert len(deny) == 1, "one default-deny policy for the namespace"
    assert sorted(deny[0]["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert not deny[0]["spec"].get("ingress") and not deny[0]["spec"].get("egress")
    for where, _, labels in pod_templates(objects):
        own = [p for p in selecting(objects, labels) if p["spec"]["podSelector"]]
        assert own, (name, where, "no NetworkPolicy of its own")
        assert any(sorted(p["spec"]["policyTypes"]) == ["Egress", "Ingress"] for p in own), (name, where)


def test_triton_and_the_export_may_open_no_connection_but_dns(overlay):
    """Triton has no business going out (its models are on the volume); the export must not download anything."""
    name, objects = overlay
    export = next(labels for where, _, labels in pod_templates(objects) if where == "Job/sdtrt-export")
    for labels in (triton_pod_labels(name, objects), export):
        applying = selecting(objects, labels)
        assert all("Egress" in p["spec"]["policyTypes"] for p in applying if p["spec"]["podSelector"])
        for policy in applying:
            for rule in policy["spec"].get("egress", []):
                assert is_dns(rule), (name, policy["metadata"]["name"], rule)
    for policy in selecting(objects, export):
        assert not policy["spec"].get("ingress"), (name, policy["metadata"]["name"])  # nothing connects to it


def test_the_gateway_and_the_page_are_reached_only_by_the_ingress_controller_and_reach_only_triton(overlay):
    name, objects = overlay
    triton = triton_pod_labels(name, objects)
    for deployment, command in (("sdtrt-gateway", "api"), ("sdtrt-page", "ui")):
        workload = find(objects, "Deployment", deployment)
        labels, container = workload["spec"]["template"]["metadata"]["labels"], pod_spec(workload)["containers"][0]
        parsed = build_parser().parse_args([command, *container["args"]])
        for policy in selecting(objects, labels):
            for rule in policy["spec"].get("ingress", []):
                assert all(set(peer) == {"namespaceSelector", "podSelector"} for peer in rule["from"]), deployment
                assert [p["port"] for p in rule["ports"]] == [parsed.port], deployment
            for rule in policy["spec"].get("egress", []):
                if is_dns(rule):
                    continue
                assert all(set(peer) == {"podSelector"} and selects(peer["podSelector"]["matchLabels"], triton)
                           for peer in rule["to"]), (name, deployment, rule)
        opened = {p["port"] for policy in selecting(objects, labels) for rule in policy["spec"].get("egress", [])
                  if not is_dns(rule) for p in rule["ports"]}
        # the port its --url reaches on the Triton pods (KServe's Service maps its port 80 to the pods' 8080)
        assert (8080 if name == "kserve" else int(parsed.url.rsplit(":", 1)[1])) in opened, (name, deployment)


def test_triton_reads_the_control_key_from_the_secret_mounted_read_only(overlay):
    """`sdtrt serve --control-key-file` names a file mounted read-only from the Secret's control-key (that key only,
    unreadable by others); no other pod mounts the Secret, and Triton's pod gets none of the users' credentials."""
    name, objects = overlay
    templates = {where: spec for where, spec, _ in pod_templates(objects)}
    where = "InferenceService/sdtrt" if name == "kserve" else "Deployment/sdtrt-triton"
    spec = templates.pop(where)
    container = spec["containers"][0]
    args = expand(container["args"], config(objects))
    parsed = build_parser().parse_args(container["command"][1:] + (args[:args.index("--")] if "--" in args else args))
    key_file = parsed.control_key_file
    assert key_file is not None and key_file.is_absolute(), "sdtrt serve is not given --control-key-file"
    mount = next(m for m in container["volumeMounts"] if key_file.is_relative_to(m["mountPath"]))
    assert mount.get("readOnly") is True
    secret = next(v for v in spec["volumes"] if v["name"] == mount["name"])["secret"]
    assert secret["secretName"] == SECRET
    assert secret["items"] == [{"key": "control-key", "path": str(key_file.relative_to(mount["mountPath"]))}]
    assert secret.get("defaultMode", 0o644) & 0o007 == 0  # the pod's group (fsGroup) reads it, others do not
    assert not [e for e in container.get("env", []) if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]]
    for other, other_spec in templates.items():  # the gateway, the page, the export
        assert not [v for v in other_spec.get("volumes", []) if v.get("secret", {}).get("secretName") == SECRET], other
        refs = [e["valueFrom"]["secretKeyRef"]["key"] for c in all_containers(other_spec) for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})]
        assert "control-key" not in refs, other


def test_the_documented_secret_has_every_key_the_manifests_read():
    """docs/scale-out.md's `kubectl create secret generic sdtrt-auth` names every key a manifest reads."""
    read = set()
    for variant in OVERLAYS:
        for _, spec, _ in pod_templates(render(KUBE / "overlays" / variant)):
            for container in all_containers(spec):
                read |= {e["valueFrom"]["secretKeyRef"]["key"] for e in container.get("env", [])
                         if "secretKeyRef" in e.get("valueFrom", {})}
            read |= {item["key"] for v in spec.get("volumes", []) if v.get("secret", {}).get("secretName") == SECRET
                     for item in v["secret"]["items"]}
    assert read == {"control-key", "api-auth", "gradio-auth"}
    doc = (ROOT / "docs" / "scale-out.md").read_text()
    command = re.search(r"create secret generic sdtrt-auth((?:[^\n]*\\\n)*[^\n]*)", doc)
    assert command, "docs/scale-out.md does not show how to create the Secret"
    assert read <= set(re.findall(r"--from-(?:literal|file)=([\w-]+)=", command.group(1)))


def test_the_disruption_budget_cannot_block_a_node_drain(overlay):
    """minAvailable equal to the autoscaler's minimum (1) would allow no eviction at all: a drain would hang."""
    name, objects = overlay
    budget = find(objects, "PodDisruptionBudget", "sdtrt-triton")["spec"]
    low = find(objects, "HorizontalPodAutoscaler", "sdtrt-triton")["spec"].get("minReplicas", 1)
    if "maxUnavailable" in budget:
        assert isinstance(budget["maxUnavailable"], int) and budget["maxUnavailable"] >= 1
    else:
        assert isinstance(budget["minAvailable"], int) and budget["minAvailable"] < low
    assert budget.get("unhealthyPodEvictionPolicy") == "AlwaysAllow"  # a pod that never turns ready is no reason


def test_gpu_pods_run_under_the_nvidia_runtime_class(overlay):
    name, objects = overlay
    gpu_pods = [(where, spec) for where, spec, _ in pod_templates(objects)
                if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in spec["containers"])]
    if name == "cpu":
        assert not gpu_pods and not any("runtimeClassName" in s for _, s, _ in pod_templates(objects))
        return
    triton = "InferenceService/sdtrt" if name == "kserve" else "Deployment/sdtrt-triton"
    assert {where for where, _ in gpu_pods} == {triton, "Job/sdtrt-export"}
    for where, spec in gpu_pods:
        assert spec.get("runtimeClassName") == "nvidia", (name, where)
