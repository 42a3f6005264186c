"""Experiment tracking in Aim (rank zero only) and the figures the dashboards show."""

from framework.track.aim_tracker import NullTracker, Tracker, open_tracker

__all__ = ["NullTracker", "Tracker", "open_tracker"]
