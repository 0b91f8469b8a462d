"""Every answer of an evaluation on disk: ``DIR/answers.jsonl`` (one row per benchmark, question and run) and
``DIR/settings.json`` (what produced them).

A row holds the model id, benchmark, question id and text, run, sampling, the full response (tool calls and
results included), the tool calls, the finish reason, the extracted answer, the golds, each metric, and the judge
that scored it with its raw verdict (`appo_jax.evaluation.runner.answer_row`). Rows are appended and flushed to
disk (fsync) one by one as answers are judged, so an evaluation killed at any moment keeps every finished answer;
a row cut short by the kill (the file's last line, not valid JSON) is dropped when the store is opened again.

Resume: opening a directory that holds answers skips the (benchmark, question, run) keys already there. The
settings that decide an answer (model id, sampling, budgets, tool limits, system prompt, seed, judge) must equal
those of ``settings.json``; otherwise :class:`ValueError` names each difference, so one directory never mixes two
models or two samplings. Benchmarks, ``--limit`` and ``--runs`` may grow between calls (more rows are added).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

SETTINGS_FILE = "settings.json"
ANSWERS_FILE = "answers.jsonl"


def row_key(row: dict) -> tuple[str, str, int]:
    return row["benchmark"], str(row["question_id"]), int(row["run"])


def settings_differences(old: dict, new: dict) -> list[str]:
    """``"key: old -> new"`` for every key whose value differs (missing keys count as None)."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_settings(directory: str | os.PathLike, settings: dict) -> None:
    """``ValueError`` naming each difference when ``directory`` holds answers made with other settings (what
    :class:`AnswerStore` refuses), before anything is loaded; nothing happens for a new directory."""
    path = Path(directory) / SETTINGS_FILE
    if path.is_file():
        diff = settings_differences(json.loads(path.read_text(encoding="utf-8")), json.loads(json.dumps(settings)))
        if diff:
            raise ValueError(f"{directory} holds answers made with other settings ({'; '.join(diff)}); give another "
                             "--out directory, or the same settings to resume it")


class AnswerStore:
    """The answers of one evaluation directory (module doc). Thread-safe :meth:`append`."""

    def __init__(self, directory: str | os.PathLike, settings: dict):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / ANSWERS_FILE
        settings_path = self.directory / SETTINGS_FILE
        settings = json.loads(json.dumps(settings))  # as it reads back (tuples -> lists)
        check_settings(self.directory, settings)
        if not settings_path.is_file():
            settings_path.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        self.settings = settings
        self._rows = self._read()
        self._keys = {row_key(r) for r in self._rows}
        self._lock = threading.Lock()

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        rows, good = [], 0
        for i, line in enumerate(lines):
            if not line.strip():
                good += len(line) + 1
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                if i == len(lines) - 1:  # the kill cut the last row short: drop it
                    break
                raise ValueError(f"{self.path}:{i + 1}: not a JSON row; the file was edited or damaged") from None
            good += len(line) + 1
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(min(good, len(data)))
        return rows

    def done(self, benchmark: str, question_id: str, run: int) -> bool:
        return (benchmark, str(question_id), int(run)) in self._keys

    def rows(self) -> list[dict]:
        """Every row on disk, in the order written."""
        with self._lock:
            return list(self._rows)

    def append(self, row: dict) -> None:
        """Write ``row`` as one JSON line and fsync it; ``ValueError`` for a key already present."""
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock:
            key = row_key(row)
            if key in self._keys:
                raise ValueError(f"answer {key} is already in {self.path}")
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._rows.append(row)
            self._keys.add(key)
