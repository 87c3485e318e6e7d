"""A TRL dataset (its `prompt` column: text or chat messages; other columns go to the reward functions) as the
mathgrpo Problems and prompt builder that `mathgrpo.trainer.train` takes."""

from __future__ import annotations

from .options import warn

ROW = "_trl_row"  # the extra Problem column through which a reward wrapper finds its dataset rows


class DatasetPrompts:
    """A dataset's rows and ready-made prompts, as mathgrpo Problems plus the prompt builder the trainer asks for
    (`.ids(text)`, `.text(text)`, `.prefill`). The Problem text is the prompt as rendered for the model."""

    prefill = ""  # TRL hands completions to the rewards as generated, with nothing prepended

    def __init__(self, dataset, what: str, tokenizer, max_prompt_tokens: int | None, template_kwargs: dict | None):
        from ..data import Problem

        self.rows = rows_of(dataset, what)
        self.tokenizer, self.limit, self.cut, self._ids = tokenizer, max_prompt_tokens, 0, {}
        self.conversational = not isinstance(self.rows[0]["prompt"], str)  # TRL decides on the first example
        self._check_prompts(what)
        texts = [self._render(r["prompt"], template_kwargs or {}, what, i) for i, r in enumerate(self.rows)]
        self.problems = [Problem(id=str(i), problem=t, gold="", solution="", extra={ROW: i})
                         for i, t in enumerate(texts)]
        self.columns = [k for k in self.rows[0] if k not in ("prompt", "completion", "completion_ids")]

    def _check_prompts(self, what: str) -> None:
        want = "a list of chat messages ({'role': ..., 'content': ...})" if self.conversational else "a string"
        for i, row in enumerate(self.rows):
            p = row["prompt"]
            ok = isinstance(p, str) if not self.conversational else (
                isinstance(p, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in p))
            if not ok:
                raise ValueError(f"{what} row {i}: 'prompt' must be {want}, as in row 0; got {p!r:.200}")
            if not (p.strip() if isinstance(p, str) else any(str(m["content"]).strip() for m in p)):
                raise ValueError(f"{what} row {i}: the prompt is empty ({p!r:.200}): there is nothing to answer; "
                                 f"drop the row or fill its prompt")

    def _render(self, prompt, kwargs: dict, what: str, i: int) -> str:
        if not self.conversational:
            return prompt
        try:
            return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - jinja raises many types; say which row and tokenizer failed
            name = getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)
            raise ValueError(f"{what} row {i}: the chat template of tokenizer '{name}' failed on this prompt: "
                             f"{type(e).__name__}: {e}") from e

    def text(self, text: str) -> str:
        return text

    def ids(self, text: str) -> list[int]:
        if text not in self._ids:
            # A rendered chat template holds its own special tokens; a plain prompt gets the tokenizer's usual ones
            # (TRL's rule), unless it already starts with the BOS text, which would double it.
            bos = self.tokenizer.bos_token
            special = not self.conversational and not (bos and text.startswith(bos))
            self._ids[text] = self._cut(list(self.tokenizer(text, add_special_tokens=special)["input_ids"]))
        return self._ids[text]

    def _cut(self, ids: list[int]) -> list[int]:
        if not self.limit or len(ids) <= self.limit:
            return ids
        if not self.cut:  # older TRL's max_prompt_length: keep the end
            warn(f"max_prompt_length={self.limit}: a prompt of {len(ids)} tokens is cut from the left "
                 f"(as older TRL did; TRL 1.16 no longer cuts prompts); further cuts are not reported")
        self.cut += 1
        return ids[-self.limit:]

    def problem_set(self, what: str):
        from ..data import ProblemSet

        return ProblemSet(train=self.problems, test=[], report=(
            f"{what}: {len(self.rows)} rows, prompts given as {'chat messages' if self.conversational else 'text'}; "
            f"columns passed to the reward functions: {', '.join(self.columns) or '(none)'}"))


def rows_of(dataset, what: str) -> list[dict]:
    """The rows of a datasets.Dataset, a pandas DataFrame or a list of dicts, checked for a `prompt` column."""
    if dataset is None:
        raise ValueError(f"{what} is required")
    if hasattr(dataset, "to_list"):  # datasets.Dataset
        rows = dataset.to_list()
    elif hasattr(dataset, "to_dict") and hasattr(dataset, "columns"):  # a pandas DataFrame
        rows = dataset.to_dict("records")
    elif isinstance(dataset, (list, tuple)):
        rows = list(dataset)
    else:
        raise TypeError(f"{what}: expected a datasets.Dataset (a streaming IterableDataset has no length, so load "
                        f"a map-style one), a pandas DataFrame or a list of dicts; got {type(dataset).__name__}")
    if not rows:
        raise ValueError(f"{what} is empty")
    if not all(isinstance(r, dict) for r in rows) or "prompt" not in rows[0]:
        cols = list(rows[0]) if isinstance(rows[0], dict) else type(rows[0]).__name__
        raise ValueError(f"{what} needs a 'prompt' column (text, or a list of chat messages); its columns: {cols}")
    return rows
