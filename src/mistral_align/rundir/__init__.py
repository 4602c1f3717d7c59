"""The run directory on disk: where it is, what a launch writes into it, what a finished run holds.

Training (train/) writes it; push, merge, export and chat (hub/, export/, inference/) read it.
"""
