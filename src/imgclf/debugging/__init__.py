"""Debugging (smdebug hook and rules) and profiling of training jobs."""
