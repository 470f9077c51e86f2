"""Problems the user can fix (UserError: one line, exit 2) and a training run that diverged
(RunDiverged: one line naming the step, exit 3)."""


class UserError(Exception):
    """Bad input: a missing path, a malformed file, an unknown name, an empty data set."""


class RunDiverged(Exception):
    """Training produced a non-finite loss, gradient or weight, or the student's entropy collapsed
    to a uniform distribution. Nothing from the bad step was saved."""

    def __init__(self, step: int, reason: str, hint: str = "", *, from_weights: bool = True):
        # from_weights: the weights the step started from are at fault (a NaN loss or gradient, a
        # collapsed entropy), so the checkpoint of the step before is no good either.
        self.step, self.reason, self.hint, self.from_weights = step, reason, hint, from_weights
        super().__init__(f"training diverged at step {step}: {reason}{'; ' + hint if hint else ''}")
