"""Self-configuration: measure a dataset (fingerprint) and derive an experiment config from it (planner)."""

from medseg.planning.fingerprint import Fingerprint, fingerprint_dataset

__all__ = ["Fingerprint", "fingerprint_dataset"]
