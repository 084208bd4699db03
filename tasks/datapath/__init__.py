"""The data path: the public and the private module's stages, one per module.

decode → detect → track → seal → deidentify → stego → encode is the public module, ending in
the release check; the private module unwraps the data key (keys), then pastes the sealed
originals (seal) or reads the payload (stego) and restores with U_d (deidentify).
`anonymize.py` and `reconstruct.py` chain the stages for one video, `video_loop.py` holds
what both loops share, and `ray_actor.py` is the only module here that imports Ray.
"""
