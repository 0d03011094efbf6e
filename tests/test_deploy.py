"""KubeRay manifests (deploy/kubernetes) checked without a cluster: every RayJob/RayService validates
against the KubeRay CRDs' OpenAPI schemas (../shared/kuberay/crds), before and after the overlay;
the embedded Serve config parses with Ray Serve's own schema and resolves to our app."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from .conftest import SHARED

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
OVERLAY = K8S / "overlays" / "example"


@pytest.fixture(scope="module")
def schemas() -> dict:
    crds = SHARED / "kuberay" / "crds"
    if not crds.is_dir():
        pytest.skip(f"needs {crds} (set MOTE_SHARED)")
    out = {}
    for f in crds.glob("*.yaml"):
        crd = yaml.safe_load(f.read_text())
        for v in crd["spec"]["versions"]:
            if v["name"] == "v1":
                out[crd["spec"]["names"]["kind"]] = v["schema"]["openAPIV3Schema"]
    assert {"RayJob", "RayService", "RayCluster"} <= set(out)
    return out


def validate(doc: dict, schemas: dict) -> None:
    """Raises jsonschema.ValidationError when `doc` breaks its kind's CRD schema."""
    jsonschema.validate(doc, schemas[doc["kind"]], cls=jsonschema.Draft7Validator)


def ray_docs(root: Path = ROOT) -> list[tuple[Path, dict]]:
    """Every ray.io document in the repository's YAML files (what the API server would check)."""
    out = []
    for f in sorted(root.rglob("*.y*ml")):
        if ".venv" in f.parts or ".git" in f.parts:
            continue
        for d in yaml.safe_load_all(f.read_text()):
            if isinstance(d, dict) and str(d.get("apiVersion", "")).startswith("ray.io/"):
                out.append((f, d))
    return out


# ---------------------------------------------------------------- a minimal `kustomize build`

def _pointer_set(doc, path: str, value, op: str) -> None:
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    key = int(last) if isinstance(node, list) else last
    if op == "replace":
        node[key]  # replace needs an existing target (RFC 6902): a typo in a path fails here
    node[key] = value


def render(overlay: Path = OVERLAY) -> list[dict]:
    """The overlay applied to the base: resources, JSON 6902 patches, images, merged ConfigMap
    literals. Only what our kustomizations use; anything else fails loudly."""
    kz = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert set(kz) <= {"apiVersion", "kind", "resources", "images", "configMapGenerator", "patches"}, set(kz)
    (base_dir,) = [overlay / r for r in kz["resources"]]
    base = yaml.safe_load((base_dir / "kustomization.yaml").read_text())
    docs = [d for r in base["resources"] for d in yaml.safe_load_all((base_dir / r).read_text()) if d]
    literals = {}
    for gen in base["configMapGenerator"]:
        literals[gen["name"]] = dict(item.split("=", 1) for item in gen["literals"])
    for gen in kz.get("configMapGenerator", []):
        assert gen["behavior"] == "merge" and gen["name"] in literals, gen
        literals[gen["name"]].update(item.split("=", 1) for item in gen["literals"])
    docs += [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": n}, "data": d} for n, d in literals.items()]
    for patch in kz.get("patches", []):
        target = patch["target"]
        hits = [d for d in docs if d["kind"] == target["kind"]
                and target.get("name", d["metadata"]["name"]) == d["metadata"]["name"]]
        assert hits, f"patch target {target} matches nothing"
        for d in hits:
            for op in yaml.safe_load(patch["patch"]):
                assert op["op"] in ("replace", "add"), op
                _pointer_set(d, op["path"], op["value"], op["op"])
    for image in kz.get("images", []):
        for c in containers(docs):
            if c["image"].split(":")[0] == image["name"]:
                c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return docs


def clusters(doc: dict) -> dict:
    return doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]


def pod_specs(docs: list[dict]) -> list[dict]:
    out = []
    for d in docs:
        if d["kind"] in ("RayJob", "RayService"):
            c = clusters(d)
            out += [c["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in c["workerGroupSpecs"]]
    return out


def containers(docs: list[dict]) -> list[dict]:
    return [c for spec in pod_specs(docs) for c in spec["containers"]]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


# ---------------------------------------------------------------- CRD schemas

def test_every_manifest_validates_against_the_kuberay_crds(schemas):
    docs = ray_docs()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds.count("RayJob") >= 3 and kinds.count("RayService") >= 1, kinds
    for path, d in docs:
        validate(d, schemas)
    jobs = {d["metadata"]["name"] for _, d in docs if d["kind"] == "RayJob"}
    assert {"mote-generate", "mote-train", "mote-pipeline"} <= jobs


def test_the_rendered_overlay_validates_too(schemas):
    docs = render()
    for d in docs:
        if d["kind"] in schemas:
            validate(d, schemas)
    assert all(c["image"] == "ghcr.io/your-org/mote-ray:0.1.0" for c in containers(docs))


@pytest.mark.parametrize("breakage", [
    ("RayService", ["spec", "rayClusterConfig", "workerGroupSpecs", 0, "maxReplicas"], "eight"),
    ("RayService", ["spec", "serveConfigV2"], {"applications": []}),  # must be a string
    ("RayJob", ["spec", "shutdownAfterJobFinishes"], "yes"),
    ("RayJob", ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "replicas"], [4]),
])
def test_a_broken_manifest_fails_the_same_validator(schemas, breakage):
    kind, path, value = breakage
    doc = copy.deepcopy(next(d for _, d in ray_docs(K8S) if d["kind"] == kind))
    validate(doc, schemas)  # intact: passes
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate(doc, schemas)


def test_every_base_file_is_in_the_kustomization():
    kz = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    files = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kz["resources"]) == files


# ---------------------------------------------------------------- the embedded Serve config

def _serve_configs() -> list[tuple[str, dict]]:
    base = next(d for _, d in ray_docs(K8S / "base") if d["kind"] == "RayService")
    rendered = by_kind(render(), "RayService")[0]
    return [("base", yaml.safe_load(base["spec"]["serveConfigV2"])),
            ("overlay", yaml.safe_load(rendered["spec"]["serveConfigV2"]))]


@pytest.mark.parametrize("which", ["base", "overlay"])
def test_serve_config_parses_with_serve_schema_and_resolves_to_our_app(which):
    import importlib

    from ray.serve.schema import ServeDeploySchema

    from mote_ray.serving.config import ServeConfig

    config = dict(_serve_configs())[which]
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    (app,) = schema.applications
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))  # serve.app:build_app
    ServeConfig.model_validate(app.args)  # what Serve does before build_app: an unknown key fails, naming it
    # The listed deployments are the ones the app binds for its path.
    expert = {"exact": "ExactExpert", "lora": "LoraExpert"}[app.args.get("path", "exact")]
    assert {d.name for d in app.deployments} == {"Router", expert}
    for d in app.deployments:
        scaling = d.autoscaling_config
        assert scaling and 1 <= scaling["min_replicas"] <= scaling["max_replicas"], d.name
    gpu = next(d for d in app.deployments if d.name == expert).ray_actor_options
    assert gpu.num_gpus == 1
    assert app.args["api_key_env"] == "MOTE_API_KEY"
    assert app.args["model"].startswith("/mnt/shared/")


def test_the_served_model_is_what_the_train_job_writes():
    (_, config), = [c for c in _serve_configs() if c[0] == "overlay"]
    train = next(d for d in render() if d["metadata"]["name"] == "mote-train")
    assert f"--out {config['applications'][0]['args']['model']} " in train["spec"]["entrypoint"]


# ---------------------------------------------------------------- the RayService's pods

def test_gpu_workers_api_key_probes_and_shared_storage():
    from mote_ray.serving.deployments import app as router_app

    docs = render()
    service = by_kind(docs, "RayService")[0]
    cluster = clusters(service)
    assert cluster["enableInTreeAutoscaling"] is True
    (gpu,) = cluster["workerGroupSpecs"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    expert = next(d for d in config["applications"][0]["deployments"] if d["name"].endswith("Expert"))
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= expert["ray_actor_options"]["num_gpus"]
    assert float(worker["resources"]["limits"]["cpu"]) >= expert["ray_actor_options"]["num_cpus"]
    # Enough GPU pods for the expert's replica bound (one replica per GPU).
    assert gpu["maxReplicas"] * int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= \
        expert["autoscaling_config"]["max_replicas"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "readinessProbe" not in head  # KubeRay deploys the app only after the head is ready

    routes = {r.path for r in router_app.routes}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8000}
    assert {"/readyz", "/healthz"} <= routes

    for c in containers([service]):
        key = next(e for e in c["env"] if e["name"] == "MOTE_API_KEY")
        assert key["valueFrom"]["secretKeyRef"] == {"name": "mote-api-key", "key": "api-key"}
    for spec in pod_specs(docs):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        for c in spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert claims[mounts["/mnt/shared"]] == "mote-shared"
            assert {"configMapRef": {"name": "mote-settings"}} in c["envFrom"]
    pvc = by_kind(docs, "PersistentVolumeClaim")[0]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"]


# ---------------------------------------------------------------- the RayJobs' entry points

@pytest.mark.parametrize("job", ["generate", "train", "pipeline"])
def test_job_entrypoints_parse_with_our_cli(job):
    from mote_ray.cli import build_parser

    docs = render()
    settings = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    rayjob = next(d for d in docs if d["metadata"]["name"] == f"mote-{job}")
    entry = rayjob["spec"]["entrypoint"]
    for var in re.findall(r"\$(\w+)", entry):
        assert var in settings, f"{var} is not in the mote-settings ConfigMap"
    cd, _, command = entry.partition(" && ")
    assert cd == "cd /home/ray/mote-ray"  # where deploy/docker/Dockerfile puts the repository
    argv = shlex.split(re.sub(r"\$(\w+)", lambda m: settings[m.group(1)], command))
    assert argv[:2] == ["python", f"jobs/{job}.py"] and (ROOT / argv[1]).is_file()
    args = build_parser().parse_args([job, *argv[2:]])  # unknown flags exit here
    assert (ROOT / args.config).is_file()
    assert int(settings["MOTE_TRAIN_WORKERS"]) == clusters(rayjob)["workerGroupSpecs"][0]["replicas"]
