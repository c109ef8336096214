"""Proof that a folded or exported model computes what the train-time model computes.

`inputs` makes the verification batches, `reference` runs the train-time
model on them (fp32 and float64) once per run, and `compare` measures any
candidate against a reference with the tolerance rules: the fp32 noise floor
for full-precision artifacts, plus the storage floor of reduced-precision
weights, and the measured cost of a reduced-precision artifact's own arithmetic.
"""
