"""The one error type users see: a one-line message naming the file and what is wrong."""


class DselError(Exception):
    """Bad input or configuration. The CLI prints it as one line and exits with status 2."""


def file_error(path, problem: str) -> DselError:
    """An error about a file, always phrased `<path>: <problem>`."""
    return DselError(f"{path}: {problem}")
