"""The errors a user can cause: every command prints one as a single line and exits with code 2."""


class UserError(Exception):
    """A problem with what the user asked for; scripts print it in one line and exit 2."""


class ConfigError(UserError):
    """A config key or combination of keys that cannot work (names the key and what is allowed)."""


def first_line(e: BaseException) -> str:
    """An exception's message as one short line; its type when it has none (EOFError())."""
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def disk_full(e: BaseException) -> bool:
    """Whether an error says the disk is full: an OSError with errno ENOSPC (or EDQUOT, a full
    quota), or one raised by h5py, whose message carries the errno as text."""
    import errno
    if not isinstance(e, OSError):
        return False
    return e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e) or "errno = 28" in str(e)
