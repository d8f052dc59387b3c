"""Errors shared by client and servers; the servers turn them into gRPC status codes."""


class InvalidArgument(ValueError):
    """A request field is wrong; `parameter` names it so UIs can point at the widget."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


class ModelMismatch(InvalidArgument):
    """An embedding bundle made by another model than the generator's."""

    def __init__(self, message: str):
        super().__init__("bundle", message)
