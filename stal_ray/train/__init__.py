"""Distributed STAL training on Ray Train: the worker loop, its DeepSpeed engine, the TorchTrainer."""
