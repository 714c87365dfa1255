"""The ops a kernel may replace, one file each, in plain PyTorch written to be read.

Each file `refimpl/ops/<op>.py` opens with the op's equation, its paper, a glossary of symbols and
its shapes; then its argument check, the step loop (the ground truth) and the faster PyTorch forms
tested equal to it. The same name is used in `kernels/<op>.py` (+ `.cu`), `tests/ops/test_<op>.py`
and the benchmarks.

    op                       file                        what it computes
    rms_norm                 rms_norm.py                 x / rms(x) * weight
    attention                attention.py                causal softmax attention, grouped KV heads, sliding window
    moe_dispatch/_combine    moe.py                      tokens grouped by expert, and summed back
    gated_delta_rule         gated_delta_rule.py         Gated DeltaNet's memory update (chunked)
    selective_scan           selective_scan.py           Mamba's S6 scan
    mamba3_scan              mamba3_scan.py              Mamba-3: trapezoidal step, rotating state, MIMO
    mlstm                    mlstm.py                    xLSTM's matrix memory, stabilised
    fast_weight_memory       fast_weight_memory.py       a decaying outer-product memory
    ties_merge               ties_merge.py               TIES merging of task vectors
    pack_bits/unpack_bits/   quant_packing.py            INT6 / INT4 bit packing
      dequantize_packed
    modulated_linear         modulated_linear.py         x W_eff(theta)^T without building W_eff
    neighbourhood_attention  neighbourhood_attention.py  attention over a 3D grid's neighbours
    vq_nearest               vq_nearest.py               the nearest codebook entry
    adam_clip_step           adam_clip_step.py           clip-by-norm and Adam in one step

Models call ops through this package, `ops.rms_norm(...)`, never through a from-import: that
one habit is what lets `with kernels.use("numba"): model(x)` rebind the names here for the length
of the block, while refimpl itself never imports a kernel. (A test holds every layer to it.)

Every op checks its arguments first (its `check_*` function, built on `refimpl.ops.contract`,
which the kernels call too) and raises ValueError naming the shape it expected.
"""

from refimpl.ops.adam_clip_step import CLIP_EPS, adam_clip_step, check_adam_clip_args
from refimpl.ops.attention import attention, attention_mask, check_attention_args
from refimpl.ops.fast_weight_memory import (check_fast_weight_args, fast_weight_memory, fast_weight_memory_parallel,
                                            fast_weight_memory_recurrent)
from refimpl.ops.gated_delta_rule import (check_gated_delta_rule_args, gated_delta_rule, gated_delta_rule_chunked,
                                          gated_delta_rule_recurrent)
from refimpl.ops.mamba3_scan import (Mamba3ScanState, check_mamba3_args, decay_matrix, mamba3_scan,
                                     mamba3_scan_parallel, mamba3_scan_recurrent, rotate_pairs)
from refimpl.ops.mlstm import check_mlstm_args, mlstm, mlstm_parallel, mlstm_recurrent
from refimpl.ops.modulated_linear import check_modulated_linear_args, modulated_linear, modulated_linear_materialised
from refimpl.ops.moe import check_moe_combine_args, check_moe_dispatch_args, moe_combine, moe_dispatch
from refimpl.ops.neighbourhood_attention import (check_neighbourhood_attention_args, neighbour_count,
                                                 neighbourhood_attention, neighbourhood_attention_dense,
                                                 neighbourhood_mask)
from refimpl.ops.quant_packing import (PACKED_BITS, check_dequantize_packed_args, check_pack_args, check_unpack_args,
                                       dequantize_packed, pack_bits, packed_length, unpack_bits)
from refimpl.ops.rms_norm import check_rms_norm_args, rms_norm
from refimpl.ops.selective_scan import (check_selective_scan_args, selective_scan, selective_scan_chunked,
                                        selective_scan_recurrent)
from refimpl.ops.ties_merge import (average, check_ties_merge_args, elect_sign, task_arithmetic, ties_merge,
                                    ties_merge_as_written, trim)
from refimpl.ops.vq_nearest import SEARCH_CHUNK_ELEMENTS, check_vq_nearest_args, vq_nearest

#: the op each file is named after -> the functions in it that a kernel replaces (the swappable names)
SWAPPABLE = {
    "rms_norm": ("rms_norm",), "attention": ("attention",), "moe": ("moe_dispatch", "moe_combine"),
    "gated_delta_rule": ("gated_delta_rule",), "selective_scan": ("selective_scan",),
    "mamba3_scan": ("mamba3_scan",), "mlstm": ("mlstm",), "fast_weight_memory": ("fast_weight_memory",),
    "ties_merge": ("ties_merge",), "quant_packing": ("pack_bits", "unpack_bits", "dequantize_packed"),
    "modulated_linear": ("modulated_linear",), "neighbourhood_attention": ("neighbourhood_attention",),
    "vq_nearest": ("vq_nearest",), "adam_clip_step": ("adam_clip_step",),
}

__all__ = ["adam_clip_step", "attention", "attention_mask", "average", "check_adam_clip_args",
           "check_attention_args", "check_dequantize_packed_args", "check_fast_weight_args", "check_gated_delta_rule_args", "check_mamba3_args",
           "check_mlstm_args", "check_modulated_linear_args", "check_moe_combine_args", "check_moe_dispatch_args",
           "check_neighbourhood_attention_args", "check_pack_args", "check_rms_norm_args",
           "check_selective_scan_args", "check_ties_merge_args", "check_unpack_args", "check_vq_nearest_args", "CLIP_EPS",
           "dequantize_packed", "elect_sign", "fast_weight_memory", "fast_weight_memory_parallel",
           "fast_weight_memory_recurrent", "gated_delta_rule", "gated_delta_rule_chunked",
           "gated_delta_rule_recurrent", "decay_matrix", "mamba3_scan", "mamba3_scan_parallel", "mamba3_scan_recurrent",
           "Mamba3ScanState", "mlstm", "mlstm_parallel", "mlstm_recurrent", "modulated_linear",
           "modulated_linear_materialised", "moe_combine", "moe_dispatch", "neighbour_count",
           "neighbourhood_attention", "neighbourhood_attention_dense", "neighbourhood_mask", "pack_bits",
           "PACKED_BITS", "packed_length", "rms_norm", "rotate_pairs", "SEARCH_CHUNK_ELEMENTS", "selective_scan",
           "selective_scan_chunked", "selective_scan_recurrent", "task_arithmetic", "ties_merge",
           "ties_merge_as_written", "trim", "unpack_bits", "vq_nearest", "SWAPPABLE"]
