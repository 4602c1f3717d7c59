"""mistral-align: SFT then DPO for Mistral models, with tokens byte-identical to mistral-common."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes tries to fetch an optional Hub kernel for its CPU *inference* layout, which
# mistral_align switches off (model/bnb_cpu.py); its warning at every import is only noise.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
