"""gymtape trainer bridge: tapes into on-policy and asynchronous off-policy update loops.

Sequences (``build_sequences``), packing (``plan_bins``/``pack``), an epoch dataset
(``TapeDataset``), a live-tape follower (``TapeFollower``), SFT/DPO exports, policy-loss helpers
with train-inference mismatch corrections (``policy_loss``), the mismatch metrics (defined once in
``grouped_mismatch_metrics``; replay reports them too) and a reference GRPO loop (``train``); see
docs/trainer-bridge.md. Tapes are read through :class:`recorder.Tape`.
"""

from ._errors import BridgeValueError, UnsupportedModelError
from ._logprobs import packed_token_logprobs
from ._mismatch import DEFAULT_IS_BOUNDS, MISMATCH_METRIC_NAMES, grouped_mismatch_metrics, token_mismatch_metrics
from ._losses import (
    CORRECTIONS, ISCorrection, correction_weights, geometric_mask, logprobs_from_logits, masked_is_weights,
    mismatch_metrics, policy_loss, sequence_index, truncated_is_weights,
)
from ._train import TrainConfig, TrainError, TrainReport, plot_curve, plot_validation_curves, train
from ._packing import PackedBatch, pack, plan_bins
from ._advantages import group_advantages
from ._dataset import ResumeStateError, TapeDataset, TapeLoader
from ._export import DPO_SCHEMA, SFT_SCHEMA, ExportError, ExportReport, export_dpo, export_sft
from ._filters import TapeFilters
from ._follower import FollowerBatch, FollowerStats, FollowerTimeout, TapeFollower
from ._microbatch import MicroBatch, micro_batches
from ._sequences import SEQUENCE_SCHEMA, build_sequences
from ._retemplated import RetemplatedStats, retemplated_sequences

__all__: list[str] = [
    "SEQUENCE_SCHEMA", "FollowerBatch", "FollowerStats", "FollowerTimeout", "MicroBatch", "ResumeStateError",
    "TapeDataset", "TapeFilters", "TapeFollower", "TapeLoader", "group_advantages", "micro_batches",
    "DPO_SCHEMA", "SFT_SCHEMA", "ExportError", "ExportReport", "export_dpo", "export_sft",
    "PackedBatch", "build_sequences", "pack", "packed_token_logprobs", "plan_bins",
    "CORRECTIONS", "ISCorrection", "correction_weights", "geometric_mask", "logprobs_from_logits", "masked_is_weights",
    "mismatch_metrics", "policy_loss", "sequence_index", "truncated_is_weights",
    "BridgeValueError", "DEFAULT_IS_BOUNDS", "MISMATCH_METRIC_NAMES", "UnsupportedModelError",
    "grouped_mismatch_metrics", "token_mismatch_metrics",
    "TrainConfig", "TrainError", "TrainReport", "plot_curve", "plot_validation_curves", "train",
    "RetemplatedStats", "retemplated_sequences"]
