"""What a step minimises, as name -> entry tables: DIVERGENCES (divergence.py), TOKEN_MASKS and
VOCAB_MASKS (masks.py), OBJECTIVES (objectives.py). The config's choices come from these tables."""
