"""Merging: how the experts' task vectors are combined into one model, tensor by tensor."""
