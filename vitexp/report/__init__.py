"""What a run and a sweep show: every picture of a run (`run`), runs side by side (`compare`)."""
