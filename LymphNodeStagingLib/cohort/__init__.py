"""The cohort table and patient-level splits."""
