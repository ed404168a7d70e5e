"""What the reference store raises: a store that cannot be built or opened, and a store built for something else."""

from __future__ import annotations


class ReferenceStoreError(ValueError):
    """A store that cannot be built or opened as asked."""


class ReferenceStoreMismatch(ReferenceStoreError):
    """The store was built for another model, tokenizer, replay set or setting."""

    def __init__(self, path: str, differences: dict[str, tuple], detail: str | None = None):
        self.differences = differences
        lines = [f"  {name}: store has {got!r}, expected {want!r}" for name, (got, want) in differences.items()]
        fix = detail or "Rebuild it (rebuild=True, or `gere-hf cache ... --rebuild`) or point store_dir at a new directory."
        super().__init__(
            f"The reference store at {path} was built for something else; these fingerprint fields differ:\n"
            + "\n".join(lines) + "\n" + fix
        )


# The names of gere_hf 0.1, kept: the class was ReferenceStates while everything else said "store".
ReferenceStatesError = ReferenceStoreError
ReferenceStatesMismatch = ReferenceStoreMismatch
