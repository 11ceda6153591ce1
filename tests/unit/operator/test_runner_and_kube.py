"""The `run` subcommand's flags, the REST paths of the Kubernetes adapter, timer settings from env."""

from __future__ import annotations

import argparse

import pytest

from moe_operator import handlers, runner
from moe_operator.children import CONFIG_MAP, DEPLOYMENT
from moe_operator.kube import MOEROUTERS, object_path


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    return parser.parse_args(argv)


def test_run_defaults_are_cluster_wide_standalone_with_liveness_and_metrics():
    args = parse()
    assert args.namespace == [] and not args.all_namespaces
    assert args.liveness == "http://0.0.0.0:8080/healthz" and args.metrics_port == 9090
    assert args.peering is None and args.priority == 0 and not args.verbose


def test_namespaces_repeat():
    assert parse("--namespace", "a", "--namespace", "b").namespace == ["a", "b"]


@pytest.mark.parametrize("argv", [("--namespace", "a", "--all-namespaces"), ("--peering", "p", "--standalone")])
def test_contradicting_flags_are_rejected(argv):
    with pytest.raises(SystemExit):
        parse(*argv)


@pytest.mark.parametrize(
    ("resource", "namespace", "name", "path"),
    [
        (CONFIG_MAP, "ns", "c", "/api/v1/namespaces/ns/configmaps/c"),
        (DEPLOYMENT, "ns", None, "/apis/apps/v1/namespaces/ns/deployments"),
        (MOEROUTERS, "ns", "r", "/apis/moerouter.io/v1alpha1/namespaces/ns/moerouters/r"),
        (MOEROUTERS, None, None, "/apis/moerouter.io/v1alpha1/moerouters"),
    ],
)
def test_object_paths_follow_the_rest_conventions(resource, namespace, name, path):
    assert object_path(resource, namespace, name) == path


def test_timer_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MOE_OPERATOR_RESYNC_SECONDS", "2.5")
    assert handlers._seconds("MOE_OPERATOR_RESYNC_SECONDS", 300) == 2.5
    monkeypatch.delenv("MOE_OPERATOR_RESYNC_SECONDS")
    assert handlers._seconds("MOE_OPERATOR_RESYNC_SECONDS", 300) == 300


@pytest.mark.parametrize("raw", ["soon", "0", "-1"])
def test_bad_timer_settings_name_the_variable(monkeypatch, raw):
    monkeypatch.setenv("MOE_OPERATOR_RESYNC_SECONDS", raw)
    with pytest.raises(ValueError, match="MOE_OPERATOR_RESYNC_SECONDS"):
        handlers._seconds("MOE_OPERATOR_RESYNC_SECONDS", 300)


def test_retry_backoff_doubles_up_to_five_minutes():
    delays = [handlers._backoff(retry) for retry in range(12)]
    assert delays[1] == 2 * delays[0] and delays[-1] == handlers.MAX_BACKOFF_SECONDS


def test_the_child_watches_are_filtered_by_the_api_server_and_the_moerouter_watch_is_not():
    import kopf
    from kopf._cogs.structs.references import Resource

    settings = kopf.OperatorSettings()
    handlers.watch_only_our_children(settings)
    for child in handlers.WATCHED_CHILDREN:
        assert settings.watching.label_selectors.collect(Resource(child.group, child.version, child.plural)) == [
            "app.kubernetes.io/managed-by=moe-router-operator"
        ]
    assert settings.watching.label_selectors.collect(Resource(*handlers.ROUTERS)) == []
    assert settings.watching.label_selectors.collect(Resource("", "v1", "secrets")) == []
