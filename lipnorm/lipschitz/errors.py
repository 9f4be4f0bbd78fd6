"""The engine's error type for non-finite values (a leaf: imports nothing of lipnorm)."""


class NonFiniteError(ValueError):
  """A measurement met a non-finite value (NaN or inf): in the inputs, the model
  outputs, a Jacobian norm or a loss. Usually a diverged network; callers that measure
  such networks catch this type (it is a ValueError, so older callers still work)."""
