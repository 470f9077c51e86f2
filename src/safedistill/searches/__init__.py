"""Searches that fix a teacher's inputs before training: the context search (context=auto, by
teacher flip rate; context.py) and the steering search (the refusal direction, its layer and
scale, and SafeSteer's safety tokens S; steering.py). Each writes its findings to the run
directory and reads them back on resume."""
