"""Cross-validated evaluation: metrics, paired tests, baselines, report and figures."""
