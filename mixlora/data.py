"""Training and evaluation data for the `mixlora` command: BIG-bench multiple-choice tasks and JSON/JSONL files.

Every example becomes a prompt and an answer; multiple-choice examples also keep their choices. The model is
trained on `prompt + " " + answer + eos` with the prompt masked, and a multiple-choice example is scored by the
summed log-likelihood of each `" " + choice` given the prompt, so training and evaluation read the same format.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from mixlora.base_models import cache_root
from mixlora.config import did_you_mean
from mixlora.fileio import write_bytes_atomically, write_json_atomically

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_SDIST_BYTES = 358_249_635  # its size on PyPI: the total of the download's progress bar
_TASKS_DIR = "bigbench/benchmark_tasks/"
_TASK_INDEX = "tasks.json"
# pip >= 25.1 refuses to download this sdist: its metadata names a `file://` URL for bleurt, and pip now rejects
# direct URL dependencies of PyPI distributions even with --no-deps. This older pip (run from its wheel) does not.
_FALLBACK_PIP = "pip==24.0"

INSTRUCTION_FIELDS = ("instruction", "input", "output")
CHOICE_FIELDS = ("question", "choices", "answer")


class DataError(ValueError):
    """Bad data or task name; the message is shown to the user as is."""


@dataclass
class Example:
    """One example: `prompt` is followed by `" " + answer`; `choices` (with `label` the correct index) when it is
    multiple-choice."""

    task: str
    prompt: str
    answer: str
    choices: list[str] = field(default_factory=list)
    label: int = -1


def format_prompt(question: str) -> str:
    return f"{question.strip()}\nAnswer:"


# ---------------------------------------------------------------------------------------------- BIG-bench tasks


def bigbench_dir() -> str:
    return os.path.join(cache_root(), "bigbench")


def _bigbench_sdist() -> str:
    """The bigbench sdist in the cache, downloaded with pip on first use (never installed)."""
    folder = bigbench_dir()
    path = os.path.join(folder, BIGBENCH_SDIST)
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    download = ["download", "--no-deps", "--no-binary", ":all:", BIGBENCH_REQUIREMENT, "-d", folder, "-q"]
    result = None
    if _pip_version() < (25, 1):
        result = _pip_with_progress([sys.executable, "-m", "pip", *download], folder)
    # A newer pip downloads the sdist, prepares its metadata and then refuses (about a minute spent for nothing).
    if result is None or result.returncode != 0 and "direct URL dependencies" in result.stderr:
        pip_dir = os.path.join(folder, "pip")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", _FALLBACK_PIP, "-d", pip_dir, "-q"],
                       check=True, capture_output=True, text=True)
        wheel = next(os.path.join(pip_dir, n) for n in os.listdir(pip_dir) if n.endswith(".whl"))
        result = _pip_with_progress([sys.executable, os.path.join(wheel, "pip"), *download], folder)
    if result.returncode != 0 or not os.path.isfile(path):
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DataError(f"could not download the {BIGBENCH_REQUIREMENT} sdist with pip: {last}")
    return path


def _pip_version() -> tuple[int, ...]:
    """The version of the pip in this environment, e.g. (25, 1); (0,) when it has none."""
    from importlib import metadata

    try:
        version = metadata.version("pip")
    except metadata.PackageNotFoundError:
        return (0,)
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def _pip_with_progress(command: list[str], folder: str) -> subprocess.CompletedProcess:
    """Run a `pip download` of the sdist with a progress bar on stderr. pip draws no bar when its output is not a
    terminal (it is captured here, to read its errors), so the bar follows the size of the sdist that pip writes
    into its temporary directory, which is pointed (TMPDIR) at a folder of the cache."""
    from tqdm.auto import tqdm

    scratch = tempfile.mkdtemp(prefix=".pip-", dir=folder)
    try:
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
                tqdm(total=BIGBENCH_SDIST_BYTES, unit="B", unit_scale=True, desc=f"download {BIGBENCH_SDIST}",
                     dynamic_ncols=True) as bar:
            process = subprocess.Popen(command, stdout=out, stderr=err, text=True,
                                       env={**os.environ, "TMPDIR": scratch})
            while process.poll() is None:
                time.sleep(0.5)
                done = _downloaded_bytes(scratch)
                bar.update(max(0, done - bar.n))
                if done >= bar.total:  # pip still unpacks the sdist to read its metadata (10-30 s)
                    bar.set_postfix_str("pip checks the sdist", refresh=True)
            if process.returncode == 0:
                bar.update(bar.total - bar.n)
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _downloaded_bytes(scratch: str) -> int:
    """Size of the partly downloaded sdist somewhere under `scratch` (0 before it appears)."""
    sizes = [0]
    for root, _, names in os.walk(scratch):
        if BIGBENCH_SDIST in names:
            try:
                sizes.append(os.path.getsize(os.path.join(root, BIGBENCH_SDIST)))
            except FileNotFoundError:  # pip moved it between the listing and the stat
                pass
    return max(sizes)


class _ReadProgress:
    """A binary file whose reads advance a tqdm bar by the bytes read (for reading the sdist with tarfile)."""

    def __init__(self, file, bar) -> None:
        self.file, self.bar = file, bar

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.bar.update(len(data))
        return data

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def _extract_tasks(wanted: set[str]) -> list[str]:
    """One pass over the sdist: cache the task.json of every wanted task and the index of all task names."""
    from tqdm.auto import tqdm

    folder = bigbench_dir()
    known = []
    sdist = _bigbench_sdist()
    with open(sdist, "rb") as raw, \
            tqdm(total=os.path.getsize(sdist), unit="B", unit_scale=True, desc=f"read {BIGBENCH_SDIST}",
                 dynamic_ncols=True) as bar, \
            tarfile.open(fileobj=_ReadProgress(raw, bar), mode="r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            # bigbench-1.0.0/bigbench/benchmark_tasks/<task>/task.json (subtasks are one level deeper)
            if len(parts) == 5 and parts[1:3] == ["bigbench", "benchmark_tasks"] and parts[4] == "task.json":
                known.append(parts[3])
                if parts[3] in wanted:
                    data = tar.extractfile(member).read()
                    write_bytes_atomically(os.path.join(folder, f"{parts[3]}.json"), data)
    known.sort()
    write_json_atomically(os.path.join(folder, _TASK_INDEX), known)
    return known


def load_bigbench_tasks(tasks: list[str]) -> dict[str, list[Example]]:
    """Multiple-choice examples of each BIG-bench task, in file order. Unknown names raise `DataError` listing the
    known tasks; tasks without multiple-choice examples (`target_scores`) raise too."""
    folder = bigbench_dir()
    missing = {t for t in tasks if not os.path.isfile(os.path.join(folder, f"{t}.json"))}
    index = os.path.join(folder, _TASK_INDEX)
    if missing:
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                known = json.load(f)
            unknown = sorted(t for t in missing if t not in known)
            if unknown:
                raise _unknown_tasks(unknown, known)
        known = _extract_tasks(missing)
        unknown = sorted(t for t in missing if t not in known)
        if unknown:
            raise _unknown_tasks(unknown, known)
    out = {}
    for task in tasks:
        with open(os.path.join(folder, f"{task}.json"), encoding="utf-8") as f:
            spec = json.load(f)
        examples = []
        for item in spec.get("examples", []):
            scores = item.get("target_scores")
            if not isinstance(scores, dict) or not scores or not isinstance(item.get("input"), str):
                continue
            choices = [str(c).strip() for c in scores]
            values = list(scores.values())
            label = values.index(max(values))
            examples.append(Example(task, format_prompt(item["input"]), choices[label], choices, label))
        if not examples:
            raise DataError(f"BIG-bench task {task!r} has no multiple-choice examples (target_scores)")
        out[task] = examples
    return out


def _unknown_tasks(unknown: list[str], known: list[str]) -> DataError:
    return DataError(f"unknown BIG-bench task {_unknown_names(unknown, known)} ({len(known)} tasks are listed in "
                     f"{os.path.join(bigbench_dir(), _TASK_INDEX)})")


def _unknown_names(unknown: list[str], known: list[str]) -> str:
    """"'a'; did you mean 'b'?" for each unknown name; the known names themselves when there are at most 12."""
    hints = [f"{name!r}{did_you_mean(name, known)}" for name in unknown]
    listed = f"; known: {', '.join(known)}" if len(known) <= 12 else ""
    return "; ".join(hints) + listed


# ------------------------------------------------------------------------------------------------- data files


def load_data_file(path: str) -> dict[str, list[Example]]:
    """Examples of a JSON (list of objects) or JSONL file, grouped by their `task` field (default: the file name).

    Each record has either instruction/input/output (input optional) or question/choices/answer (answer: the
    correct choice's text or index). A bad record raises `DataError` naming the file, the line and the fields.
    """
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} " + ("is a directory, not a JSON/JSONL file" if os.path.isdir(path)
                                                   else "does not exist"))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); expected a JSON or JSONL file") from None
    stripped = text.lstrip()
    records: list[tuple[int, object]] = []
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
        records = [(i + 1, item) for i, item in enumerate(items)]  # for a JSON list, "line" is the record number
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {number}: invalid JSON: {e.msg}") from None
    default_task = os.path.splitext(os.path.basename(path))[0]
    out: dict[str, list[Example]] = {}
    for number, record in records:
        example = _record_example(record, default_task, f"{path}: line {number}")
        out.setdefault(example.task, []).append(example)
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def _record_example(record: object, default_task: str, where: str) -> Example:
    expected = (f"expected fields {'/'.join(INSTRUCTION_FIELDS)} (input optional) or "
                f"{'/'.join(CHOICE_FIELDS)}")
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object; {expected}")
    task = str(record.get("task", default_task))
    if all(k in record for k in CHOICE_FIELDS):
        question, choices, answer = (record[k] for k in CHOICE_FIELDS)
        if not isinstance(question, str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: 'question' must be a string and 'choices' a list of >= 2 strings")
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            label = answer
        elif isinstance(answer, str) and answer in choices:
            label = choices.index(answer)
        else:
            raise DataError(f"{where}: 'answer' must be one of the choices or its index, got {answer!r}")
        return Example(task, format_prompt(question), choices[label], list(choices), label)
    if "instruction" in record and "output" in record:
        instruction, extra, output = record["instruction"], record.get("input", ""), record["output"]
        if not all(isinstance(v, str) for v in (instruction, extra, output)):
            raise DataError(f"{where}: 'instruction', 'input' and 'output' must be strings")
        question = f"{instruction}\n{extra}" if extra.strip() else instruction
        return Example(task, format_prompt(question), output.strip())
    raise DataError(f"{where}: has fields {', '.join(map(repr, record))}; {expected}")


def load_examples(data: str | None, tasks: list[str]) -> dict[str, list[Example]]:
    """Examples by task: from the data file when given (optionally restricted to `tasks`), else BIG-bench `tasks`."""
    if data is None:
        return load_bigbench_tasks(tasks)
    grouped = load_data_file(data)
    if tasks:
        unknown = [t for t in tasks if t not in grouped]
        if unknown:
            raise DataError(f"{data} has no task {_unknown_names(unknown, sorted(grouped))}")
        grouped = {t: grouped[t] for t in tasks}
    return grouped


def split_examples(grouped: dict[str, list[Example]], eval_size: int, train_size: int | None, seed: int):
    """Shuffle each task with `seed`; the first `eval_size` multiple-choice examples are held out for evaluation
    (at most half of a task), up to `train_size` of the rest are for training. Returns (train list, eval by task)."""
    train, held_out = [], {}
    for task in sorted(grouped):
        examples = list(grouped[task])
        random.Random(f"{seed}:{task}").shuffle(examples)
        mc = [e for e in examples if e.choices]
        n_eval = min(eval_size, len(mc) // 2)
        if n_eval:
            held_out[task] = mc[:n_eval]
        held = {id(e) for e in mc[:n_eval]}
        rest = [e for e in examples if id(e) not in held]
        train.extend(rest if train_size is None else rest[:train_size])
    return train, held_out


# ------------------------------------------------------------------------------------------------ tokenisation


def encode(tokenizer, prompt: str, answer: str, max_len: int, add_eos: bool) -> tuple[list[int], int]:
    """Token ids of `prompt + " " + answer` (+ eos) and the number of prompt tokens. The prompt is cut from the left
    so that the answer fits in `max_len` (the answer itself is cut from the right if it alone is too long)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    answer_ids = answer_ids[:max(1, max_len - 1)]
    prompt_ids = prompt_ids[-(max_len - len(answer_ids)):]
    return prompt_ids + answer_ids, len(prompt_ids)


def collate(sequences: list[tuple[list[int], int]], pad_id: int) -> dict[str, Any]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on prompt and padding), (B, L) int64 tensors."""
    import torch  # here, so that reading data (and its errors) does not wait for torch to load

    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
        labels[row, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
