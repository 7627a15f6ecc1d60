"""Hydra configs, shipped inside the package as evomerge.conf."""
