"""The audit's default image thresholds, in one place (AuditConfig and the CLI's ``--help`` read them).

Set by the calibration in ``benchmarks/calibrate_audit.py`` (method: docs/audit.md, "Calibration"; measured
rates: docs/results/audit.md): planted copies against fresh images of four kinds. Distances are RMS per
pixel value in [0, 1], except ``NORMALIZED_THRESHOLD`` (RMS between per-image standardized pixels, in
units of each image's std).
"""

L2_THRESHOLD = 0.05
TILED_THRESHOLD = 0.08
PARTIAL_THRESHOLD = 0.03
PARTIAL_FRACTION = 0.5
SHIFT_THRESHOLD = 0.045
CROP_THRESHOLD = 0.025
NORMALIZED_THRESHOLD = 0.15
