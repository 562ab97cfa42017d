"""infra/: the launcher config passes Ray's own validation, the KubeRay manifests and the image carry what they must"""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.config import BuildConfig, parse_config
from train.config import parse_args

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
A100_INSTANCES = {"p4d.24xlarge", "p4de.24xlarge"}
CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "WANDB_API_KEY"}
# an AWS access key id, or a 40-character secret written next to its name
CREDENTIAL = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|(?i:secret_access_key)\W{1,4}[A-Za-z0-9/+=]{40}")


def launcher_config() -> dict:
    return yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())


def manifests() -> dict[str, dict]:
    """file name -> its one document"""
    out = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert len(docs) == 1, f"{path.name}: one resource per file"
        out[path.name] = docs[0]
    return out


def cluster_specs() -> dict[str, dict]:
    """RayCluster specs, standalone or inside a RayJob"""
    specs = {}
    for name, doc in manifests().items():
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"].get("rayClusterSpec")
        if spec:
            specs[name] = spec
    return specs


def pod_specs(spec: dict) -> dict[str, dict]:
    """group name -> pod spec, the head's included"""
    return {"head": spec["headGroupSpec"]["template"]["spec"],
            **{g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]}}


def gpu_limit(group: dict) -> int:
    return int(group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
               .get("nvidia.com/gpu", 0))


# ---------------------------------------------------------------------------------------------------------
# (a) the Ray cluster launcher config


def test_launcher_config_passes_the_autoscaler_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher_config(), schema)


def test_launcher_config_passes_ray_up_validation():
    # what `ray up` checks before it talks to AWS: AWS defaults merged, docker section, node types, bounds
    validate_config(prepare_config(launcher_config()))


def test_gpu_node_types_are_8x_a100():
    types = launcher_config()["available_node_types"]
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert {t["node_config"]["InstanceType"] for t in gpu.values()} == A100_INSTANCES
    assert all(t["resources"]["GPU"] == 8 for t in gpu.values())


def test_head_schedules_nothing():
    cfg = launcher_config()
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "--num-gpus=0" in start


def test_cpu_workers_for_canny_on_spot():
    types = launcher_config()["available_node_types"]
    cpu = [t for name, t in types.items() if name != "head" and not t["resources"].get("GPU")]
    assert cpu and all(t["resources"]["CPU"] >= 32 for t in cpu)
    assert all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in cpu)


def test_autoscaling_bounds():
    cfg = launcher_config()
    workers = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    assert all(0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"] for t in workers)
    assert sum(t["max_workers"] for t in workers) == cfg["max_workers"]  # the global cap binds nothing


def test_shm_and_object_store_are_sized():
    cfg = launcher_config()
    assert any(o.startswith("--shm-size") for o in cfg["docker"]["head_run_options"])
    for name, t in cfg["available_node_types"].items():
        if name != cfg["head_node_type"]:
            assert any(o.startswith("--shm-size") for o in t["docker"]["worker_run_options"]), name
    for commands in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert "--object-store-memory" in " ".join(commands)


def test_s3_through_instance_profiles_and_one_image():
    cfg = launcher_config()
    assert all("IamInstanceProfile" in t["node_config"] for t in cfg["available_node_types"].values())
    assert not {"head_image", "worker_image"} & set(cfg["docker"])  # the same image on every node
    assert not cfg["setup_commands"] and not cfg["file_mounts"]  # the image has it all; code comes per job


def test_no_credentials_anywhere_in_infra():
    assert CREDENTIAL.search("AKIA" + "Q" * 16) and CREDENTIAL.search("secret_access_key: " + "x" * 40)
    files = [p for p in INFRA.rglob("*") if p.is_file()] + list((ROOT / "docs").glob("*.md"))
    for path in files:
        assert not CREDENTIAL.search(path.read_text()), f"credential-like string in {path.relative_to(ROOT)}"


# ---------------------------------------------------------------------------------------------------------
# (b) the KubeRay manifests


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-dataset.yaml", "rayjob-train.yaml"])
def test_manifest_header(name):
    doc = manifests()[name]
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == ("RayCluster" if name == "raycluster.yaml" else "RayJob")
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?", doc["metadata"]["name"])  # KubeRay: DNS-1035


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-dataset.yaml", "rayjob-train.yaml"])
def test_cluster_spec_has_what_kuberay_requires(name):
    spec = cluster_specs()[name]
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "template"} <= set(group), group.get("groupName")
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"][0]["image"]
    for params in [head["rayStartParams"], *(g.get("rayStartParams", {}) for g in groups)]:
        assert all(isinstance(v, str) for v in params.values()), params  # the CRD's map[string]string
    assert head["rayStartParams"]["num-cpus"] == "0"


def test_gpu_groups_take_all_8_a100s_of_a_node():
    for name, spec in cluster_specs().items():
        for group in spec["workerGroupSpecs"]:
            if gpu_limit(group):
                pod = group["template"]["spec"]
                assert gpu_limit(group) == 8, (name, group["groupName"])
                assert set(pod["nodeSelector"].values()) <= A100_INSTANCES
                assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert any(gpu_limit(g) for g in cluster_specs()["raycluster.yaml"]["workerGroupSpecs"])
    assert any(not gpu_limit(g) for g in cluster_specs()["raycluster.yaml"]["workerGroupSpecs"])  # Canny


def test_every_pod_has_a_memory_backed_dev_shm():
    for name, spec in cluster_specs().items():
        for group, pod in pod_specs(spec).items():
            memory = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
            mounts = {m["name"] for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"}
            assert mounts and mounts <= memory, (name, group)


def test_secrets_are_referenced_never_inlined():
    for name, spec in cluster_specs().items():
        for group, pod in pod_specs(spec).items():
            container = pod["containers"][0]
            for env in container.get("env", []):
                if env["name"] in CREDENTIAL_ENV:
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], (name, group, env["name"])
            assert all("secretRef" in e for e in container.get("envFrom", [])), (name, group)
            assert container.get("envFrom") or pod.get("serviceAccountName"), (name, group)  # some way to S3


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-dataset.yaml", "rayjob-train.yaml"])
def test_ray_derives_a_valid_autoscaling_config(name):
    # the code path of KubeRay's autoscaler: RayCluster CR -> node types -> validate_config
    cr = {"metadata": {"name": "controlnet", "namespace": "default"}, "spec": cluster_specs()[name]}
    types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert all(t["resources"].get("GPU", 8) == 8 for t in types.values())


def test_rayjobs_run_the_dataset_job_and_the_trainer_with_valid_arguments():
    docs = manifests()
    for doc in (docs["rayjob-dataset.yaml"], docs["rayjob-train.yaml"]):
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        assert doc["spec"].get("rayClusterSpec") or doc["spec"].get("clusterSelector")
        assert not re.search(r"&&|;|\|", doc["spec"]["entrypoint"])  # KubeRay pastes it into a shell script

    dataset_args = shlex.split(docs["rayjob-dataset.yaml"]["spec"]["entrypoint"])
    assert dataset_args[:3] == ["python", "-m", "pipeline.build"]
    build = parse_config(BuildConfig, dataset_args[3:], "")  # the job's own parser accepts them
    groups = docs["rayjob-dataset.yaml"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    cpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
               for g in groups)
    assert build.output.startswith("s3://") and 0 < build.num_workers * build.cpus_per_worker <= cpus

    train_args = shlex.split(docs["rayjob-train.yaml"]["spec"]["entrypoint"])
    assert train_args[0] == "python" and train_args[1].endswith("train/run.py")
    train = parse_args(train_args[2:])
    groups = docs["rayjob-train.yaml"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert train.use_gpu is True and train.storage_path.startswith("s3://")
    assert train.num_workers == sum(g["maxReplicas"] * gpu_limit(g) for g in groups)  # one rank per GPU


def test_one_image_everywhere():
    image = launcher_config()["docker"]["image"]
    assert "${" not in image
    for name, spec in cluster_specs().items():
        for group, pod in pod_specs(spec).items():
            assert pod["containers"][0]["image"] == image, (name, group)


# ---------------------------------------------------------------------------------------------------------
# (c) the image


def test_dockerfile_installs_the_project_on_cuda_torch_without_torchvision():
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    base = next(line for line in lines if line.startswith("FROM"))
    assert re.search(r"-gpu\b|cuda|-cu\d+", base)
    installs = [line for line in lines if "pip install" in line]
    assert any(re.search(r"pip install .*\s\.(\s|$)", line) for line in installs)  # the project itself
    assert not any("torchvision" in line for line in installs)
    assert any("find_spec('torchvision')" in line for line in lines)  # the build fails if one pulled it in
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in dependencies if d.startswith("torchvision")]


def test_the_images_import_check_names_only_what_the_project_installs():
    """The build's last step imports the stack: a module the project no longer depends on (kornia, once) fails
    `docker build` there, long after the dependencies were installed."""
    check = next(line for line in DOCKERFILE.read_text().splitlines() if 'python -c "import cv2' in line)
    modules = [m.strip() for m in re.search(r'python -c "import ([^"]+)"', check).group(1).split(",")]
    assert {"torch", "diffusers", "ray.train", "train.loop"} <= set(modules)
    assert [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None] == []


def test_the_image_installs_the_tested_versions_on_its_cuda_torch():
    """constraints.txt holds the set `make setup` installs and the suite runs on; the image takes it, less the
    CPU torch pin (its own torch is the CUDA build of the same version)."""
    text = DOCKERFILE.read_text()
    assert re.search(r"COPY [^\n]*\bconstraints\.txt\b", text)
    assert "grep -v '^torch==' constraints.txt > /tmp/constraints.txt" in text
    assert re.search(r"pip install [^\n]*-c /tmp/constraints\.txt \.", text)
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    torch_arg = re.search(r"ARG TORCH_VERSION=(\S+)", text).group(1)
    assert pins["torch"].split("+")[0] == torch_arg  # the image's CUDA torch is the version the suite ran
    assert pins["ray"] == re.search(r"ARG RAY_VERSION=(\S+)", text).group(1)  # the base image's Ray


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignored = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "data", ".git"} <= set(ignored)
