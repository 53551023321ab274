"""User-facing errors: each message names the problem and what to do about it."""


class AlvtsError(Exception):
    """A problem with the user's input (model, data, artifact or option), reported as one line."""


class ArtifactError(AlvtsError):
    """A selector or calibration file that cannot be read or does not fit the model."""


class ModelMismatchError(ArtifactError):
    """An artifact was calibrated for a different model than the one it is being attached to."""


class SampleError(AlvtsError):
    """A calibration sample the model cannot run; `index` is its position among the samples given."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"calibration sample {index + 1}: {reason}; fix or leave out that row")
        self.index = index
        self.reason = reason
