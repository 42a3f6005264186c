"""`tracking`: the Aim run of a stage (on/off, the repository, and what a sweep's trial sets: its run
name, tags and the file recording its run hash)."""

from framework.config.types import Flag, Schema, Text, Texts


class TrackingConfig(Schema):
    """Aim tracking: `repo` is a folder or aim://host:port."""

    enabled: Flag
    repo: Text
    run_name: Text | None
    tags: Texts
    run_hash_file: Text | None
