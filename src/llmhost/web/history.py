"""Conversations kept in SQLite (WAL mode), so a refresh or a restart loses nothing.

Each call opens its own short connection: Streamlit runs every browser session in its own thread,
and WAL lets readers and one writer work side by side.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    system TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation, id);
"""


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str
    system: str
    created: float
    updated: float


@dataclass(frozen=True)
class Message:
    id: int
    role: str
    content: str
    meta: dict[str, Any] = field(default_factory=dict)
    """Facts about a reply: tokens, ttft_s, tokens_per_s, dropped_turns, stopped, model."""


class ConversationStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys=ON")
        try:
            with db:  # one transaction: committed on success, rolled back on error
                yield db
        finally:
            db.close()

    def create(self, title: str = "", system: str = "") -> Conversation:
        now = time.time()
        conv = Conversation(uuid.uuid4().hex, title, system, now, now)
        with self._db() as db:
            db.execute(
                "INSERT INTO conversations VALUES (?, ?, ?, ?, ?)",
                (conv.id, conv.title, conv.system, conv.created, conv.updated),
            )
        return conv

    def list(self) -> list[Conversation]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM conversations ORDER BY updated DESC").fetchall()
        return [Conversation(**dict(r)) for r in rows]

    def get(self, conv_id: str) -> Conversation | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM conversations WHERE id = ?", (conv_id,)).fetchone()
        return Conversation(**dict(row)) if row else None

    def messages(self, conv_id: str) -> list[Message]:
        with self._db() as db:
            rows = db.execute(
                "SELECT id, role, content, meta FROM messages WHERE conversation = ? ORDER BY id",
                (conv_id,),
            ).fetchall()
        return [Message(r["id"], r["role"], r["content"], json.loads(r["meta"])) for r in rows]

    def add(self, conv_id: str, role: str, content: str, meta: dict[str, Any] | None = None) -> int:
        now = time.time()
        with self._db() as db:
            cur = db.execute(
                "INSERT INTO messages (conversation, role, content, meta, created) VALUES (?, ?, ?, ?, ?)",
                (conv_id, role, content, json.dumps(meta or {}, ensure_ascii=False), now),
            )
            db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conv_id))
            if role == "user":  # the first question names the conversation until the user renames it
                db.execute(
                    "UPDATE conversations SET title = ? WHERE id = ? AND title = ''",
                    (title_from(content), conv_id),
                )
            return int(cur.lastrowid or 0)

    def drop_last_reply(self, conv_id: str) -> Message | None:
        """Remove the last message if it is a reply (for Regenerate) and return it."""
        last = self.messages(conv_id)[-1:]
        if not last or last[0].role != "assistant":
            return None
        with self._db() as db:
            db.execute("DELETE FROM messages WHERE id = ?", (last[0].id,))
        return last[0]

    def rename(self, conv_id: str, title: str) -> None:
        with self._db() as db:
            db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title.strip()[:200], conv_id))

    def set_system(self, conv_id: str, system: str) -> None:
        with self._db() as db:
            db.execute("UPDATE conversations SET system = ? WHERE id = ?", (system, conv_id))

    def delete(self, conv_id: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (conv_id,))


def title_from(text: str, limit: int = 40) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def to_markdown(conv: Conversation, messages: list[Message]) -> str:
    parts = [f"# {conv.title or 'Conversation'}\n"]
    if conv.system:
        parts.append(f"**System:** {conv.system}\n")
    for m in messages:
        parts.append(f"## {'User' if m.role == 'user' else 'Assistant'}\n\n{m.content}\n")
    return "\n".join(parts)


def to_json(conv: Conversation, messages: list[Message]) -> str:
    """The OpenAI chat format (`messages`), so an export is also a fine-tuning example."""
    chat = ([{"role": "system", "content": conv.system}] if conv.system else []) + [
        {"role": m.role, "content": m.content} for m in messages
    ]
    doc = {"title": conv.title, "created": conv.created, "messages": chat}
    return json.dumps(doc, ensure_ascii=False, indent=2)
