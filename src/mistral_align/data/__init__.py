"""Training data: reading sources (read), judging and encoding each row (encode), loading a stage's
mixture with its report (load), packing figures (packing) and the demo's generated skills (synthetic)."""
