"""Error types shared by the server, the client, the handler and the gateway."""


class InputError(ValueError):
    """Something the user sent is wrong. `field` names it so every front end can say which."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ConfigError(RuntimeError):
    """A knob or a file the operator provides is missing or wrong."""


class WeightsMissingError(ConfigError):
    """No weights could be found or fetched, and untrained weights were not allowed."""
