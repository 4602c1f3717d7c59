"""Talking to a trained model: loading a run or merged folder, and a chat session over it."""
