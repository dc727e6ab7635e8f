"""Class names -> prompt texts -> one text embedding per class, with a cache so each text is encoded once.

A class is described by prompts made from templates (``"a photo of a {}."``), or by prompts of its
own (``custom``), plus optional descriptions. Its embedding is the prompt ensemble: the mean of the
L2-normalized embeddings of its prompts, normalized again.

The default templates below were written for oodscope. ``"simple"`` ("a photo of a {}.") is the
single template of MCM and EOE; GL-MCM's official code uses "a photo of a {}" without the full stop
and NegLabel / AdaNeg their own strings (set by those detectors, see docs/zero_shot.md);
``"ensemble"`` is our multi-template set.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a snapshot showing a {}.",
    "an image that contains a {}.",
    "a picture of one {}.",
    "a {} seen up close.",
    "a {} photographed from a distance.",
    "a poorly lit picture of a {}.",
    "a sharp, well-exposed photograph of a {}.",
    "a grainy picture of a {}.",
    "a hand-drawn illustration of a {}.",
    "a {} in its typical surroundings.",
    "a centered view of a single {}.",
    "a scene in which a {} appears.",
    "an everyday photo featuring a {}.",
    "a {} partly hidden behind other things.",
    "a colour photograph of a {}.",
)

TemplateSpec = str | Sequence[str] | None
PromptMap = Mapping[str, Sequence[str]] | None

CACHE_ENV = "OODSCOPE_TEXT_CACHE"
CACHE_FORMAT = "oodscope-text-cache"


def resolve_templates(templates: TemplateSpec = None) -> tuple[str, ...]:
    """``None`` or ``"ensemble"``/``"default"`` -> :data:`DEFAULT_TEMPLATES`; ``"simple"`` ->
    :data:`SIMPLE_TEMPLATES`; another string -> that one template; a list -> the list."""
    if templates is None or templates in ("ensemble", "default"):
        out = DEFAULT_TEMPLATES
    elif templates == "simple":
        out = SIMPLE_TEMPLATES
    elif isinstance(templates, str):
        out = (templates,)
    else:
        out = tuple(templates)
    if not out:
        raise ValueError("at least one prompt template is needed")
    for t in out:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"a prompt template must contain '{{}}' exactly once for the class name, got {t!r}")
    return out


def _fill(text: str, name: str) -> str:
    # Custom prompts and descriptions may name the class themselves ("{}") or be used verbatim.
    return text.replace("{}", name) if "{}" in text else text


def class_prompts(
    classes: Sequence[str],
    templates: TemplateSpec = None,
    custom: PromptMap = None,
    descriptions: PromptMap = None,
) -> list[list[str]]:
    """The prompt texts of each class.

    ``custom[name]`` replaces the templated prompts of that class; ``descriptions[name]`` adds texts
    to them. In both, a text containing ``{}`` gets the class name there; other texts are used as is.
    """
    if isinstance(classes, str):
        raise TypeError("classes must be a list of class names, not one string")
    names = list(classes)
    if not names:
        raise ValueError("at least one class name is needed")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class names must be unique; repeated: {dupes}")
    chosen = resolve_templates(templates)
    custom = dict(custom or {})
    descriptions = dict(descriptions or {})
    unknown = sorted((set(custom) | set(descriptions)) - set(names))
    if unknown:
        raise ValueError(f"custom prompts / descriptions given for unknown classes: {unknown}")
    out = []
    for name in names:
        if name in custom:
            texts = [_fill(t, name) for t in _as_list(custom[name], "custom", name)]
            if not texts:
                raise ValueError(f"custom prompts for {name!r} are empty")
        else:
            texts = [t.format(name) for t in chosen]
        texts += [_fill(t, name) for t in _as_list(descriptions.get(name, []), "descriptions", name)]
        out.append(texts)
    return out


def _as_list(value: Any, what: str, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = list(value)
    if not all(isinstance(v, str) for v in items):
        raise TypeError(f"{what} for {name!r} must be strings")
    return items


def ensemble(embeddings: np.ndarray) -> np.ndarray:
    """Prompt ensemble of one class: mean of the L2-normalized rows (P, D), normalized -> (D,)."""
    rows = np.asarray(embeddings, dtype=np.float64)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    mean = rows.mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def class_text_embeddings(
    encoder: Any,
    classes: Sequence[str],
    templates: TemplateSpec = None,
    custom: PromptMap = None,
    descriptions: PromptMap = None,
    *,
    cache: TextEmbeddingCache | None = None,
) -> np.ndarray:
    """One normalized text embedding per class, (K, D) float32, by prompt ensembling."""
    prompts = class_prompts(classes, templates, custom, descriptions)
    flat = [t for texts in prompts for t in texts]
    encoded = encode_texts(encoder, flat, cache=cache)
    out, start = [], 0
    for texts in prompts:
        out.append(ensemble(encoded[start : start + len(texts)]))
        start += len(texts)
    return np.stack(out)


def encode_texts(encoder: Any, texts: Sequence[str], *, cache: TextEmbeddingCache | None = None) -> np.ndarray:
    """Normalized embeddings of ``texts`` (N, D) float32 through ``cache`` (default: the process-wide
    cache, on disk under ``$OODSCOPE_TEXT_CACHE`` when that is set)."""
    return (cache if cache is not None else default_cache()).encode(encoder, texts)


# --------------------------------------------------------------------------- cache
def encoder_key(encoder: Any) -> str | None:
    """A stable name for an encoder's text space: its ``id`` plus ``weights_fingerprint()`` when it has
    them; ``None`` for encoders without an ``id`` (cached in memory only, per object). An encoder whose
    texts are encoded by another one exposes it as ``text_space_encoder`` (ConSE: its sentence
    encoder) and is keyed as that one, so every backbone sharing the text space shares the cache."""
    delegate = getattr(encoder, "text_space_encoder", None)
    if delegate is not None and delegate is not encoder:
        return encoder_key(delegate)
    ident = getattr(encoder, "id", None)
    if not isinstance(ident, str) or not ident:
        return None
    fingerprint = getattr(encoder, "weights_fingerprint", None)
    if callable(fingerprint):
        return f"{ident}|{fingerprint()}"
    return ident


class TextEmbeddingCache:
    """Text embeddings keyed by (encoder, text), in memory and optionally on disk.

    On disk (``directory``): one safetensors file of embeddings per encoder plus ``index.json``
    mapping each encoder key to its file and the texts of its rows. Files are written to a fresh name
    and the index is replaced atomically, so readers never see a half-written store; with several
    writers at once, the last index written wins (nothing is corrupted, some entries may be re-encoded).
    Encoders without an ``id`` are cached in memory for the life of the object only.
    """

    def __init__(self, directory: str | os.PathLike | None = None, *, autosave: bool = True) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.autosave = autosave
        self._keyed: dict[str, dict[str, np.ndarray]] = {}
        self._anonymous: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._dirty: set[str] = set()
        self._loaded: set[str] = set()
        self._lock = threading.RLock()
        #: Number of texts actually sent to an encoder (for tests and diagnostics).
        self.encoded_count = 0

    # ------------------------------------------------------------------ public API
    def encode(self, encoder: Any, texts: Sequence[str]) -> np.ndarray:
        """Normalized embeddings (N, D) float32; texts not seen before are encoded in one call."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        texts = list(texts)
        if not callable(getattr(encoder, "encode_texts", None)):
            raise TypeError(f"{type(encoder).__name__} has no encode_texts(list[str]) method")
        with self._lock:
            store, key = self._store_for(encoder)
            missing = list(dict.fromkeys(t for t in texts if t not in store))
            if missing:
                vectors = np.asarray(encoder.encode_texts(missing), dtype=np.float32)
                if vectors.ndim != 2 or len(vectors) != len(missing):
                    raise ValueError(
                        f"encode_texts returned shape {vectors.shape} for {len(missing)} texts; expected (N, D)"
                    )
                if not np.isfinite(vectors).all():
                    raise ValueError("encode_texts returned NaN or infinite values")
                # Re-normalize: the protocol promises unit rows, but ensembling and cosines rely on it.
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
                self.encoded_count += len(missing)
                for text, vec in zip(missing, vectors, strict=True):
                    store[text] = vec
                if key is not None:
                    self._dirty.add(key)
                    if self.autosave and self.directory is not None:
                        self.save()
            if not texts:
                dim = next((len(v) for v in store.values()), 0)
                return np.zeros((0, dim), dtype=np.float32)
            return np.stack([store[t] for t in texts]).astype(np.float32, copy=False)

    def __len__(self) -> int:
        return sum(len(s) for s in self._keyed.values()) + sum(len(s) for s in self._anonymous.values())

    def clear(self) -> None:
        """Forget everything held in memory (the disk store is left as it is)."""
        with self._lock:
            self._keyed.clear()
            self._anonymous = weakref.WeakKeyDictionary()
            self._dirty.clear()
            self._loaded.clear()

    def save(self) -> None:
        """Write the encoders with new entries to the disk store (no-op without a directory)."""
        if self.directory is None:
            return
        from safetensors.numpy import save_file

        with self._lock:
            if not self._dirty:
                return
            self.directory.mkdir(parents=True, exist_ok=True)
            index = self._read_index()
            stale = []
            for key in sorted(self._dirty):
                store = self._keyed[key]
                texts = list(store)
                matrix = np.stack([store[t] for t in texts]).astype(np.float32)
                name = f"{_digest(key)}-{uuid.uuid4().hex[:8]}.safetensors"
                save_file({"embeddings": matrix}, str(self.directory / name))
                old = index["encoders"].get(key, {}).get("file")
                if old and old != name:
                    stale.append(old)
                index["encoders"][key] = {"file": name, "dim": int(matrix.shape[1]), "texts": texts}
            _atomic_write_text(self.directory / "index.json", json.dumps(index, ensure_ascii=False))
            for old in stale:
                try:
                    (self.directory / old).unlink()
                except FileNotFoundError:
                    pass
            self._dirty.clear()

    # ------------------------------------------------------------------ internals
    def _store_for(self, encoder: Any) -> tuple[dict[str, np.ndarray], str | None]:
        key = encoder_key(encoder)
        if key is None:
            try:
                return self._anonymous.setdefault(encoder, {}), None
            except TypeError:  # not weak-referenceable: no caching for it
                return {}, None
        store = self._keyed.setdefault(key, {})
        if key not in self._loaded:
            self._loaded.add(key)
            self._load_from_disk(key, store)
        return store, key

    def _read_index(self) -> dict:
        path = self.directory / "index.json" if self.directory is not None else None
        if path is not None and path.is_file():
            try:
                index = json.loads(path.read_text(encoding="utf-8"))
                if index.get("format") == CACHE_FORMAT and isinstance(index.get("encoders"), dict):
                    return index
            except (OSError, ValueError):
                pass  # an unreadable index is rebuilt; the cache only ever saves work
        return {"format": CACHE_FORMAT, "version": 1, "encoders": {}}

    def _load_from_disk(self, key: str, store: dict[str, np.ndarray]) -> None:
        if self.directory is None:
            return
        from safetensors.numpy import load_file

        entry = self._read_index()["encoders"].get(key)
        if not entry:
            return
        try:
            matrix = load_file(str(self.directory / entry["file"]))["embeddings"]
        except (OSError, KeyError, ValueError):
            return
        if matrix.ndim != 2 or len(matrix) != len(entry["texts"]):
            return
        for text, vec in zip(entry["texts"], matrix, strict=True):
            store.setdefault(text, vec.astype(np.float32))


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


_DEFAULT_CACHE: TextEmbeddingCache | None = None
_DEFAULT_LOCK = threading.Lock()


def default_cache() -> TextEmbeddingCache:
    """The process-wide cache (on disk under ``$OODSCOPE_TEXT_CACHE`` when that is set)."""
    global _DEFAULT_CACHE
    with _DEFAULT_LOCK:
        if _DEFAULT_CACHE is None:
            _DEFAULT_CACHE = TextEmbeddingCache(os.environ.get(CACHE_ENV) or None)
        return _DEFAULT_CACHE


def default_text_cache_dir() -> Path:
    """Where the command line keeps text embeddings: ``$OODSCOPE_TEXT_CACHE``, else
    ``~/.cache/oodscope/text``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "oodscope" / "text"


def persist_default_cache(directory: str | os.PathLike | None = None) -> TextEmbeddingCache:
    """Keep the process-wide cache on disk (default :func:`default_text_cache_dir`).

    The command line calls this, so a lexicon of ~70,000 WordNet words (NegLabel, AdaNeg) is encoded
    once per text encoder, not once per run. Library users opt in (the library default stays in
    memory unless ``$OODSCOPE_TEXT_CACHE`` is set). Entries already in memory are kept and written.
    """
    global _DEFAULT_CACHE
    target = Path(directory) if directory is not None else default_text_cache_dir()
    with _DEFAULT_LOCK:
        old = _DEFAULT_CACHE
        if old is not None and old.directory == target:
            return old
        new = TextEmbeddingCache(target)
        if old is not None:
            for key, store in old._keyed.items():
                new._keyed[key] = dict(store)
                new._dirty.add(key)
        _DEFAULT_CACHE = new
    return new
