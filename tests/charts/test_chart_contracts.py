"""The chart and the code cannot drift: the rendered settings file loads into the Settings model, the
rendered commands parse with the real `streamrec` CLI, the RayService names the real Serve application
and deployments, and every metric the alerts and the dashboard use is one the code exports."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartlib import (
    CHART,
    NAMESPACE,
    REGION_FILES,
    ROOT,
    config_document,
    objects,
    of_kind,
    one,
    pod_specs,
    render_file,
)

pytestmark = pytest.mark.charts

CONFIG_PATH = "/etc/streamrec/streamrec.yaml"
FAKE_SECRETS = {
    "STREAMREC_INGEST__PII_SALT": "a-salt-from-a-kubernetes-secret",
    "STREAMREC_SERVE__API_KEYS": '["key-one","key-two"]',
}


def streamrec_containers(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod, container) of every container that runs streamrec code (not the dev Redis)."""
    out = []
    for obj in objs:
        if obj["metadata"]["name"].endswith("-redis"):
            continue
        for where, pod in pod_specs(obj):
            for c in pod.get("containers", []):
                out.append((f"{where} {c['name']}", pod, c))
    return out


def pod_environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's env with each Secret reference replaced by a stand-in value."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var["name"] in FAKE_SECRETS:
            env[var["name"]] = FAKE_SECRETS[var["name"]]
        elif var["name"].endswith("__WAREHOUSE_DSN"):
            env[var["name"]] = "postgresql://sync:secret@warehouse.example.com:5439/streamrec"
        else:
            raise AssertionError(f"unexpected env {var}")
    return env


# ------------------------------------------------------------------------------------------ settings


def test_rendered_settings_validate(
    values_file: Path, values_objects: list[dict[str, Any]], values: dict[str, Any]
) -> None:
    """streamrec.yaml plus the Secret-sourced env is a valid Settings; region names match the values."""
    from streamrec.settings import LOCAL_PII_SALT, Settings

    doc = config_document(values_objects)
    assert doc["environment"] in ("dev", "staging", "prod")
    assert "pii_salt" not in doc["ingest"] and "api_keys" not in doc["serve"], "secrets belong in Secrets"
    with_secrets = json.loads(json.dumps(doc))
    with_secrets["ingest"]["pii_salt"] = FAKE_SECRETS["STREAMREC_INGEST__PII_SALT"]
    settings = Settings.model_validate(with_secrets)
    region = values["region"]
    assert list(settings.regions) == [region]
    r = settings.region(region)
    assert r.stream_name == f"streamrec-clicks-{region}"
    assert r.tables.leases == f"streamrec-ingest-leases-{region}"
    assert r.tables.recs == f"streamrec-recs-{region}" and r.tables.features == f"streamrec-features-{region}"
    assert r.lake_uri.startswith("s3://")
    if values_file in REGION_FILES:
        assert r.lake_uri == f"s3://streamrec-lake-{region}"
        assert r.redis_url.startswith("rediss://"), "ElastiCache with in-transit encryption"
    assert settings.pipeline.namespace == NAMESPACE
    assert settings.pipeline.rayjob.config_map == "streamrec-config"
    assert settings.pipeline.rayjob.service_account == "streamrec-ray"
    assert settings.pipeline.spark_service_account == "streamrec-spark"
    # The controller's RayJobs get the same Secret-backed env as every other pod (else the stage
    # command could not load its settings outside local).
    rayjob_env = {e["name"]: e for e in settings.pipeline.rayjob.env}
    assert rayjob_env["STREAMREC_INGEST__PII_SALT"]["valueFrom"]["secretKeyRef"]["name"]
    assert rayjob_env["STREAMREC_CONFIG"]["value"] == CONFIG_PATH
    # Without the Secret the settings refuse to start outside local: the salt never has a default.
    with pytest.raises(ValueError, match="pii_salt"):
        Settings.model_validate(doc)
    assert settings.ingest.pii_salt != LOCAL_PII_SALT


def test_every_pod_loads_its_settings(
    values_objects: list[dict[str, Any]],
    values: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a pod does at start: read STREAMREC_CONFIG, apply STREAMREC_* env (which wins over the file)."""
    from streamrec.settings import load_settings

    cm = one(values_objects, "ConfigMap", "-config")
    assert cm["metadata"]["name"] == "streamrec-config" and list(cm["data"]) == ["streamrec.yaml"]
    config_file = tmp_path / "streamrec.yaml"
    config_file.write_text(cm["data"]["streamrec.yaml"])
    checked = 0
    for where, pod, c in streamrec_containers(values_objects):
        if where.startswith("Pod/"):
            continue  # the helm test only calls HTTP
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert mounts.get("/etc/streamrec") == "config", f"{where}: settings not mounted"
        volume = next(v for v in pod["volumes"] if v["name"] == "config")
        assert volume["configMap"]["name"] == "streamrec-config"
        env = pod_environment(c)
        assert env["STREAMREC_CONFIG"] == CONFIG_PATH
        for name in list(env):
            monkeypatch.delenv(name, raising=False)
        with monkeypatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            mp.setenv("STREAMREC_CONFIG", str(config_file))
            settings = load_settings()  # also refuses an unknown STREAMREC_* variable
        assert settings.ingest.pii_salt == FAKE_SECRETS["STREAMREC_INGEST__PII_SALT"], where
        if "STREAMREC_SERVE__API_KEYS" in env:
            assert [k.get_secret_value() for k in settings.serve.api_keys] == ["key-one", "key-two"]
        warehouse = values.get("data", {}).get("warehouse", {})
        if warehouse.get("existingSecret"):
            assert settings.region(values["region"]).warehouse_dsn.endswith(
                "@warehouse.example.com:5439/streamrec"
            )
        checked += 1
    assert checked >= 4


def test_serving_pods_get_the_api_keys(values_objects: list[dict[str, Any]]) -> None:
    rs = one(values_objects, "RayService")
    for where, pod in pod_specs(rs):
        names = {e["name"] for e in pod["containers"][0]["env"]}
        assert "STREAMREC_SERVE__API_KEYS" in names, where
    for where, pod in pod_specs(one(values_objects, "Deployment", "-ingest")):
        assert "STREAMREC_SERVE__API_KEYS" not in {e["name"] for e in pod["containers"][0]["env"]}


def test_consumer_grace_period_outlasts_a_flush(values_objects: list[dict[str, Any]]) -> None:
    from streamrec.settings import IngestSettings

    doc = config_document(values_objects)
    flush = IngestSettings.model_validate({**doc["ingest"], "pii_salt": "x" * 16}).batch_max_seconds
    pod = one(values_objects, "Deployment", "-ingest")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > flush + 10


@pytest.mark.parametrize("enabled", [True, False])
def test_spark_pods_are_placed_like_the_ray_workers(enabled: bool) -> None:
    """The ETL's Spark driver and executors (emr.node_selector, emr.tolerations: EMR's pod template and
    the SparkApplication) go to the R5 node group with the RayJobs' workers, or nowhere special."""
    from streamrec.settings import Settings

    doc = config_document(objects(render_file(REGION_FILES[0], {"memoryOptimizedNodes": {"enabled": enabled}})))
    settings = Settings.model_validate({**doc, "ingest": {**doc["ingest"], "pii_salt": "x" * 16}})
    rayjob, emr = settings.pipeline.rayjob, settings.emr
    if enabled:
        assert rayjob.node_selector == {"streamrec.io/node-group": "r5"}
        assert emr.node_selector == "streamrec.io/node-group=r5"
        assert [dict(t) for t in emr.tolerations] == [dict(t) for t in rayjob.tolerations] == [
            {"key": "streamrec.io/memory-optimized", "operator": "Exists", "effect": "NoSchedule"}]
    else:
        assert emr.node_selector == "" and emr.tolerations == () == rayjob.tolerations


def test_a_grace_period_shorter_than_a_flush_is_refused() -> None:
    from helm_python import HelmError

    with pytest.raises(HelmError, match="terminationGracePeriodSeconds"):
        render_file(REGION_FILES[0], {"ingest": {"terminationGracePeriodSeconds": 60}})
    with pytest.raises(HelmError, match="terminationGracePeriodSeconds"):
        render_file(REGION_FILES[0], {"settings": {"ingest": {"batch_max_seconds": 200}}})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"secrets": {"piiSalt": {"existingSecret": ""}}}, "secrets.piiSalt.existingSecret is required"),
        ({"cache": {"url": ""}}, "cache.url is required"),
        ({"cache": {"inCluster": {"enabled": True}}}, "dev only"),
        ({"secrets": {"create": True, "piiSalt": {"value": "x" * 20}}}, "dev only"),
        ({"identity": {"mode": "irsa"}}, "identity.roles.ingest is required"),
    ],
)
def test_unsafe_production_values_are_refused(overrides: dict[str, Any], message: str) -> None:
    from helm_python import HelmError

    with pytest.raises(HelmError, match=re.escape(message)):
        render_file(REGION_FILES[0], overrides)


# ------------------------------------------------------------------------------------------ CLI


def _cli_root() -> Any:
    import typer.main

    from streamrec.cli import app

    return typer.main.get_command(app)


def parse_cli(args: list[str]) -> tuple[str, dict[str, Any]]:
    """Resolve ``streamrec <args>`` with the real typer/click command tree, without running it.

    A renamed command or option, a missing required option or a wrong value type fails here."""
    cmd, path, rest = _cli_root(), ["streamrec"], list(args)
    while hasattr(cmd, "commands"):
        assert rest, f"{' '.join(path)} needs a sub-command"
        name = rest.pop(0)
        assert name in cmd.commands, f"{' '.join(path)} has no command {name!r} (has: {sorted(cmd.commands)})"
        cmd, path = cmd.commands[name], [*path, name]
    ctx = cmd.make_context(" ".join(path), rest)  # parses and validates; the callback is not called
    return " ".join(path[1:]), dict(ctx.params)


def test_cli_parser_rejects_drift() -> None:
    """parse_cli is not vacuous: unknown commands and options fail."""
    with pytest.raises(AssertionError):
        parse_cli(["ingest", "consume", "--region", "us-east-1"])
    with pytest.raises(Exception, match="No such option"):
        parse_cli(["ingest", "run", "--region", "us-east-1", "--metrics-prot", "9100"])
    with pytest.raises(Exception, match=r"Missing (option|parameter)"):
        parse_cli(["ingest", "run"])


def _command_of(objs: list[dict[str, Any]], kind: str, suffix: str) -> list[str]:
    ((where, pod),) = list(pod_specs(one(objs, kind, suffix)))
    c = pod["containers"][0]
    assert c["command"] == ["streamrec"], f"{where}: not the streamrec entry point"
    return c["args"]


def test_consumer_command_is_the_cli(values_objects: list[dict[str, Any]], values: dict[str, Any]) -> None:
    command, params = parse_cli(_command_of(values_objects, "Deployment", "-ingest"))
    assert command == "ingest run"
    assert params["region"] == values["region"]
    pod = one(values_objects, "Deployment", "-ingest")["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    assert params["metrics_port"] == ports["metrics"] == 9100
    assert params["until_drained"] is False


def test_controller_command_is_the_cli(values_objects: list[dict[str, Any]]) -> None:
    command, params = parse_cli(_command_of(values_objects, "Deployment", "-controller"))
    assert command == "operator run"
    assert params["namespace"] == NAMESPACE
    deploy = one(values_objects, "Deployment", "-controller")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"] == {"type": "Recreate"}
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert params["liveness_port"] == ports["health"]
    assert params["metrics_port"] == ports["metrics"] == 9100
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_cronjob_command_is_the_cli(values_objects: list[dict[str, Any]], values: dict[str, Any]) -> None:
    command, params = parse_cli(_command_of(values_objects, "CronJob", "-pipeline-create"))
    assert command == "pipeline create"
    assert params["region"] == values["region"] and params["namespace"] == NAMESPACE
    assert params["day"] is None, "the command's default is yesterday (UTC)"
    cron = one(values_objects, "CronJob", "-pipeline-create")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["schedule"] == values.get("pipeline", {}).get("cron", {}).get("schedule", "30 6 * * *")
    assert cron["timeZone"] == "Etc/UTC"


def test_controller_rayjob_template_comes_from_the_chart(values_objects: list[dict[str, Any]]) -> None:
    """The controller's RayJobs run the chart's Ray image with its ServiceAccount and settings file."""
    doc = config_document(values_objects)
    tpl = doc["pipeline"]["rayjob"]
    accounts = {sa["metadata"]["name"] for sa in of_kind(values_objects, "ServiceAccount")}
    assert tpl["service_account"] in accounts
    assert tpl["config_map"] == one(values_objects, "ConfigMap", "-config")["metadata"]["name"]
    rs = one(values_objects, "RayService")
    assert (
        tpl["image"]
        == rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    )


# ------------------------------------------------------------------------------------------ Serve


def _serve_source() -> ast.Module:
    return ast.parse((ROOT / "ray_apps" / "serve" / "app.py").read_text())


def _deployment_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for dec in node.decorator_list:
                if (
                    isinstance(dec, ast.Call)
                    and isinstance(dec.func, ast.Attribute)
                    and dec.func.attr == "deployment"
                ):
                    kw = {k.arg: k.value for k in dec.keywords}
                    names.add(kw["name"].value if "name" in kw else node.name)
    return names


def _routes(tree: ast.Module) -> set[str]:
    return {
        dec.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for dec in node.decorator_list
        if isinstance(dec, ast.Call)
        and isinstance(dec.func, ast.Attribute)
        and dec.func.attr in ("get", "post")
        and dec.args
        and isinstance(dec.args[0], ast.Constant)
    }


def test_rayservice_runs_the_serve_application(
    values_objects: list[dict[str, Any]], values: dict[str, Any]
) -> None:
    rs = one(values_objects, "RayService")
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    module, func = app["import_path"].split(":")
    assert app["import_path"] == "ray_apps.serve.app:build"
    tree = _serve_source()
    assert module == "ray_apps.serve.app" and any(
        isinstance(n, ast.FunctionDef) and n.name == func for n in tree.body
    ), f"{func} not in {module}"
    assert app["args"] == {"region": values["region"], "config": CONFIG_PATH}
    assert app["route_prefix"] == "/"
    # serveConfigV2 deployment names must be the names the code gives its deployments.
    assert {d["name"] for d in app["deployments"]} == _deployment_names(tree) == {"Ingress", "Retriever"}
    routes = _routes(tree)
    assert {"/readyz", "/healthz", "/metrics"} <= routes
    doc = config_document(values_objects)
    assert serve["http_options"]["port"] == doc["serve"]["port"] == 8000


@pytest.mark.parametrize("front", ["haproxy", "proxy"])
def test_every_ray_serving_pod_carries_the_serve_front_environment(front: str) -> None:
    """serving.httpFront reaches Serve as process env on the head and the workers (Serve reads it when its
    processes start), the same variables ray_apps/serve/front.py gives a local cluster, and the settings
    file says the same front."""
    from ray_apps.serve.front import serve_env

    objs = objects(render_file(REGION_FILES[0], {"serving": {"httpFront": front}}))
    rs = one(objs, "RayService")
    pods = list(pod_specs(rs))
    assert len(pods) == 2  # head and the r5 worker group
    for where, pod in pods:
        env = pod_environment(pod["containers"][0])
        assert {k: v for k, v in env.items() if k.startswith("RAY_SERVE_")} == serve_env(front), where
    assert config_document(objs)["serve"]["http_front"] == front


def test_serve_autoscaling_matches_the_settings(values_objects: list[dict[str, Any]]) -> None:
    """One source for Serve's scaling: serveConfigV2 and streamrec.yaml (serve.ingress/.retriever) agree,
    and the values are valid for the settings model."""
    from streamrec.settings import RetrieverScaling, ServeScaling

    rs = one(values_objects, "RayService")
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    doc = config_document(values_objects)
    for deployment, key, model in (
        ("Ingress", "ingress", ServeScaling),
        ("Retriever", "retriever", RetrieverScaling),
    ):
        d = next(x for x in app["deployments"] if x["name"] == deployment)
        s = model.model_validate(doc["serve"][key])
        assert d["autoscaling_config"] == {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        }
        assert d["max_ongoing_requests"] == s.max_ongoing_requests
        assert d["ray_actor_options"] == {"num_cpus": s.num_cpus}


def test_ray_pods_placement_and_probes(values_objects: list[dict[str, Any]], values: dict[str, Any]) -> None:
    rs = one(values_objects, "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    pod = group["template"]["spec"]
    doc = config_document(values_objects)
    if values.get("memoryOptimizedNodes", {}).get("enabled", True):
        # Same placement as the controller's RayJobs (settings pipeline.rayjob) and k8s/ node groups.
        assert (
            pod["nodeSelector"]
            == doc["pipeline"]["rayjob"]["node_selector"]
            == {"streamrec.io/node-group": "r5"}
        )
        assert pod["tolerations"] == doc["pipeline"]["rayjob"]["tolerations"]
        assert pod["tolerations"][0]["key"] == "streamrec.io/memory-optimized"
    for where, p in pod_specs(rs):
        shm = next(v for v in p["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory", where
        assert {"name": "dshm", "mountPath": "/dev/shm"} in p["containers"][0]["volumeMounts"]
    worker = pod["containers"][0]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "serve"}


def test_pdb_covers_the_ray_pods(values_objects: list[dict[str, Any]]) -> None:
    pdb = one(values_objects, "PodDisruptionBudget")
    rs = one(values_objects, "RayService")
    selector = pdb["spec"]["selector"]["matchLabels"]
    for group in [
        rs["spec"]["rayClusterConfig"]["headGroupSpec"],
        *rs["spec"]["rayClusterConfig"]["workerGroupSpecs"],
    ]:
        labels = group["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in selector.items())


# ------------------------------------------------------------------------------------------ metrics


def exported_metrics() -> set[str]:
    """Prometheus series names the code exports (counters end in _total; histograms add _bucket etc.)."""
    names = set()
    for path in (ROOT / "ingest" / "metrics.py", ROOT / "ray_apps" / "serve" / "metrics.py",
                 ROOT / "operators" / "metrics.py"):
        for kind, name in re.findall(
            r'\b(Counter|Gauge|Histogram)\(\s*"(streamrec_[a-z0-9_]+)"', path.read_text()
        ):
            if kind == "Histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "Counter":
                names |= {name if name.endswith("_total") else f"{name}_total"}
            else:
                names.add(name)
    return names


# Series from kube-state-metrics (not streamrec's): the CronJob's create jobs and the controller's Deployment.
KUBE_STATE_METRICS = {"kube_job_status_failed", "kube_deployment_status_replicas_available"}


def _series(expr: str) -> set[str]:
    return set(re.findall(r"\b(streamrec_[a-z0-9_]+|kube_[a-z0-9_]+)\b", expr))


def test_alerts_and_dashboard_use_exported_metrics(values_objects: list[dict[str, Any]]) -> None:
    known = exported_metrics() | KUBE_STATE_METRICS
    assert "streamrec_ingest_millis_behind_latest" in known and "streamrec_serve_requests_total" in known
    rules = [
        r for o in of_kind(values_objects, "PrometheusRule") for g in o["spec"]["groups"] for r in g["rules"]
    ]
    dashboard = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    exprs = [r["expr"] for r in rules] + [
        t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])
    ]
    used = set().union(*(_series(e) for e in exprs))
    assert used, "no metric found"
    assert used <= known, f"not exported by the code: {sorted(used - known)}"
    if rules:
        alerts = {r["alert"] for r in rules}
        assert {
            "StreamrecConsumerLagHigh",
            "StreamrecDeadLetterRateHigh",
            "StreamrecOnlineFeaturesSkipped",
            "StreamrecServeLatencyP99High",
            "StreamrecServe5xxRateHigh",
            "StreamrecPipelineCreateFailed",
            "StreamrecPipelineRunFailed",
            "StreamrecPipelineNoRecentSuccess",
            "StreamrecPipelineStageRetries",
        } <= alerts


def test_dashboard_is_a_labelled_configmap(values_objects: list[dict[str, Any]]) -> None:
    cm = one(values_objects, "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["streamrec.json"])
    assert dashboard["uid"] == "streamrec-overview" and len(dashboard["panels"]) >= 10
