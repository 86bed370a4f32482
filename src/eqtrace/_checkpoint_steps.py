"""Which step folders of a checkpoint directory hold complete checkpoints.

A step counts (for `latest_checkpoint`, restoring and pruning) only when its folder holds
Orbax's commit marker, the step's metadata and, if arrays were saved, the index files of its
arrays. An empty folder (a partial copy), one whose arrays are gone or whose metadata is
truncated is not a checkpoint: it is never restored, never counted among the `max_to_keep`
kept, and never deleted by pruning (it may be someone's copy in progress).
"""

import dataclasses
import json
import os
from typing import Any


#: The files every complete step folder holds, relative to it.
_ALWAYS = ("commit_success.txt", "_CHECKPOINT_METADATA", "metadata/metadata")
#: ...and, when the checkpoint has array leaves, these (the index of Orbax's array store).
_WITH_ARRAYS = ("arrays/commit_success.txt", "arrays/_METADATA", "arrays/manifest.ocdbt")


class CheckpointDamagedError(ValueError):
    """A checkpoint's step folder is incomplete or its files are damaged."""


def step_folders(directory: str) -> dict[int, str]:
    """The folders of `directory` named as steps (complete or not): step -> path."""
    folders = {}
    for name in os.listdir(directory):
        # Orbax names a step by its digits; its temporary folders have a suffix.
        if name.isdigit() and (name == "0" or not name.startswith("0")):
            folders[int(name)] = os.path.join(directory, name)
    return folders


def read_metadata(folder: str) -> dict:
    """The step's eqtrace metadata, or `CheckpointDamagedError` naming what is wrong."""
    path = os.path.join(folder, "metadata", "metadata")
    try:
        with open(path, encoding="utf-8") as file:
            metadata = json.load(file)
    except FileNotFoundError:
        raise CheckpointDamagedError("`metadata/metadata` is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointDamagedError(
            f"`metadata/metadata` is not readable JSON (truncated?): {error}"
        ) from None
    if not isinstance(metadata, dict) or "leaves" not in metadata:
        raise CheckpointDamagedError("`metadata/metadata` is not an eqtrace checkpoint's")
    return metadata


def has_arrays(metadata: dict) -> bool:
    return any("dtype" in leaf or "key" in leaf for leaf in metadata["leaves"])


def damage(folder: str) -> str | None:
    """What makes `folder` not a complete checkpoint (naming the file), or `None`."""
    if not os.path.isdir(folder):
        return "it is not a folder"
    for name in _ALWAYS:
        if not os.path.isfile(os.path.join(folder, name)):
            return f"`{name}` is missing"
    try:
        metadata = read_metadata(folder)
    except CheckpointDamagedError as error:
        return str(error)
    if has_arrays(metadata):
        for name in _WITH_ARRAYS:
            if not os.path.isfile(os.path.join(folder, name)):
                return f"`{name}` is missing"
        try:
            with open(os.path.join(folder, "arrays", "_METADATA"), encoding="utf-8") as file:
                json.load(file)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            return f"`arrays/_METADATA` is not readable JSON (truncated?): {error}"
    return None


def complete_steps(directory: str) -> list[int]:
    """The steps of the complete checkpoints in `directory`, in increasing order."""
    return sorted(step for step, folder in step_folders(directory).items() if not damage(folder))


@dataclasses.dataclass(frozen=True)
class CompleteSteps:
    """Orbax's standard step names (`<step>`), finding only complete steps: Orbax's
    `CheckpointManager` then counts, keeps and prunes complete checkpoints only.

    (An implementation of Orbax's `NameFormat` protocol, whose `find_*` are to ignore
    uncommitted checkpoints.)"""

    standard: Any

    def build_name(self, step: int) -> str:
        return self.standard.build_name(step)

    def find_all(self, base_path: Any) -> Any:
        return (m for m in self.standard.find_all(base_path) if damage(str(m.path)) is None)

    def find_step(self, base_path: Any, step: int) -> Any:
        metadata = self.standard.find_step(base_path, step)
        problem = damage(str(metadata.path))
        if problem:
            raise ValueError(f"step {step} in {base_path} is not complete: {problem}")
        return metadata
