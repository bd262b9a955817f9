"""The Dockerfile and the Kubernetes manifests under deploy/ agree with the code.

No cluster and no Docker engine: the files are parsed and checked against the real `unblock`
command (typer/click), the real Settings class and the real routes of the app.
"""

from __future__ import annotations

import fnmatch
import functools
import http.server
import json
import os
import re
import secrets
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from cryptography.fernet import Fernet
from pydantic import AliasChoices, ValidationError

from app.cli import cli
from app.settings import DEV_ENCRYPTION_KEY, DEV_JWT_SECRET, Environment, Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
EXAMPLE_SECRET = DEPLOY / "secret.example.yaml"
POD_KINDS = {"Deployment", "Job"}


# --------------------------------------------------------------------------------------------
# Loading


def _yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


@functools.cache
def _load(path: Path) -> tuple[dict[str, Any], ...]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    return tuple(docs)


def _kustomizations() -> list[Path]:
    return [p for p in _yaml_files() if p.name in {"kustomization.yaml", "kustomization.yml"}]


def _objects() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object under deploy/ (kustomization files excluded)."""
    kustomizations = set(_kustomizations())
    return [(p, d) for p in _yaml_files() if p not in kustomizations for d in _load(p)]


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in _objects() if d.get("kind") == kind]


def _named(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _of_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name!r}, found {len(found)}"
    return found[0]


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(obj)
    return [*spec.get("initContainers", []), *spec["containers"]]


def _workloads() -> list[dict[str, Any]]:
    return [d for _, d in _objects() if d.get("kind") in POD_KINDS]


def _component(obj: dict[str, Any]) -> str:
    return obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def _workload(component: str) -> dict[str, Any]:
    found = [w for w in _workloads() if _component(w) == component]
    assert len(found) == 1, f"expected one workload with component={component}, found {found}"
    return found[0]


def _example_secret() -> dict[str, Any]:
    (doc,) = _load(EXAMPLE_SECRET)
    assert doc["kind"] == "Secret"
    return doc


# --------------------------------------------------------------------------------------------
# The code the files must agree with


def _parse_unblock_argv(argv: list[str]) -> tuple[list[str], Any]:
    """Parse `unblock ARGV` with the real CLI, without running it; fail on anything unknown.

    Returns the command path and the click context (its `params` are the parsed options).
    """
    # Typer may bring its own copy of click, so groups are recognised by their `commands`.
    command: Any = typer.main.get_command(cli)
    path: list[str] = []
    rest = list(argv)
    while hasattr(command, "commands"):
        if not rest:
            pytest.fail(f"`unblock {' '.join(path)}` needs a subcommand")
        name = rest.pop(0)
        sub = command.commands.get(name)
        if sub is None:
            pytest.fail(
                f"`unblock {' '.join([*path, name])}` is not a command "
                f"(there are: {', '.join(sorted(command.commands))})"
            )
        path.append(name)
        command = sub
    try:
        ctx = command.make_context(" ".join(["unblock", *path]), rest)
    except Exception as exc:  # click's UsageError and friends, whichever click it is
        message = exc.format_message() if hasattr(exc, "format_message") else repr(exc)
        pytest.fail(f"`unblock {' '.join(argv)}` does not parse: {message}")
    return path, ctx


def _settings_env_names() -> set[str]:
    """The environment variables Settings reads: aliases verbatim, otherwise prefix + name."""
    prefix = Settings.model_config.get("env_prefix", "")
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {c for c in alias.choices if isinstance(c, str)}
        elif isinstance(alias, str):
            names.add(alias)
        else:
            names.add(f"{prefix}{name}")
    if not Settings.model_config.get("case_sensitive", False):
        names = {n.upper() for n in names}
    return names


def _is_setting(name: str) -> bool:
    case_sensitive = Settings.model_config.get("case_sensitive", False)
    return (name if case_sensitive else name.upper()) in _settings_env_names()


@functools.cache
def _app_paths() -> frozenset[str]:
    from app.main import create_app

    settings = Settings(
        env=Environment.DEV, jwt_secret=DEV_JWT_SECRET, encryption_key=DEV_ENCRYPTION_KEY
    )  # type: ignore[arg-type]
    return frozenset(getattr(r, "path", "") for r in create_app(settings).routes)


# --------------------------------------------------------------------------------------------
# YAML and kustomize


def test_settings_names_are_derived_from_the_class() -> None:
    names = _settings_env_names()
    # The aliased ones, and the prefixed ones.
    assert {"DATABASE_URL", "MOSAIC_BASE_URL", "UNBLOCK_JWT_SECRET", "UNBLOCK_ENV"} <= names
    assert "JWT_SECRET" not in names
    assert "UNBLOCK_NOT_A_SETTING" not in names


def test_every_yaml_parses_into_kubernetes_objects() -> None:
    files = _yaml_files()
    assert files, "deploy/ holds no YAML"
    for path in files:
        docs = _load(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc.get("apiVersion"), str), f"{path}: no apiVersion"
            assert isinstance(doc.get("kind"), str), f"{path}: no kind"
            if doc["kind"] != "Kustomization":
                assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} has no name"
    kinds = {d["kind"] for _, d in _objects()}
    expected = {"Deployment", "Job", "Service", "ConfigMap", "Secret"}
    expected |= {"PodDisruptionBudget", "HorizontalPodAutoscaler"}
    assert expected <= kinds, f"missing kinds: {expected - kinds}"


def _kustomization_entries(kfile: Path) -> list[str]:
    doc = _load(kfile)[0]
    entries = list(doc.get("resources", []))
    for key in ("patches", "patchesStrategicMerge"):
        for patch in doc.get(key, []):
            entries.append(patch["path"] if isinstance(patch, dict) else patch)
    return [e for e in entries if isinstance(e, str)]


def test_kustomizations_list_only_files_that_exist() -> None:
    kfiles = _kustomizations()
    assert DEPLOY / "kustomization.yaml" in kfiles
    for kfile in kfiles:
        doc = _load(kfile)[0]
        assert doc["kind"] == "Kustomization"
        assert doc.get("resources"), f"{kfile} lists no resources"
        for entry in _kustomization_entries(kfile):
            target = (kfile.parent / entry).resolve()
            assert target.exists(), f"{kfile}: {entry} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists(), f"{kfile}: {entry} is no base"
            else:
                # kustomize refuses files outside the kustomization's own directory tree.
                assert kfile.parent.resolve() in target.parents, f"{kfile}: {entry} is outside"


def test_every_manifest_is_applied_by_some_kustomization_except_the_example_secret() -> None:
    listed: set[Path] = set()
    for kfile in _kustomizations():
        listed |= {(kfile.parent / e).resolve() for e in _kustomization_entries(kfile)}
    manifests = {p.resolve() for p, _ in _objects()}
    assert EXAMPLE_SECRET.resolve() in manifests
    assert EXAMPLE_SECRET.resolve() not in listed, "the example Secret must never be applied"
    assert manifests - listed == {EXAMPLE_SECRET.resolve()}


def test_every_container_image_is_set_by_its_kustomization() -> None:
    seen: dict[str, tuple[str, str]] = {}
    for kfile in _kustomizations():
        images = {i["name"]: i for i in _load(kfile)[0].get("images", [])}
        for entry in _kustomization_entries(kfile):
            target = kfile.parent / entry
            if target.is_dir():
                continue
            for doc in _load(target):
                if doc.get("kind") not in POD_KINDS:
                    continue
                for container in _containers(doc):
                    image = container["image"]
                    assert image in images, f"{target}: image {image!r} not in {kfile} images"
                    pinned = (images[image]["newName"], str(images[image]["newTag"]))
                    # Migrations and service must run the same release.
                    assert seen.setdefault(image, pinned) == pinned, f"{kfile}: other image"
    assert seen, "no kustomization sets an image"


# --------------------------------------------------------------------------------------------
# Commands


def test_every_container_runs_a_real_unblock_subcommand() -> None:
    workloads = _workloads()
    assert workloads
    for obj in workloads:
        for container in _containers(obj):
            assert container.get("command", ["unblock"]) == ["unblock"], container["name"]
            assert container.get("args"), f"{container['name']}: no args"
            _parse_unblock_argv(container["args"])


def test_the_api_runs_serve_without_the_worker_on_its_container_port() -> None:
    api = _named("Deployment", "unblock-api")
    (container,) = _containers(api)
    path, ctx = _parse_unblock_argv(container["args"])
    assert path == ["serve"]
    assert ctx.params["worker"] is False, "the API Deployment must pass --no-worker"
    assert ctx.params["host"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == ctx.params["port"]
    assert api["spec"]["replicas"] >= 2


def test_workers_and_migrations_run_their_commands() -> None:
    worker = _named("Deployment", "unblock-worker")
    (container,) = _containers(worker)
    assert _parse_unblock_argv(container["args"])[0] == ["worker"]
    assert worker["spec"]["replicas"] >= 2

    job = _named("Job", "unblock-migrate")
    (container,) = _containers(job)
    path, ctx = _parse_unblock_argv(container["args"])
    assert path == ["migrate"]
    assert ctx.params["down"] is False
    assert ctx.params["revision"] == "head"
    assert _pod_spec(job)["restartPolicy"] == "Never"


def test_migrations_are_a_separate_pre_deploy_step() -> None:
    job = _named("Job", "unblock-migrate")
    annotations = job["metadata"].get("annotations", {})
    assert "pre-deploy" in annotations.values() or "PreSync" in annotations.values()
    # Not applied together with the Deployments, or one `kubectl apply -k` would race them.
    for kfile in _kustomizations():
        kinds = {
            d["kind"]
            for e in _kustomization_entries(kfile)
            if (kfile.parent / e).is_file()
            for d in _load(kfile.parent / e)
        }
        assert not ({"Job", "Deployment"} <= kinds), f"{kfile} applies migrations and pods at once"


# --------------------------------------------------------------------------------------------
# Probes, Service, scaling


def _http_probe(container: dict[str, Any], kind: str) -> dict[str, Any]:
    probe = container.get(kind)
    assert probe, f"{container['name']}: no {kind}"
    assert "httpGet" in probe, f"{container['name']}: {kind} is not an HTTP probe"
    return probe["httpGet"]


def test_api_probes_hit_healthz_and_readyz_on_the_serving_port() -> None:
    (container,) = _containers(_named("Deployment", "unblock-api"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert _http_probe(container, "livenessProbe")["path"] == "/healthz"
    assert _http_probe(container, "readinessProbe")["path"] == "/readyz"
    if "startupProbe" in container:
        # Startup must not wait on the database either.
        assert _http_probe(container, "startupProbe")["path"] == "/healthz"
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        if kind in container:
            port = _http_probe(container, kind)["port"]
            assert ports.get(port, port) == 8000, f"{kind} asks port {port}"


def test_probe_and_scrape_paths_are_routes_of_the_app() -> None:
    paths = _app_paths()
    api = _named("Deployment", "unblock-api")
    (container,) = _containers(api)
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        if kind in container:
            assert _http_probe(container, kind)["path"] in paths
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] in paths
    assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"]


def test_worker_probes_and_scrapes_hit_the_port_its_metrics_server_listens_on() -> None:
    worker = _named("Deployment", "unblock-worker")
    (container,) = _containers(worker)
    args = container["args"]
    metrics_port = int(args[args.index("--metrics-port") + 1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        if "httpGet" in container.get(kind, {}):
            port = container[kind]["httpGet"]["port"]
            assert ports.get(port, port) == metrics_port, f"worker {kind} would always fail"
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == metrics_port


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_service_sends_port_80_to_api_pods_only() -> None:
    (service,) = _of_kind("Service")
    api = _named("Deployment", "unblock-api")
    worker = _named("Deployment", "unblock-worker")
    selector = service["spec"]["selector"]
    assert _selects(selector, api["spec"]["template"]["metadata"]["labels"])
    assert not _selects(selector, worker["spec"]["template"]["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    (container,) = _containers(api)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports.get(port["targetPort"], port["targetPort"]) == 8000


def test_deployment_selectors_match_their_pods() -> None:
    for deployment in _of_kind("Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert _selects(selector, deployment["spec"]["template"]["metadata"]["labels"])


def test_disruption_budgets_and_autoscaler_target_real_deployments() -> None:
    pod_labels = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in _of_kind("Deployment")
    }
    budgets = _of_kind("PodDisruptionBudget")
    covered = {
        name
        for pdb in budgets
        for name, labels in pod_labels.items()
        if _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    }
    assert "unblock-api" in covered
    for pdb in budgets:
        assert any(
            _selects(pdb["spec"]["selector"]["matchLabels"], lb) for lb in pod_labels.values()
        )

    (hpa,) = _of_kind("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "unblock-api")
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


# --------------------------------------------------------------------------------------------
# Environment


def _container_environment(container: dict[str, Any]) -> dict[str, str]:
    """What the container's environment would be, with the example Secret's values."""
    secret = _example_secret()
    secret_name = secret["metadata"]["name"]
    secret_data = secret["stringData"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = _named("ConfigMap", source["configMapRef"]["name"])["data"]
        else:
            assert source["secretRef"]["name"] == secret_name
            data = secret_data
        env |= {str(k): str(v) for k, v in data.items()}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]
        if "secretKeyRef" in ref:
            assert ref["secretKeyRef"]["name"] == secret_name, item["name"]
            key = ref["secretKeyRef"]["key"]
            assert key in secret_data, f"{key} is not in {EXAMPLE_SECRET.name}"
            env[item["name"]] = secret_data[key]
        else:
            data = _named("ConfigMap", ref["configMapKeyRef"]["name"])["data"]
            env[item["name"]] = str(data[ref["configMapKeyRef"]["key"]])
    return env


def test_every_env_var_the_manifests_set_is_a_setting() -> None:
    for obj in _workloads():
        for container in _containers(obj):
            env = _container_environment(container)
            assert env, f"{container['name']} gets no configuration"
            unknown = sorted(n for n in env if not _is_setting(n))
            assert not unknown, f"{container['name']}: not settings: {unknown}"
    for key in _example_secret()["stringData"]:
        assert _is_setting(key), f"{EXAMPLE_SECRET.name}: {key} is not a setting"
    for configmap in _of_kind("ConfigMap"):
        for key in configmap["data"]:
            assert _is_setting(key), f"ConfigMap {configmap['metadata']['name']}: {key}"


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No setting leaks in from the environment the tests happen to run in."""
    for name in list(os.environ):
        if _is_setting(name):
            monkeypatch.delenv(name)
    return monkeypatch


def test_every_container_environment_makes_valid_production_settings(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    from cryptography.fernet import Fernet

    from app.database import asyncpg_url
    from app.settings import DatabaseSettings

    # Filled in as the example Secret says: the placeholders themselves are refused (below).
    generated = {
        "UNBLOCK_JWT_SECRET": secrets.token_urlsafe(48),
        "UNBLOCK_ENCRYPTION_KEY": Fernet.generate_key().decode(),
    }
    for obj in _workloads():
        for container in _containers(obj):
            env = _container_environment(container)
            migrates = container.get("args", [])[:1] == ["migrate"]
            if migrates:
                # `unblock migrate` needs the database only, and is given nothing more.
                assert not {"UNBLOCK_JWT_SECRET", "UNBLOCK_ENCRYPTION_KEY"} & env.keys()
            env |= {name: value for name, value in generated.items() if name in env}
            with clean_environment.context() as mp:
                for name, value in env.items():
                    mp.setenv(name, value)
                settings = DatabaseSettings() if migrates else Settings()
            assert settings.env is Environment.PRODUCTION, container["name"]
            assert settings.database_url, f"{container['name']}: no DATABASE_URL"
            asyncpg_url(settings.database_url)
            if not migrates:
                assert settings.encryption_keys, container["name"]


@pytest.mark.parametrize("name", ["UNBLOCK_JWT_SECRET", "UNBLOCK_ENCRYPTION_KEY"])
def test_the_example_secrets_placeholders_are_refused_in_production(
    clean_environment: pytest.MonkeyPatch, name: str
) -> None:
    placeholder = _example_secret()["stringData"][name]
    good = {
        "UNBLOCK_JWT_SECRET": secrets.token_urlsafe(48),
        "UNBLOCK_ENCRYPTION_KEY": Fernet.generate_key().decode(),
    }
    with clean_environment.context() as mp:
        for key, value in (good | {name: f" {placeholder}\n"}).items():
            mp.setenv(key, value)
        mp.setenv("UNBLOCK_ENV", "production")
        with pytest.raises(ValidationError, match=name):
            Settings()


# --------------------------------------------------------------------------------------------
# Pod hardening


def test_every_pod_is_non_root_read_only_and_bounded() -> None:
    uid = _dockerfile_user_uid()
    for obj in _workloads():
        spec = _pod_spec(obj)
        pod_sc = spec.get("securityContext", {})
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in _containers(obj):
            name = container["name"]
            sc = container.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, name
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) == uid, name
            assert sc.get("readOnlyRootFilesystem") is True, name
            assert sc.get("allowPrivilegeEscalation") is False, name
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}: read-only root needs a writable /tmp"
            assert "emptyDir" in volumes[mounts["/tmp"]], name
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{name}: {bound}"


# --------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    starts = [i for i, (k, _) in enumerate(instructions) if k == "FROM"]
    assert len(starts) >= 2, "the Dockerfile must be multi-stage"
    return instructions[starts[-1] :]


def _exec_form(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    found = [args for k, args in stage if k == keyword]
    assert found, f"final stage has no {keyword}"
    value = json.loads(found[-1])  # exec (JSON) form only: no shell in between
    assert isinstance(value, list)
    return value


def _dockerfile_user_uid() -> int:
    users = [args for k, args in _final_stage() if k == "USER"]
    assert users, "the final stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "USER must be numeric so runAsNonRoot can verify it"
    assert int(uid) != 0
    return int(uid)


def test_dockerfile_runs_unblock_serve_on_the_exposed_port() -> None:
    stage = _final_stage()
    assert _exec_form(stage, "ENTRYPOINT") == ["unblock"]
    path, ctx = _parse_unblock_argv(_exec_form(stage, "CMD"))
    assert path == ["serve"]
    assert ctx.params["host"] == "0.0.0.0"
    exposed = {args.split("/")[0] for k, args in stage if k == "EXPOSE"}
    assert str(ctx.params["port"]) in exposed


def test_dockerfile_base_user_and_environment() -> None:
    instructions = _dockerfile_instructions()
    args = dict(
        a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a
    )  # global ARG defaults
    stage = _final_stage()
    base = stage[0][1].split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base == "python:3.11-slim"
    assert _dockerfile_user_uid() > 0

    env: dict[str, str] = {}
    for k, a in stage:
        if k == "ENV":
            env |= dict(part.split("=", 1) for part in a.split())
    assert env.get("UNBLOCK_DATA_DIR") == "/data"
    assert env.get("PYTHONUNBUFFERED") == "1"
    for name in env:
        if name.startswith(("UNBLOCK_", "DATABASE_", "MOSAIC_")):
            assert _is_setting(name), f"Dockerfile sets {name}, which no setting reads"


def test_dockerfile_final_stage_has_no_build_tools() -> None:
    runs = " ".join(a for k, a in _final_stage() if k == "RUN")
    for tool in ("build-essential", "gcc", "g++", "make ", "apt-get install", "pip install"):
        assert tool not in runs, f"final stage installs {tool.strip()}"


def test_dockerfile_installs_the_built_wheel_not_the_source_tree() -> None:
    # The image runs what `pip install unblock` gets: the wheel, migrations inside the package.
    instructions = _dockerfile_instructions()
    runs = [a for k, a in instructions if k == "RUN"]
    assert any(re.search(r"pip wheel\b.*--wheel-dir\s+(\S+)\s+\.", a) for a in runs)
    assert any(re.search(r"pip install\b[^&;]*\.whl", a) for a in runs)
    assert not any(re.search(r"pip install[^&;]*\s-e\s", a) for a in runs), "editable install"
    copies = [a.split() for k, a in _final_stage() if k == "COPY"]
    assert copies == [["--from=builder", "/opt/venv", "/opt/venv"]], copies

    from app import migrations

    assert (migrations.MIGRATIONS_DIR / "env.py").exists()
    assert (migrations.MIGRATIONS_DIR / "script.py.mako").exists()


def test_dockerignore_keeps_the_source_and_drops_local_state() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p.lstrip("/").removeprefix("**/")) for p in patterns)

    for needed in ("pyproject.toml", "README.md", "LICENSE", "app"):
        assert not ignored(needed), f".dockerignore drops {needed}"
    # The Mosaic sandbox is a distribution of its own; the image must not even see it.
    for dropped in (".venv", ".git", ".unblock", ".pytest_cache", "__pycache__", "sandbox"):
        assert ignored(dropped), f".dockerignore keeps {dropped}"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_dockerfile_healthcheck_asks_healthz(status: int, healthy: bool) -> None:
    healthchecks = [a for k, a in _final_stage() if k == "HEALTHCHECK"]
    assert healthchecks, "no HEALTHCHECK"
    argv = json.loads(healthchecks[-1][healthchecks[-1].index("CMD") + 3 :].strip())
    assert argv[0] == "python", "the slim image has no curl: use python"
    assert "http://127.0.0.1:8000/healthz" in " ".join(argv)

    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        code = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in argv[1:]]
        result = subprocess.run(
            [sys.executable, *code], capture_output=True, timeout=20, check=False
        )
    finally:
        server.shutdown()
        server.server_close()
    assert (result.returncode == 0) is healthy, result.stderr.decode()
