"""Segmenting many cases in one process: finding the cases, running one or several models over them
with resume and per-case failure isolation, and the summary tables (also merged across shards)."""

from .cases import BatchCase, find_cases, is_batch_input, parse_shard, select_shard
from .runner import BatchSegmenter, CaseOutcome, check_resampled_size, write_labels
from .summary import merge_summaries, summary_paths, write_summary

__all__ = [
    "BatchCase",
    "BatchSegmenter",
    "CaseOutcome",
    "check_resampled_size",
    "find_cases",
    "is_batch_input",
    "merge_summaries",
    "parse_shard",
    "select_shard",
    "summary_paths",
    "write_labels",
    "write_summary",
]
