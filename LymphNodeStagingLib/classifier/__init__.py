"""The station classifier: patches, networks, checkpoints and case prediction."""
