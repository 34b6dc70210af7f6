"""Compression of routed experts: calibration, router-aware pruning, merging and weight-only quantisation.

    from moekit.compress import calibrate, calibration_windows, prune
    calib = calibrate(model, calibration_windows(tokenizer, "all"))
    result = prune(model, calib, 0.5, criterion="reap", per_layer=True)
    print(result.summary())          # "pruned 16 of 32 experts in 4 of 4 layers ..."

Every method says what it touched; `moekit compress` runs them from the command line and saves a run
that `moekit eval | generate | analyze` read like any other. Wrapped transformers models (moekit.hf)
are compressed the same way and saved by `moekit.compress.hf.save_hf`. A pruned run trains on
(`moekit train --resume`: a new schedule from the compressed weights, fresh optimiser); quantised and
merged runs are inference-only and refuse to train in one line.
"""

from moekit.compress.calibrate import Calibration, LayerStats, calibrate, calibration_windows
from moekit.compress.merge import METHODS, MergeResult, merge
from moekit.compress.prune import CRITERIA, PruneResult, prune
from moekit.compress.quantize import QuantizedExpertBank, QuantizeResult, quantize
from moekit.compress.record import new_record, restore

__all__ = ["CRITERIA", "METHODS", "Calibration", "LayerStats", "MergeResult", "PruneResult", "QuantizeResult",
           "QuantizedExpertBank", "calibrate", "calibration_windows", "merge", "new_record", "prune", "quantize",
           "restore"]
