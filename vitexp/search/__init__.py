"""Searching: a sweep's MLflow parent run, Optuna studies that prune and resume, their trials
and report.
"""
