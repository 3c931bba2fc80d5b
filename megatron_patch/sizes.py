"""Byte counts as people read them, in the unit that keeps them above 1 (decimal units, as
disks and `df -H` count): "0.00 GiB free, 0.00 GiB needed" read as a bug on small disks."""


def human_bytes(count: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"
