"""Model versions on the device's disk: install (verified), activate atomically, last-known-good, gc.

Layout under ``{state_dir}/models/``::

    {name}-v{version}/manifest.json (+ model.onnx)   one verified bundle per version
    .staging/                                      downloads being installed
    current.json                                   {"active": ref, "previous": ref}, replaced atomically

Names and versions come from a validated manifest (identifiers only), and every path is checked
to stay inside the models folder, so nothing from the network can write elsewhere.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from runtime.artifacts import MANIFEST, Bundle, atomic_write, verify_bundle, write_bundle
from runtime.ed25519 import PublicKey
from runtime.errors import ArtifactError, UpdateError
from runtime.protocol import ModelManifest, ModelRef

__all__ = ["ModelStore"]

logger = logging.getLogger(__name__)


class ModelStore:
    def __init__(self, state_dir: Path, public_key: PublicKey, *, max_artifact_bytes: int | None = None) -> None:
        self.root = (Path(state_dir) / "models").resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".staging").mkdir(exist_ok=True)
        self.public_key = public_key
        self.max_artifact_bytes = max_artifact_bytes
        self._current = self.root / "current.json"

    # ------------------------------------------------------------------ paths

    def path_of(self, ref: ModelRef) -> Path:
        p = (self.root / f"{ref.name}-v{ref.version}").resolve()
        if p.parent != self.root:
            raise UpdateError(f"model path escapes the state dir: {ref.name!r}", ref.version)
        return p

    def has(self, ref: ModelRef) -> bool:
        return (self.path_of(ref) / MANIFEST).is_file()

    # ------------------------------------------------------------------ pointers

    def pointers(self) -> tuple[ModelRef | None, ModelRef | None]:
        """(active, previous) as recorded in current.json."""
        try:
            data = json.loads(self._current.read_text())
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as exc:
            logger.error("unreadable %s (%s); starting with no active model", self._current, exc)
            return None, None
        refs: list[ModelRef | None] = []
        for key in ("active", "previous"):
            raw = data.get(key) if isinstance(data, dict) else None
            try:
                refs.append(ModelRef.model_validate(raw) if raw else None)
            except ValueError:
                refs.append(None)
        return refs[0], refs[1]

    def _write_pointers(self, active: ModelRef | None, previous: ModelRef | None) -> None:
        data = {
            "active": active.model_dump() if active else None,
            "previous": previous.model_dump() if previous else None,
        }
        atomic_write(self._current, json.dumps(data).encode())

    # ------------------------------------------------------------------ install / load

    def install(self, manifest: ModelManifest, artifact: bytes | Path | None = None) -> Bundle:
        """Write a bundle into staging, verify signature, size and sha256, then move it into place.

        ``artifact`` is the ONNX bytes or a file already downloaded into staging."""
        ref = manifest.ref
        final = self.path_of(ref)
        if (final / MANIFEST).is_file():
            existing = verify_bundle(final, self.public_key, self.max_artifact_bytes)
            if existing.manifest.signature == manifest.signature:
                return existing
            raise UpdateError("a different bundle with this name and version is already installed", ref.version)
        staging = Path(tempfile.mkdtemp(dir=self.root / ".staging", prefix=f"{ref.name}-v{ref.version}."))
        try:
            if isinstance(artifact, Path):
                if manifest.artifact is None:
                    raise ArtifactError("an artifact file was given for a model without one")
                shutil.move(str(artifact), staging / manifest.artifact.filename)
                atomic_write(staging / MANIFEST, manifest.model_dump_json(by_alias=True, indent=2).encode())
            else:
                write_bundle(staging, manifest, artifact)
            bundle = verify_bundle(staging, self.public_key, self.max_artifact_bytes)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return Bundle(final, bundle.manifest)

    def install_from_dir(self, src: Path) -> Bundle:
        """Install a bundle folder (``edgeloop device install-model``): verified before and after copying."""
        bundle = verify_bundle(Path(src), self.public_key, self.max_artifact_bytes)
        art = bundle.artifact_path
        return self.install(bundle.manifest, art.read_bytes() if art else None)

    def bundle(self, ref: ModelRef) -> Bundle:
        """Re-verify an installed bundle before it is loaded (the disk is not trusted either)."""
        if not self.has(ref):
            raise UpdateError(f"model {ref.name} v{ref.version} is not installed", ref.version)
        return verify_bundle(self.path_of(ref), self.public_key, self.max_artifact_bytes)

    # ------------------------------------------------------------------ activate / rollback / gc

    def activate(self, ref: ModelRef, *, rollback: bool = False) -> None:
        """Make ``ref`` active; the active one becomes previous (last-known-good).

        A rollback does not make the version rolled back from the last-known-good: previous
        stays what it was (or is cleared when it is the version being returned to)."""
        active, previous = self.pointers()
        if active == ref:
            return
        if rollback:
            self._write_pointers(ref, None if previous == ref else previous)
            return
        self._write_pointers(ref, active if active is not None else previous)

    def rollback(self) -> ModelRef:
        """Switch to the previous version without a download; the current one becomes previous."""
        active, previous = self.pointers()
        if previous is None or not self.has(previous):
            raise UpdateError("no previous model to roll back to")
        self._write_pointers(previous, active)
        return previous

    def installed(self) -> list[ModelRef]:
        refs: list[ModelRef] = []
        for p in self.root.iterdir():
            if p.name.startswith(".") or not p.is_dir() or "-v" not in p.name:
                continue
            name, _, ver = p.name.rpartition("-v")
            try:
                refs.append(ModelRef(name=name, version=int(ver)))
            except ValueError:
                continue
        return sorted(refs, key=lambda r: (r.name, r.version))

    def gc(self, keep: int = 3) -> list[ModelRef]:
        """Remove old versions, keeping active, previous and the newest ``keep`` of each name."""
        active, previous = self.pointers()
        pinned = {r for r in (active, previous) if r is not None}
        by_name: dict[str, list[ModelRef]] = {}
        for r in self.installed():
            by_name.setdefault(r.name, []).append(r)
        removed: list[ModelRef] = []
        for refs in by_name.values():
            for r in sorted(refs, key=lambda r: r.version)[:-keep] if len(refs) > keep else []:
                if r not in pinned:
                    shutil.rmtree(self.path_of(r), ignore_errors=True)
                    removed.append(r)
        for p in (self.root / ".staging").iterdir():
            shutil.rmtree(p, ignore_errors=True)
        return removed
