"""Pallas GPU kernels of tnllm: Lightning Attention forward and backward (`lightning`)."""
