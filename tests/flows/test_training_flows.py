"""The two training flows, end to end, on a tiny corpus (16 DCGAN faces + one short real clip)."""
from __future__ import annotations

import pytest

from catalogs import CatalogStore
from flows.train_matcher import train_matcher_flow
from flows.train_uunet import train_uunet_flow
from tasks.datapath.deidentify import load_face_pair
from tasks.training.corpus import build_default_corpus, export_training_tensors


@pytest.fixture(scope="module")
def corpus(clips, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    faces = build_default_corpus(root, n_gan=16, seed=3, footage=[clips["carphone"]])
    export_training_tensors(faces, root / "faces.pt")
    return root


def test_matcher_then_uunet_flows_write_weights_metrics_and_samples(corpus, tmp_path, prefect_harness):
    matcher = tmp_path / "matcher.pt"
    result = train_matcher_flow(corpus_dir=str(corpus), out=str(matcher), steps=3, batch=8, device="cpu",
                                metrics_every=1)
    assert matcher.is_file() and result["step"] == 3
    weights = tmp_path / "uunet.pt"
    result = train_uunet_flow(corpus_dir=str(corpus), matcher=str(matcher), out=str(weights), steps=2,
                              control="-1,1,0", device="cpu", samples_every=1, metrics_every=1,
                              batch_subjects=2)  # 16 faces a step: the flow's plumbing is under test, not learning
    assert result["step"] == 2
    assert load_face_pair("uunet", weights).name == "uunet"
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == [
        "samples_0000001.png", "samples_0000002.png"]
    catalog = CatalogStore(corpus / "catalogs")
    metrics = catalog.read("metrics")
    assert set(metrics["method"]) == {"matcher", "uunet"}
    mse = metrics[metrics["metric"] == "loss_mse"]
    assert sorted(mse["step"].tolist()) == [1, 2]
    runs = catalog.read("runs")
    assert set(runs["flow"]) == {"train-matcher", "train-uunet"}
    # The sealed default's public-only U_e, fine-tuned from that pair: U_e alone, no U_d to restore with.
    public = tmp_path / "uunet-public.pt"
    result = train_uunet_flow(corpus_dir=str(corpus), matcher=str(matcher), out=str(public), steps=1, device="cpu",
                              samples_every=1, metrics_every=1, init=str(weights), public=True, batch_subjects=2)
    assert result["step"] == 1 and load_face_pair("uunet", public).decoder is None
    losses = set(CatalogStore(corpus / "catalogs").read("metrics")["metric"])
    assert {"loss_noise", "loss_grid"} <= losses and "loss_face" not in losses  # the recipe's face weight is 0
