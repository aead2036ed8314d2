"""Works (books) as text and as chunks of tokens.

A chunk is a window of ``prompt_tokens + continuation_tokens`` consecutive
tokens of a work: the first part is the prompt x, the second the true
continuation y. Chunks do not overlap and the tail that does not fill a whole
chunk is dropped. Which chunks a step trains on and which it scores are taken
from one seeded order per work, so the preparation, the unlearning step and
the evaluation see the same chunks without having to pass them around.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Sequence
from pathlib import Path

from .spec import SpecError

# Project Gutenberg files wrap the book in a licence header and footer that
# are identical across books, so they would make every work look alike.
_START_MARKERS = (
    re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.IGNORECASE | re.MULTILINE),
    re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.MULTILINE),
)
_END_MARKERS = (
    re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.IGNORECASE | re.MULTILINE),
    re.compile(r"^End of (the )?Project Gutenberg('s)? .*$", re.IGNORECASE | re.MULTILINE),
)


@dataclasses.dataclass(frozen=True)
class Work:
    uri: str
    text: str
    sha256: str  # of the raw bytes as fetched, before cleaning
    title: str | None = None

    @property
    def label(self) -> str:
        return self.title or self.uri.rsplit("/", 1)[-1].removeprefix("demo:")


@dataclasses.dataclass(frozen=True)
class Chunk:
    work: str  # URI of the work
    index: int  # position of the chunk in the work
    prompt_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]
    prompt_text: str
    continuation_text: str


def clean_text(raw: str) -> str:
    """Normalise line endings, drop a byte-order mark and strip Gutenberg header and footer."""
    text = raw.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    for marker in _START_MARKERS:
        found = marker.search(text)
        if found:
            text = text[found.end():]
            break
    for marker in _END_MARKERS:
        found = marker.search(text)
        if found:
            text = text[:found.start()]
            break
    text = re.sub(r"\n{3,}", "\n\n", text)  # runs of blank lines carry no text to memorise
    return text.strip() + "\n"


def load_work(uri: str, path: Path, *, field: str, title: str | None = None) -> Work:
    """Read and clean the work at PATH (already fetched from URI); reject empty works."""
    if not path.exists():
        raise SpecError(field, uri, "does not exist", "check the path, or fetch the work first")
    raw = path.read_bytes()
    text = clean_text(raw.decode("utf-8", errors="replace"))
    if not text.strip():
        raise SpecError(field, uri, "is empty after removing headers and blank lines", "point it at a work with text")
    return Work(uri=uri, text=text, sha256=hashlib.sha256(raw).hexdigest(), title=title)


def chunk_work(work: Work, tokenizer, *, prompt_tokens: int, continuation_tokens: int,
               field: str = "spec.forget.uri") -> list[Chunk]:
    """Cut a work into non-overlapping (prompt, continuation) chunks of the tokenizer's tokens."""
    ids = tokenizer(work.text, add_special_tokens=False)["input_ids"]
    size = prompt_tokens + continuation_tokens
    if len(ids) < size:
        raise SpecError(field, work.uri, f"has {len(ids)} tokens, fewer than one chunk of {size}",
                        "use a longer work or lower evaluation.promptTokens / continuationTokens")
    chunks = []
    for index in range(len(ids) // size):
        window = ids[index * size:(index + 1) * size]
        prompt, continuation = tuple(window[:prompt_tokens]), tuple(window[prompt_tokens:])
        chunks.append(Chunk(
            work=work.uri,
            index=index,
            prompt_ids=prompt,
            continuation_ids=continuation,
            prompt_text=tokenizer.decode(prompt),
            continuation_text=tokenizer.decode(continuation),
        ))
    return chunks


def seeded_order(chunks: Sequence[Chunk], *, seed: int, work_sha256: str) -> list[Chunk]:
    """Return the chunks in a fixed pseudo-random order that depends on the seed and the work only."""
    key = int(hashlib.sha256(f"{seed}:{work_sha256}".encode()).hexdigest()[:16], 16)
    ordered = list(chunks)
    random.Random(key).shuffle(ordered)
    return ordered


def sample(chunks: Sequence[Chunk], count: int, *, seed: int) -> list[Chunk]:
    """Draw up to COUNT chunks without replacement, reproducibly for a seed."""
    if count >= len(chunks):
        return list(chunks)
    return random.Random(seed).sample(list(chunks), count)


def derangement(count: int, *, seed: int) -> list[int]:
    """Return a permutation of range(count) with no fixed point (count >= 2), reproducibly for a seed.

    Used for random labels: chunk i is trained on the continuation of chunk
    permutation[i], which is never its own.
    """
    if count < 2:
        raise ValueError("random labels need at least two chunks of the work")
    rng = random.Random(seed)
    while True:
        permutation = list(range(count))
        rng.shuffle(permutation)
        if all(i != j for i, j in enumerate(permutation)):
            return permutation
