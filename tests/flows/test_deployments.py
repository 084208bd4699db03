"""prefect.yaml must describe deployments Prefect accepts and that bind to our flows' signatures."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import yaml
from prefect.cli.deploy._models import PrefectYamlModel

REPO = Path(__file__).resolve().parents[2]


def _config():
    return PrefectYamlModel.model_validate(yaml.safe_load((REPO / "prefect.yaml").read_text()))


def _flow(entrypoint: str):
    path, name = entrypoint.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def test_every_deployment_binds_its_parameters_to_the_flow():
    for deployment in _config().deployments:
        flow = _flow(deployment.entrypoint)
        inspect.signature(flow.fn).bind(**deployment.parameters)  # raises on unknown/missing ones


def test_anonymize_is_scheduled_nightly_and_reconstruct_never():
    deployments = {d.name: d for d in _config().deployments}
    nightly = deployments["nightly-anonymize"]
    assert [s.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert _flow(nightly.entrypoint).name == "anonymize-archive"
    assert not deployments["reconstruct"].schedules
    assert _flow(deployments["reconstruct"].entrypoint).name == "reconstruct-public-streams"
