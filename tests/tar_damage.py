"""Test helper: damaging a shard the way bit rot does (shared by the reader and inspector tests)."""
import tarfile


def overwrite_member(tar_path, member_name, transform):
    """Changes a member's bytes in place (same length): tar size and energon's index stay valid,
    only the content is wrong."""
    with tarfile.open(tar_path) as tar:
        member = tar.getmember(member_name)
        data = tar.extractfile(member).read()
    new = transform(data)
    assert len(new) == len(data)
    with open(tar_path, "r+b") as handle:
        handle.seek(member.offset_data)
        handle.write(new)
