"""The model registry: bundled models, user models, and offline import.

Each model is a folder holding ``card.json`` and its weights file. Bundled models
live in ``Resources/Models/<id>/``; user models (imported, finetuned) in
``$MEDSEGSUITE_HOME/models/<id>/`` (default ``~/.medsegsuite/models``). Ids are unique
across both; a bundled model is never replaced.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import ModelError, WeightsError
from ..io.atomic import atomic_directory
from ..resources import resources_dir
from .card import CARD_FILE, ModelCard, card_from_dict, load_card, save_card
from .weights import (
    TORCH_SUFFIXES,
    load_state_dict_strict,
    read_embedded_card,
    read_torch_checkpoint,
    read_weights,
    save_weights,
    sha256_file,
)

__all__ = ["ModelEntry", "ModelRegistry", "default_bundled_dir", "default_user_dir"]

log = logging.getLogger(__name__)
PathLike = Union[str, Path]
WEIGHTS_FILE = "model.safetensors"


def default_user_dir() -> Path:
    """``$MEDSEGSUITE_HOME/models``, or ``~/.medsegsuite/models``."""
    home = os.environ.get("MEDSEGSUITE_HOME")
    return (Path(home) if home else Path.home() / ".medsegsuite") / "models"


def default_bundled_dir() -> Path:
    """``Resources/Models`` of the installed extension or package."""
    return resources_dir() / "Models"


@dataclass(frozen=True)
class ModelEntry:
    """A model found on disk: its validated card, its folder and where it came from."""

    card: ModelCard
    directory: Path
    source: str  # "bundled", "user" or "path"

    @property
    def weights_path(self) -> Path:
        return self.directory / self.card.weights_file

    def summary(self) -> dict[str, Any]:
        """The fields ``medsegsuite models`` lists."""
        card = self.card
        return {
            "id": card.id,
            "version": card.version,
            "network": card.network,
            "dims": card.dims,
            "labels": [label.name for label in card.labels],
            "licence": card.licence,
            "source": self.source,
            "parent": card.parent,
        }


#: Limits of a model archive: what it may unpack to in all, how many members it may hold, and how
#: much a member larger than ZIP_RATIO_FROM may inflate (weights barely compress; a bomb does).
ZIP_MAX_BYTES = 8 << 30
ZIP_MAX_MEMBERS = 1000
ZIP_MAX_RATIO = 100
ZIP_RATIO_FROM = 1 << 20


def _safe_extract(archive: Path, destination: Path) -> None:
    """Extract a zip, refusing members that would land outside ``destination`` or are links, and
    archives that would unpack to more than ``ZIP_MAX_BYTES``, hold more than ``ZIP_MAX_MEMBERS``
    members or inflate a member more than ``ZIP_MAX_RATIO`` times (checked before anything is written;
    the extraction never writes more than the sizes checked)."""
    root = destination.resolve()
    with zipfile.ZipFile(archive) as handle:
        members = handle.infolist()
        if len(members) > ZIP_MAX_MEMBERS:
            raise ModelError(f"refused {archive.name}: {len(members)} members; a model archive holds a few files")
        total = 0
        for member in members:
            name = member.filename
            target = (root / name).resolve()
            if name.startswith(("/", "\\")) or ".." in Path(name).parts or not str(target).startswith(str(root)):
                raise ModelError(f"refused {archive.name}: member {name!r} would be written outside its folder")
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise ModelError(f"refused {archive.name}: member {name!r} is a symbolic link")
            ratio = member.file_size / max(member.compress_size, 1)
            if member.file_size > ZIP_RATIO_FROM and ratio > ZIP_MAX_RATIO:
                raise ModelError(
                    f"refused {archive.name}: member {name!r} would inflate {ratio:.0f} times (to "
                    f"{member.file_size / 2**20:.0f} MB); model weights do not compress like that"
                )
            total += member.file_size
        if total > ZIP_MAX_BYTES:
            raise ModelError(
                f"refused {archive.name}: it would unpack to {total / 2**30:.1f} GB, more than the "
                f"{ZIP_MAX_BYTES / 2**30:.0f} GB a model archive may hold; import the model folder instead"
            )
        free = shutil.disk_usage(root).free
        if total > free:
            raise ModelError(
                f"cannot unpack {archive.name}: it needs {total / 2**20:.0f} MB and the temporary folder {root.parent} "
                f"has {free / 2**20:.0f} MB free; free some space or unpack it yourself and import the folder"
            )
        handle.extractall(root)


def weights_inside(folder: Path, name: str) -> Path:
    """The weights file ``name`` of the model folder ``folder``; ModelError when the name leads outside
    the folder (an absolute path, ``..``, a link to elsewhere) or is not a regular file."""
    path = folder / name
    inside = folder.resolve()
    if Path(name).is_absolute() or path.resolve().parent != inside:
        raise ModelError(
            f"refused {folder}: its card names weights {name!r} outside the model folder; a card must name a file "
            "beside it"
        )
    if not path.exists():
        raise ModelError(f"{folder}: the weights file {name!r} its card names does not exist")
    if not path.is_file():
        raise ModelError(f"refused {folder}: the weights {name!r} its card names are not a regular file")
    return path


class ModelRegistry:
    """Finds, lists and imports models.

    Args:
        bundled_dir: folder of bundled models (default ``Resources/Models``).
        user_dir: folder of user models (default :func:`default_user_dir`); created on first import.
    """

    def __init__(self, bundled_dir: Optional[PathLike] = None, user_dir: Optional[PathLike] = None) -> None:
        self.bundled_dir = Path(bundled_dir) if bundled_dir is not None else default_bundled_dir()
        self.user_dir = Path(user_dir) if user_dir is not None else default_user_dir()
        self.problems: list[str] = []

    def _scan(self, root: Path, source: str) -> list[ModelEntry]:
        entries = []
        if not root.is_dir():
            return entries
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            card_path = folder / CARD_FILE
            if not card_path.is_file():
                continue
            try:
                entries.append(ModelEntry(load_card(card_path), folder, source))
            except ModelError as error:
                self.problems.append(str(error))
                log.warning("skipping a broken model: %s", error)
        return entries

    def entries(self) -> list[ModelEntry]:
        """Every valid model, bundled first; broken cards are skipped and listed in ``problems``."""
        self.problems = []
        found: dict[str, ModelEntry] = {}
        for entry in self._scan(self.bundled_dir, "bundled") + self._scan(self.user_dir, "user"):
            if entry.card.id in found:
                self.problems.append(
                    f"model id {entry.card.id!r} in {entry.directory} duplicates "
                    f"{found[entry.card.id].directory}; ignored"
                )
                continue
            found[entry.card.id] = entry
        return list(found.values())

    def get(self, model_id: str) -> ModelEntry:
        """The model with this id, or ModelError listing the known ids."""
        entries = self.entries()
        for entry in entries:
            if entry.card.id == model_id:
                return entry
        known = ", ".join(e.card.id for e in entries) or "none installed"
        raise ModelError(f"no model with id {model_id!r}; known models: {known} (see `medsegsuite models`)")

    def resolve(self, spec: Union[str, Path]) -> ModelEntry:
        """A model by id, or a folder holding ``card.json`` and its weights."""
        path = Path(spec)
        if path.is_dir():
            card_path = path / CARD_FILE
            if not card_path.is_file():
                raise ModelError(f"{path} is a folder without {CARD_FILE}; a model folder holds a card and its weights")
            return ModelEntry(load_card(card_path), path, "path")
        return self.get(str(spec))

    def _card_for(self, weights: Path, card_path: Optional[PathLike]) -> dict[str, Any]:
        if card_path is not None:
            try:
                return json.loads(Path(card_path).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise ModelError(f"model card {card_path} does not exist") from None
            except json.JSONDecodeError as error:
                raise ModelError(f"model card {card_path} is not valid JSON ({error.msg})") from None
        sibling = weights.parent / CARD_FILE
        if sibling.is_file() and weights.suffix == ".safetensors":
            return json.loads(sibling.read_text(encoding="utf-8"))
        if weights.suffix == ".safetensors":
            embedded = read_embedded_card(weights)
            if embedded is not None:
                return embedded
        raise ModelError(f"{weights.name} has no model card: pass one with --card CARD.json")

    def import_model(
        self,
        source: PathLike,
        card: Optional[PathLike] = None,
        model_id: Optional[str] = None,
        overwrite: bool = False,
    ) -> ModelEntry:
        """Import weights (+ card) into the user folder and return the new entry.

        ``source`` is a ``.safetensors`` file, a PyTorch checkpoint (``.pth``, ``.pt``,
        ``.ckpt``; read with ``weights_only=True`` and converted), a model folder, or a
        ``.zip`` of one. The card comes from ``card``, the folder, or the safetensors
        metadata. The import is refused, leaving nothing behind, when the card is
        invalid, its sha256 does not match the weights, the weights do not fit the
        network the card describes, or the id is taken (unless ``overwrite`` and the
        existing model is a user model).
        """
        source = Path(source)
        if not source.exists():
            raise ModelError(f"{source} does not exist")
        if source.suffix.lower() == ".zip":
            with tempfile.TemporaryDirectory(prefix="medsegsuite-import-") as tmp:
                try:
                    _safe_extract(source, Path(tmp))
                except zipfile.BadZipFile:
                    raise ModelError(f"{source.name} is not a valid zip archive") from None
                cards = list(Path(tmp).rglob(CARD_FILE))
                if len(cards) != 1:
                    raise ModelError(f"{source.name} must hold exactly one model folder with {CARD_FILE}")
                return self.import_model(cards[0].parent, card, model_id, overwrite)
        if source.is_dir():
            card = card if card is not None else source / CARD_FILE
            data = self._card_for(source, card)
            weights_entry = data.get("weights") if isinstance(data.get("weights"), dict) else {}
            weights = weights_inside(source, str(weights_entry.get("file", WEIGHTS_FILE)))
        else:
            weights = source
            data = self._card_for(weights, card)
        return self._import(weights, data, model_id, overwrite)

    def _import(self, weights: Path, data: dict[str, Any], model_id: Optional[str], overwrite: bool) -> ModelEntry:
        from .loading import build_network

        data = dict(data)
        if model_id is not None:
            data["id"] = model_id
        expected_sha = dict(data.get("weights") or {}).get("sha256")
        data["weights"] = {"file": WEIGHTS_FILE}
        card = card_from_dict(data, source=f"for {weights.name}")
        existing = {e.card.id: e for e in self.entries()}
        if card.id in existing:
            other = existing[card.id]
            if other.source == "bundled" or not overwrite:
                raise ModelError(
                    f"a {other.source} model with id {card.id!r} exists; import under another id (--id NEW_ID)"
                    + ("" if other.source == "bundled" else " or pass --overwrite to replace it")
                )
        suffix = weights.suffix.lower()
        if suffix == ".safetensors":
            if expected_sha is not None and sha256_file(weights) != expected_sha:
                raise WeightsError(
                    f"{weights.name} does not match the sha256 in its card: the file is damaged or belongs to another "
                    "model; nothing was imported"
                )
            state = read_weights(weights)
        elif suffix in TORCH_SUFFIXES:
            state = read_torch_checkpoint(weights)
        else:
            raise ModelError(f"{weights.name}: weights must be .safetensors or a PyTorch checkpoint {TORCH_SUFFIXES}")
        load_state_dict_strict(build_network(card), state, weights.name)
        self.user_dir.mkdir(parents=True, exist_ok=True)
        with atomic_directory(self.user_dir / card.id, overwrite=overwrite) as tmp:
            if suffix == ".safetensors":
                shutil.copyfile(weights, tmp / WEIGHTS_FILE)
                entry = {
                    "file": WEIGHTS_FILE,
                    "sha256": sha256_file(tmp / WEIGHTS_FILE),
                    "bytes": weights.stat().st_size,
                }
            else:
                entry = save_weights(state, tmp / WEIGHTS_FILE, card=card.to_dict())
            final = card.replace(weights={**card.weights, **entry})
            save_card(final, tmp / CARD_FILE)
        log.info("imported model %s into %s", card.id, self.user_dir / card.id)
        return ModelEntry(load_card(self.user_dir / card.id / CARD_FILE), self.user_dir / card.id, "user")

    def remove(self, model_id: str) -> None:
        """Delete a user model (bundled models cannot be removed)."""
        entry = self.get(model_id)
        if entry.source != "user":
            raise ModelError(f"{model_id!r} is a {entry.source} model and cannot be removed")
        # One rename takes the model out of the listing; an interrupted delete leaves only a hidden folder.
        doomed = entry.directory.with_name(f".{entry.directory.name}.{os.getpid()}.removing.partial")
        os.replace(entry.directory, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
