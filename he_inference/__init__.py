"""CKKS encrypted inference: compile the Approx-CNN to an HE-CNN (to come)."""
