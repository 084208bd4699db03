"""The project's stages, by concern. Which package may import which is written once in the
README ("Layout") and enforced by tests/test_layering.py.

- `datapath/`: the paper's Fig. 2 as software, one stage per module (decode, detect, track,
  seal, deidentify, stego, encode, keys, release_check), the per-video loops of the public and the
  private module (`anonymize`, `reconstruct`) and the Ray actor that runs them (`ray_actor`).
- `judges.py`: networks we did not train (SFace, YuNet, dlib, a gender classifier), which
  both the release check and the evaluation ask for a second opinion.
- `training/`: dataset adapters, the faces corpus and the loops of both training phases.
- `evaluation/`: the paper's Sec. IV measures, the baselines, the codec sweep, and the
  held-out and labelled faces they are measured on.
"""
