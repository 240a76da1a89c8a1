"""Training the classifier: losses, loops, cases from a cohort and training from a cohort table."""
