"""Cost measured, not asserted: FLOPs (torch.utils.flop_counter), peak tensor memory of a call, power-law fits."""

from .fit import PowerLawFit, fit_power_law
from .flops import count_flops
from .memory import PeakMemory, peak_memory
from .timing import cuda_read_backs, interleaved_times, median_time

__all__ = ["PeakMemory", "PowerLawFit", "count_flops", "cuda_read_backs", "fit_power_law", "interleaved_times",
           "median_time", "peak_memory"]
