"""Training loops of both UU-Net phases. Needs torch and numpy only, so the same code runs
inside the Prefect flows on a CPU and as a standalone script on a GPU machine:

    python -m tasks.training matcher --data faces.pt --out matcher.pt --steps 2000 --device cuda
    python -m tasks.training uunet --data faces.pt --matcher matcher.pt --out uunet.pt --steps 20000

`faces.pt` is the tensor file `tasks.training.corpus.export_training_tensors` writes from the
faces catalog. Phase I learns the pairwise attribute matcher D_a (paper Sec. III-A);
phase II learns U_e, U_d against the PatchGAN critic D_f with the terms of eq. 13 plus two
of ours (wrong key, distance from x). Both are resumable from their checkpoints.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models import losses as L
from models.critics import AttributeMatcher, PatchCritic
from models.registry import build_pair

FACES_FORMAT = "uunet-faces/1"
MATCHER_FORMAT = "uunet-matcher/1"
TRAIN, VAL = 0, 1

MetricsHook = Callable[[int, dict[str, float]], None]  # (step, values)
SamplesHook = Callable[[int, np.ndarray], None]  # (step, uint8 grid image (H, W, 3))


class FaceData:
    """The exported face tensors, on one device, with the pair and group samplers both phases use."""

    def __init__(self, path: str | Path, device: torch.device, split: int = TRAIN) -> None:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        if blob.get("format") != FACES_FORMAT:
            raise ValueError(f"{path} is not a {FACES_FORMAT} file")
        keep = torch.as_tensor(blob["split"]) == split
        if not keep.any():
            raise ValueError(f"{path} has no faces in split {split}")
        self.device = device
        self.label_names: list[str] = list(blob["label_names"])
        self.images = blob["images"][keep].to(device)  # uint8 (N, 3, 64, 64)
        self.subject = torch.as_tensor(blob["subject"])[keep]
        self.sequence = torch.as_tensor(blob["sequence"])[keep]
        self.labels = torch.as_tensor(blob["labels"], dtype=torch.float32)[keep].to(device)
        # Index: rows of each subject, and rows of each sequence, for the samplers.
        self.subjects = torch.unique(self.subject)
        self._rows_of_subject = {int(s): torch.nonzero(self.subject == s).flatten() for s in self.subjects}
        self._sequences_of_subject = {
            int(s): torch.unique(self.sequence[self._rows_of_subject[int(s)]]) for s in self.subjects}
        self._rows_of_sequence = {int(q): torch.nonzero(self.sequence == q).flatten()
                                  for q in torch.unique(self.sequence)}

    def __len__(self) -> int:
        return len(self.images)

    def faces(self, rows: torch.Tensor, augment: bool, generator: torch.Generator) -> torch.Tensor:
        x = self.images[rows.to(self.device)].float().div_(255.0)
        return augment_faces(x, generator) if augment else x

    def matcher_pairs(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Half same-subject pairs (another frame, or the same image re-augmented), half random others."""
        first = torch.randint(len(self), (n,), generator=generator)
        second = torch.randint(len(self), (n,), generator=generator)
        for k in range(n // 2):
            rows = self._rows_of_subject[int(self.subject[first[k]])]
            second[k] = rows[torch.randint(len(rows), (1,), generator=generator)]
        return first, second

    def groups(self, subjects: int, sequences: int, frames: int,
               generator: torch.Generator) -> torch.Tensor:
        """Rows shaped (subjects, sequences, frames) for phase II.

        A real subject contributes frames of its own sequences (temporal consistency is then
        learnt on real motion); a subject with one sequence repeats it and relies on
        augmentation, so each (subject, sequence) slot is one virtual sequence with its own noise.
        """
        picked = self.subjects[torch.randperm(len(self.subjects), generator=generator)[:subjects]]
        out = torch.empty((subjects, sequences, frames), dtype=torch.long)
        for i, s in enumerate(picked.tolist()):
            seqs = self._sequences_of_subject[s]
            for j in range(sequences):
                q = int(seqs[torch.randint(len(seqs), (1,), generator=generator)])
                rows = self._rows_of_sequence[q]
                out[i, j] = rows[torch.randint(len(rows), (frames,), generator=generator)]
        return out


def augment_faces(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip, shift by up to 4 px and jitter brightness/contrast: the same identity, a new image.

    Most training subjects are single GAN faces; augmentation is what gives them
    "same identity, different image" pairs.
    """
    n = x.shape[0]
    dev = x.device
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.to(dev)[:, None, None, None], x.flip(-1), x)
    shifts = torch.randint(-4, 5, (2,), generator=generator).tolist()
    x = torch.roll(F.pad(x, (4, 4, 4, 4), mode="replicate"), shifts=shifts, dims=(2, 3))[..., 4:-4, 4:-4]
    gain = (1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)).to(dev)
    bias = (0.06 * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)).to(dev)
    return (x * gain + bias).clamp_(0, 1)


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney), NaN when one class is missing."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="mergesort")
    ranks[order] = np.arange(1, len(scores) + 1)
    # Average ranks over ties so equal scores count half.
    for value in np.unique(scores):
        tie = scores == value
        ranks[tie] = ranks[tie].mean()
    return float((ranks[positive].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


# ----------------------------------------------------------------------------------------
# Phase I: the pairwise attribute matcher D_a
# ----------------------------------------------------------------------------------------

@dataclass
class MatcherConfig:
    steps: int = 2000
    batch: int = 64
    lr: float = 2e-4
    eval_every: int = 200
    eval_pairs: int = 1024
    checkpoint_every: int = 500
    seed: int = 0


def _matcher_eval(matcher: AttributeMatcher, data: FaceData, pairs: int, seed: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)
    first, second = data.matcher_pairs(pairs, generator)
    matcher.eval()
    with torch.no_grad():
        probs = matcher(data.faces(first, True, generator), data.faces(second, True, generator))
    matcher.train()
    bits, mask = L.same_label_bits(data.labels[first.to(data.device)], data.labels[second.to(data.device)])
    out = {}
    for k, name in enumerate(data.label_names):
        known = mask[:, k].cpu().numpy()
        out[f"val_auc_{name}"] = auc(probs[:, k].cpu().numpy()[known], bits[:, k].cpu().numpy()[known] > 0.5)
    return out


def train_matcher(data: FaceData, val: FaceData | None, out: str | Path, config: MatcherConfig,
                  resume: str | Path | None = None, on_metrics: MetricsHook | None = None) -> dict[str, Any]:
    """Phase I (eq. 3): BCE on 'same label' bits of image pairs; keeps the best validation checkpoint."""
    device = data.device
    torch.manual_seed(config.seed)
    matcher = AttributeMatcher(len(data.label_names)).to(device)
    opt = torch.optim.Adam(matcher.parameters(), lr=config.lr)
    step, best = 0, -math.inf
    generator = torch.Generator().manual_seed(config.seed)
    if resume and Path(resume).is_file():
        state = torch.load(resume, map_location=device, weights_only=False)
        matcher.load_state_dict(state["matcher"])
        opt.load_state_dict(state["optimizer"])
        step, best = state["step"], state["best"]
        generator.set_state(state["generator"])
    out = Path(out)
    checkpoint = out.with_suffix(".ckpt")
    while step < config.steps:
        first, second = data.matcher_pairs(config.batch, generator)
        logits = matcher.logits(data.faces(first, True, generator), data.faces(second, True, generator))
        bits, mask = L.same_label_bits(data.labels[first.to(device)], data.labels[second.to(device)])
        loss = L.matcher_loss(logits, bits, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        values = {"loss_matcher": float(loss.detach())}
        if val is not None and (step % config.eval_every == 0 or step == config.steps):
            values.update(_matcher_eval(matcher, val, config.eval_pairs, config.seed + 1))
            score = values.get("val_auc_id", float("nan"))
            if not math.isnan(score) and score > best:
                best = score
                save_matcher(out, matcher, data.label_names, {"step": step, "val_auc_id": score,
                                                              "config": asdict(config)})
        if on_metrics:
            on_metrics(step, values)
        if step % config.checkpoint_every == 0 or step == config.steps:
            _atomic_save({"matcher": matcher.state_dict(), "optimizer": opt.state_dict(), "step": step,
                          "best": best, "generator": generator.get_state()}, checkpoint)
    if val is None or not out.is_file():
        save_matcher(out, matcher, data.label_names, {"step": step, "config": asdict(config)})
    return {"step": step, "best_val_auc_id": best}


def save_matcher(path: str | Path, matcher: AttributeMatcher, label_names: list[str], meta: dict) -> Path:
    return _atomic_save({"format": MATCHER_FORMAT, "label_names": label_names, "meta": meta,
                         "state": {k: v.cpu() for k, v in matcher.state_dict().items()}}, Path(path))


def load_matcher(path: str | Path, device: torch.device) -> tuple[AttributeMatcher, list[str]]:
    blob = torch.load(path, map_location=device, weights_only=False)
    if blob.get("format") != MATCHER_FORMAT:
        raise ValueError(f"{path} is not a {MATCHER_FORMAT} file")
    matcher = AttributeMatcher(len(blob["label_names"])).to(device)
    matcher.load_state_dict(blob["state"])
    return matcher.eval(), list(blob["label_names"])


# ----------------------------------------------------------------------------------------
# Phase II: U_e, U_d and the critic D_f
# ----------------------------------------------------------------------------------------

@dataclass
class UUNetConfig:
    steps: int = 2000
    subjects: int = 8  # batch = subjects × sequences × frames (authors: 4 subjects × 8 images)
    sequences: int = 2
    frames: int = 4
    lr_generator: float = 2e-4
    lr_critic: float = 2e-4
    critic_steps: int = 1
    gp_weight: float = 10.0
    control: str = "-1,0,0"  # s: one entry per matcher label; the ID entry is always -1
    widths: tuple[int, ...] = (32, 64, 128, 256)
    critic_widths: tuple[int, ...] = (64, 128, 256)
    critic_head: int = 512
    keyed: bool = True
    # The paper's weights, but for two: our critic is a WGAN critic whose unbounded scores
    # drowned the reconstruction at w_adv = 1 (measured: 19-21 dB after 7.7k GPU steps, and
    # U_d ignored the key), so adv is 0.1 and mse 100 (the authors' code also used 100);
    # keypix 50 makes U_d depend on the key. This is the recipe of the bundled weights.
    weights: dict[str, float] = field(default_factory=lambda: dict(
        L.LOSS_WEIGHTS, mse=100.0, adv=0.1, far=10.0, keypix=50.0))
    far_margin: float = 0.03  # a must differ from x by at least this MSE (PSNR ≈ 15 dB)
    key_margin: float = 0.03  # U_d with a wrong key must miss x by at least this MSE
    checkpoint_every: int = 500
    samples_every: int = 500
    seed: int = 0


def _quantise(a: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels as the public stream does, passing gradients straight through."""
    return a + (torch.round(a * 255.0) / 255.0 - a).detach()


def sample_grid(x: torch.Tensor, a: torch.Tensor, r: torch.Tensor, r_wrong: torch.Tensor, rows: int = 8) -> np.ndarray:
    """Rows of x | a | r | r_wrong_key as one uint8 image."""
    cols = [t[:rows].detach().clamp(0, 1).cpu() for t in (x, a, r, r_wrong)]
    grid = torch.cat([torch.cat(list(c), dim=1) for c in cols], dim=2)  # (3, rows*64, 4*64)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def train_uunet(data: FaceData, matcher: AttributeMatcher, out: str | Path, config: UUNetConfig,
                resume: str | Path | None = None, on_metrics: MetricsHook | None = None,
                on_samples: SamplesHook | None = None, deadline: float | None = None,
                init: str | Path | None = None, half: bool = False) -> dict[str, Any]:
    """Phase II (eq. 13): critic steps (eq. 6 + gradient penalty) alternate with generator steps.

    `deadline` (time.time() value) stops early with a checkpoint, for time-boxed GPU bursts.
    `init` starts U_e and U_d from a trained pair (a fresh critic, step 0): fine-tuning a
    pair to another control vector s costs far fewer steps than training one from scratch.
    `half` writes the weights file in float16 (see save_face_pair).
    """
    from tasks.datapath.deidentify import save_face_pair  # torch-only; kept local so this module stays light

    device = data.device
    torch.manual_seed(config.seed)
    model_config = {"widths": list(config.widths), "keyed": config.keyed}
    encoder, decoder = build_pair("uunet", model_config)
    encoder, decoder = encoder.to(device).train(), decoder.to(device).train()
    critic = PatchCritic(config.critic_widths, config.critic_head).to(device).train()
    matcher = matcher.to(device).eval()
    for p in matcher.parameters():
        p.requires_grad_(False)
    s = L.parse_control_vector(config.control, matcher_label_names(matcher, data)).to(device)
    opt_g = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=config.lr_generator,
                             betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(critic.parameters(), lr=config.lr_critic, betas=(0.5, 0.9))
    generator = torch.Generator().manual_seed(config.seed)
    step = 0
    out = Path(out)
    checkpoint = out.with_suffix(".ckpt")
    if init and not (resume and Path(resume).is_file()):
        blob = torch.load(init, map_location=device, weights_only=True)
        if blob.get("model") != "uunet" or blob.get("config") != model_config:
            raise ValueError(f"{init}: a {blob.get('model')} pair with config {blob.get('config')} cannot "
                             f"start a uunet pair with config {model_config}")
        encoder.load_state_dict(blob["encoder"])
        decoder.load_state_dict(blob["decoder"])
    if resume and Path(resume).is_file():
        state = torch.load(resume, map_location=device, weights_only=False)
        for module, key in ((encoder, "encoder"), (decoder, "decoder"), (critic, "critic"),
                            (opt_g, "opt_g"), (opt_d, "opt_d")):
            module.load_state_dict(state[key])
        step = state["step"]
        generator.set_state(state["generator"])
    S, Q, T = config.subjects, config.sequences, config.frames
    started = time.time()
    while step < config.steps and (deadline is None or time.time() < deadline):
        rows = data.groups(S, Q, T, generator)
        x = data.faces(rows.flatten(), True, generator)
        # One noise map per (subject, sequence): the keyed noise of one sequence at inference.
        noise = torch.rand(S * Q, 1, 64, 64, generator=generator).to(device)
        noise = noise.repeat_interleave(T, dim=0)
        wrong = torch.rand(S * Q * T, 1, 64, 64, generator=generator).to(device)

        for _ in range(config.critic_steps):
            with torch.no_grad():
                a = encoder(x, noise)
                r = decoder(_quantise(a), noise)
            d_loss = L.critic_loss(critic(x), critic(a), critic(r)) + config.gp_weight * (
                L.gradient_penalty(critic, x, a) + L.gradient_penalty(critic, x, r)) / 2
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

        a = encoder(x, noise)
        a_q = _quantise(a)
        r = decoder(a_q, noise)
        r_wrong = decoder(a_q, wrong)
        grouped = a.view(S, Q, T, 3, 64, 64)
        terms = {
            "mse": L.reconstruction_loss(x, r),
            "adv": L.generator_adversarial_loss(critic(a), critic(r)),
            "ano": L.anonymization_loss(matcher(x, a), s),
            # Two frames of one sequence share one virtual identity (eq. 10)...
            "con": L.consistency_loss(matcher(grouped[:, :, 0].flatten(0, 1), grouped[:, :, 1].flatten(0, 1))),
            # ...two sequences of one subject get two different ones (eq. 11).
            "div": L.diversity_loss(matcher(grouped[:, 0].flatten(0, 1), grouped[:, 1].flatten(0, 1))),
            "dis": L.colour_distribution_loss(x, a),
            "key": L.wrong_key_loss(matcher(x, r_wrong)),
            # Ours: hinge terms that the matcher alone, trained on little data, cannot enforce.
            "far": F.relu(config.far_margin - F.mse_loss(a, x)),
            "keypix": F.relu(config.key_margin - F.mse_loss(r_wrong, x)),
        }
        if not config.keyed:
            # Paper mode: U_d never sees the key, so a wrong key cannot matter; these terms
            # would only fight the reconstruction.
            del terms["key"], terms["keypix"]
        g_loss = L.weighted_total(terms, config.weights)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        step += 1

        if on_metrics:
            values = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
            values.update(loss_total=float(g_loss.detach()), loss_critic=float(d_loss.detach()),
                          psnr_xr=float(10 * torch.log10(1 / F.mse_loss(r.detach(), x).clamp_min(1e-10))),
                          psnr_xr_wrong=float(10 * torch.log10(1 / F.mse_loss(r_wrong.detach(), x).clamp_min(1e-10))),
                          steps_per_s=step / max(time.time() - started, 1e-6))
            on_metrics(step, values)
        if on_samples and (step % config.samples_every == 0 or step == config.steps):
            on_samples(step, sample_grid(x, a, r, r_wrong))
        if step % config.checkpoint_every == 0 or step == config.steps:
            _save_uunet_state(checkpoint, encoder, decoder, critic, opt_g, opt_d, step, generator)
    _save_uunet_state(checkpoint, encoder, decoder, critic, opt_g, opt_d, step, generator)
    save_face_pair(out, "uunet", encoder.eval(), decoder.eval(), model_config,
                   {"step": step, "config": _jsonable(asdict(config)),
                    "label_names": matcher_label_names(matcher, data),
                    "init": None if init is None else str(init)}, half=half)
    return {"step": step, "seconds": time.time() - started}


@dataclass
class PublicEncoderConfig:
    """U_e alone, for the sealed default: the public face need not carry x for any U_d."""

    steps: int = 2000
    subjects: int = 4  # batch = subjects × sequences × frames
    sequences: int = 2
    frames: int = 4
    lr_generator: float = 2e-4
    lr_critic: float = 2e-4
    gp_weight: float = 10.0
    control: str = "-1,0,0"
    widths: tuple[int, ...] = (32, 64, 128, 256)
    # A smaller critic than phase II's: this one starts fresh against a trained U_e, and on a
    # CPU its 512-wide head with the gradient penalty is most of a step's time.
    critic_widths: tuple[int, ...] = (32, 64, 128)
    critic_head: int = 128
    output_blur: bool = True  # U_e's fixed anti-checkerboard filter (models/unet.py)
    # Critic-only steps before U_e moves: a fresh critic's first gradients are noise, and
    # measured, 250 steps of them at lr 2e-4 turned the init's faces into colour blobs.
    critic_warmup: int = 0
    # adv 1 (not phase II's 0.1): nothing pulls against realism once reconstruction is gone.
    # face 0: measured, MTCNN's R-Net and O-Net as a loss were satisfied within 100 steps by
    # checkerboard blobs (-log p from 0.68 to 0.05) that look like no face: an adversarial
    # example, which would also inflate the MTCNN figure of the evaluation. Kept as a knob.
    weights: dict[str, float] = field(default_factory=lambda: dict(
        adv=1.0, ano=1.0, con=1.0, div=1.0, dis=1.0, far=10.0, noise=10.0, face=0.0, grid=20.0, anchor=0.0))
    far_margin: float = 0.03  # inside the face region, a differs from x by at least this MSE
    noise_margin: float = 0.02  # two keys give two faces: MSE between them inside the region
    checkpoint_every: int = 250
    samples_every: int = 250
    seed: int = 0


def region_mask(size: int = 64) -> torch.Tensor:
    """The pipeline's blend weights (`track.face_region`) for a size × size ROI, as (1, 1, size, size)."""
    from tasks.datapath.track import face_region  # numpy only

    return torch.from_numpy(face_region(size, size).copy())[None, None]


def composite(x: torch.Tensor, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What the public sees: a over x inside the face region, x outside (`paste_faces(blend=True)`)."""
    return torch.lerp(x, a, mask)


def train_public_encoder(data: FaceData, matcher: AttributeMatcher, out: str | Path, config: PublicEncoderConfig,
                         init: str | Path, face_scorers: list[tuple[torch.nn.Module, int]] | None = None,
                         resume: str | Path | None = None, on_metrics: MetricsHook | None = None,
                         on_samples: SamplesHook | None = None, deadline: float | None = None,
                         half: bool = False) -> dict[str, Any]:
    """Fine-tune U_e of a trained pair for the public face alone (sealed default).

    Every term looks at the composite the public sees (U_e's face blended into x by the
    pipeline's face region), not at U_e's raw square: the critic (realism, eq. 6 with one
    fake), the matcher terms (eqs. 9-11), the colour term (eq. 12), plus ours: `far` (a
    differs from x inside the region), `noise` (another key gives another face: one
    sequence's identity comes from its key, not from x), `face` (frozen face classifiers,
    e.g. MTCNN's R-Net and O-Net, call the face square a face) and `grid` (no more 2×2
    checkerboard than x). No reconstruction term: the sealed originals restore x.
    The weights file holds U_e only (`decoder` None); it cannot serve `--seal none`.
    """
    from tasks.datapath.deidentify import save_face_pair  # torch-only; kept local so this module stays light

    device = data.device
    torch.manual_seed(config.seed)
    init_config = {"widths": list(config.widths), "keyed": True}
    model_config = {**init_config, "output_blur": config.output_blur}
    blob = torch.load(init, map_location=device, weights_only=True)
    if blob.get("model") != "uunet" or blob.get("config") != init_config:
        raise ValueError(f"{init}: a {blob.get('model')} pair with config {blob.get('config')} cannot "
                         f"start a public U_e with config {init_config}")
    encoder, _ = build_pair("uunet", model_config)
    encoder.load_state_dict(blob["encoder"])
    encoder = encoder.to(device).train()
    # `anchor`: L1 to the init's own public face, so a short run refines it instead of drifting.
    anchor = None
    if config.weights.get("anchor", 0) > 0:
        anchor, _ = build_pair("uunet", model_config)
        anchor.load_state_dict(blob["encoder"])
        anchor = anchor.to(device).eval().requires_grad_(False)
    critic = PatchCritic(config.critic_widths, config.critic_head).to(device).train()
    matcher = matcher.to(device).eval()
    scorers = [(net.to(device).eval(), size) for net, size in face_scorers or []]
    for module in [matcher, *(net for net, _ in scorers)]:
        for p in module.parameters():
            p.requires_grad_(False)
    s = L.parse_control_vector(config.control, matcher_label_names(matcher, data)).to(device)
    opt_g = torch.optim.Adam(encoder.parameters(), lr=config.lr_generator, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(critic.parameters(), lr=config.lr_critic, betas=(0.5, 0.9))
    generator = torch.Generator().manual_seed(config.seed)
    mask = region_mask().to(device)
    inside = mask.mean()
    step = 0
    out = Path(out)
    checkpoint = out.with_suffix(".ckpt")
    if resume and Path(resume).is_file():
        state = torch.load(resume, map_location=device, weights_only=False)
        for module, key in ((encoder, "encoder"), (critic, "critic"), (opt_g, "opt_g"), (opt_d, "opt_d")):
            module.load_state_dict(state[key])
        step = state["step"]
        generator.set_state(state["generator"])

    def save_state() -> None:
        _atomic_save({"encoder": encoder.state_dict(), "critic": critic.state_dict(), "opt_g": opt_g.state_dict(),
                      "opt_d": opt_d.state_dict(), "step": step, "generator": generator.get_state()}, checkpoint)

    S, Q, T = config.subjects, config.sequences, config.frames

    def critic_step(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fake = composite(x, encoder(x, noise), mask)
        loss = L.public_critic_loss(critic(x), critic(fake)) + config.gp_weight * L.gradient_penalty(critic, x, fake)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()
        return loss

    started = time.time()
    if step == 0:
        for _ in range(config.critic_warmup):
            x = data.faces(data.groups(S, Q, T, generator).flatten(), True, generator)
            critic_step(x, torch.rand(len(x), 1, 64, 64, generator=generator).to(device))
    while step < config.steps and (deadline is None or time.time() < deadline):
        rows = data.groups(S, Q, T, generator)
        x = data.faces(rows.flatten(), True, generator)
        noise = torch.rand(S * Q, 1, 64, 64, generator=generator).to(device).repeat_interleave(T, dim=0)
        other = torch.rand(S * Q * T, 1, 64, 64, generator=generator).to(device)
        d_loss = critic_step(x, noise)

        a = encoder(x, noise)
        c = composite(x, a, mask)
        c_other = composite(x, encoder(x, other), mask)
        grouped = c.view(S, Q, T, 3, 64, 64)
        terms = {
            "adv": -critic(c).mean(),
            "ano": L.anonymization_loss(matcher(x, c), s),
            "con": L.consistency_loss(matcher(grouped[:, :, 0].flatten(0, 1), grouped[:, :, 1].flatten(0, 1))),
            "div": L.diversity_loss(matcher(grouped[:, 0].flatten(0, 1), grouped[:, 1].flatten(0, 1))),
            "dis": L.colour_distribution_loss(x, c),
            "far": F.relu(config.far_margin - (mask * (a - x) ** 2).mean() / inside),
            "noise": F.relu(config.noise_margin - (mask * (c - c_other) ** 2).mean() / inside),
            "grid": L.checkerboard_excess(x, a),
        }
        if scorers and config.weights.get("face", 0) > 0:
            terms["face"] = L.face_likeness_loss(scorers, c)
        if anchor is not None:
            with torch.no_grad():
                before = anchor(x, noise)
            terms["anchor"] = (mask * (a - before).abs()).mean() / inside
        g_loss = L.weighted_total(terms, config.weights)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        step += 1

        if on_metrics:
            values = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
            values.update(loss_total=float(g_loss.detach()), loss_critic=float(d_loss.detach()),
                          steps_per_s=step / max(time.time() - started, 1e-6))
            on_metrics(step, values)
        if on_samples and (step % config.samples_every == 0 or step == config.steps):
            on_samples(step, sample_grid(x, a, c, c_other))
        if step % config.checkpoint_every == 0:
            save_state()
    save_state()
    save_face_pair(out, "uunet", encoder.eval(), None, model_config,
                   {"step": step, "config": _jsonable(asdict(config)), "public_only": True,
                    "label_names": matcher_label_names(matcher, data), "init": str(init)}, half=half)
    return {"step": step, "seconds": time.time() - started}


def matcher_label_names(matcher: AttributeMatcher, data: FaceData) -> list[str]:
    if matcher.num_labels != len(data.label_names):
        raise ValueError(f"matcher has {matcher.num_labels} labels, the data {len(data.label_names)}")
    return data.label_names


def _save_uunet_state(path, encoder, decoder, critic, opt_g, opt_d, step, generator) -> None:
    _atomic_save({"encoder": encoder.state_dict(), "decoder": decoder.state_dict(),
                  "critic": critic.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                  "step": step, "generator": generator.get_state()}, Path(path))


def _atomic_save(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=list))


# ----------------------------------------------------------------------------------------
# Standalone entry point (GPU machines: torch + numpy + this repository, nothing else)
# ----------------------------------------------------------------------------------------

def _jsonl_hook(path: Path, every: int) -> MetricsHook:
    def hook(step: int, values: dict[str, float]) -> None:
        if step % every == 0 or any(k.startswith("val_") for k in values):
            with path.open("a") as fh:
                fh.write(json.dumps({"step": step, **values}) + "\n")
    return hook


def _png_hook(folder: Path) -> SamplesHook:
    def hook(step: int, grid: np.ndarray) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            from PIL import Image

            Image.fromarray(grid).save(folder / f"samples_{step:07d}.png")
        except ImportError:  # bare GPU images may lack Pillow: keep the pixels anyway
            np.save(folder / f"samples_{step:07d}.npy", grid)
    return hook


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tasks.training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["matcher", "uunet"])
    p.add_argument("--data", required=True, help="faces tensor file (uunet-faces/1)")
    p.add_argument("--out", required=True, help="weights file to write")
    p.add_argument("--matcher", help="phase II: the phase I matcher file")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true", help="continue from OUT's .ckpt if present")
    p.add_argument("--minutes", type=float, help="phase II: stop (with a checkpoint) after this long")
    p.add_argument("--control", default=UUNetConfig.control, help="s, e.g. -1,0,0 (ID entry always -1)")
    p.add_argument("--batch-subjects", type=int, default=UUNetConfig.subjects)
    p.add_argument("--init", help="phase II: start U_e/U_d from this weights file (fine-tune)")
    p.add_argument("--half", action="store_true", help="phase II: write the weights in float16 (half the size)")
    p.add_argument("--paper-mode", action="store_true", help="U_d sees a only (no key), as in the paper")
    p.add_argument("--loss-weights", default="{}", help='JSON overrides, e.g. {"adv": 0.1, "keypix": 50}')
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out)
    hook = _jsonl_hook(out.with_suffix(".metrics.jsonl"), args.log_every)
    data = FaceData(args.data, device, TRAIN)
    resume = out.with_suffix(".ckpt") if args.resume else None
    if args.phase == "matcher":
        val = FaceData(args.data, device, VAL)
        result = train_matcher(data, val, out, MatcherConfig(steps=args.steps), resume, hook)
    else:
        matcher, _ = load_matcher(args.matcher, device)
        config = UUNetConfig(steps=args.steps, control=args.control, subjects=args.batch_subjects,
                             keyed=not args.paper_mode)
        config.weights.update(json.loads(args.loss_weights))
        deadline = time.time() + 60 * args.minutes if args.minutes else None
        result = train_uunet(data, matcher, out, config, resume, hook, _png_hook(out.parent / "samples"),
                             deadline, args.init, args.half)
    print(json.dumps(result))

