"""The tools a user runs on recorded runs: evaluate, predict, explain, compare, registry,
speedrun and bench, with their shared argument parser.
"""
