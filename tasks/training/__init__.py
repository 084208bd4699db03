"""Training: dataset adapters (`adapters`), the faces corpus (`corpus`) and both phases'
loops (`loops`). `python -m tasks.training ...` runs the loops with torch and numpy alone,
for GPU machines: keep this package's imports light.
"""
