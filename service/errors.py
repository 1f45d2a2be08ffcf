"""What the controller refuses with, shared by its parts (jobs, sweeps) and the API, which
answers each with its HTTP status."""


class JobNotFound(Exception):
    """No such job (or sweep) visible to the caller: 404."""


class JobConflict(Exception):
    """The job (or sweep) is not in a state that allows the requested change: 409."""


class IdempotencyConflict(Exception):
    """An idempotency key reused for a different spec: 409."""
