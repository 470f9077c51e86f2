"""The judge outcome labels, in a leaf module: judges.py gives them (Verdict.outcome) and
attack_success.py reads them as features, and judges loads attack_success lazily, so neither
may import the other at module level."""

OUTCOMES = ("refusal", "offtopic", "partial", "compliance")
