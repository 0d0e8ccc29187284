"""Evaluation: feature extraction, the fused STAL distance, CMC/mAP ranking and the report."""
