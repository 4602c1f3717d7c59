"""Pushing a finished run's adapter to the Hugging Face Hub, with its model card."""
