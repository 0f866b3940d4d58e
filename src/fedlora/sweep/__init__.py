"""Sweeps: many runs of a grid over run configurations, resumable, on one loaded model; tuning on
validation loss; comparisons with confidence intervals (`fedlora sweep`, `fedlora compare`)."""

from fedlora.sweep.compare import write_comparison
from fedlora.sweep.plan import PlannedRun, SweepPlan, load_sweep
from fedlora.sweep.progress import RichSweepObserver, SweepObserver
from fedlora.sweep.runner import SweepResult, run_sweep

__all__ = ["PlannedRun", "RichSweepObserver", "SweepObserver", "SweepPlan", "SweepResult", "load_sweep",
           "run_sweep", "write_comparison"]
