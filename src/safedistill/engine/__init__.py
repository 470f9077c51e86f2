"""The machinery every method shares and no method owns: rollout backends, scoring (logits at
response positions, prefix KV caches), precision, processes, checkpoints, the SFT step and the fit
loop. Nothing here knows about teachers, presets or methods (docs/design.md, "The map")."""
