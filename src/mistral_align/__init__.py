"""mistral-align: SFT then DPO for Mistral models, with tokens byte-identical to mistral-common."""

__version__ = "0.1.0"
