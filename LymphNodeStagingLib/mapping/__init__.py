"""Station mapping: atlas sets, registration, label fusion, weight maps and inference centres."""
