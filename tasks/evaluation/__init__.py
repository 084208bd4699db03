"""Evaluation: the paper's Sec. IV measures (`evaluate`) on held-out footage (`held_out`) and on
a labelled faces split run through both modules (`labelled_faces`), against the classic
`baselines`, plus reversal under re-encoding (`codec_sweep`); `metrics` is the statistics.
"""
