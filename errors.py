"""The errors a user can cause: every command prints one as a single line and exits with code 2."""


class UserError(Exception):
    """A problem with what the user asked for; scripts print it in one line and exit 2."""


class ConfigError(UserError):
    """A config key or combination of keys that cannot work (names the key and what is allowed)."""


def first_line(e: BaseException) -> str:
    """An exception's message as one short line; its type when it has none (EOFError())."""
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__
