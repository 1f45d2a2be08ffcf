"""A finished job's checkpoints in Ray Train's storage (an absolute folder or s3://bucket/prefix,
the settings' ``storage_path``), deleted by the controller's retention policy. pyarrow's
filesystems, as Ray Train writes them: S3 through the standard AWS_* settings."""

from __future__ import annotations

from pathlib import Path


def delete_checkpoints(storage_path: str, job_id: str) -> bool:
    """Delete ``<storage_path>/<job id>``; False if there was nothing to delete."""
    import pyarrow.fs

    uri = storage_path if "://" in storage_path else Path(storage_path).as_uri()
    filesystem, root = pyarrow.fs.FileSystem.from_uri(uri)
    target = f"{root.rstrip('/')}/{job_id}"
    if filesystem.get_file_info(target).type == pyarrow.fs.FileType.NotFound:
        return False
    filesystem.delete_dir(target)
    return True
