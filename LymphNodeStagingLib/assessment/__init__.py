"""Assessment of one case: assess_case, the child process for GUIs, the overview PNG and the demo."""
