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


def test_the_nightly_host_is_given_public_keys_only_and_reconstruct_the_private_one():
    deployments = {d.name: d for d in _config().deployments}
    nightly, private = deployments["nightly-anonymize"].parameters, deployments["reconstruct"].parameters
    assert nightly["public_keys"] and all(str(p).endswith(".pub") for p in nightly["public_keys"])
    assert not any("private" in name or str(value).endswith(".key") for name, value in nightly.items())
    assert str(private["private_key"]).endswith(".key")
