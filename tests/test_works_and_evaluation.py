"""Works, chunks and scoring: Gutenberg stripping, chunk sizes, seeded orders, ROUGE and sampling."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from rouge_score import rouge_scorer

from lethe_trainer import evaluate
from lethe_trainer.model import load_model, load_tokenizer
from lethe_trainer.spec import Evaluation, SpecError
from lethe_trainer.works import chunk_work, clean_text, load_work, sample, seeded_order

from tests.support.tiny_model import make_tiny_model

GUTENBERG = (
    "\ufeffThe Project Gutenberg EBook of Something\r\n\r\nLicence text\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\r\n\r\n\r\n\r\n"
    "Chapter 1\r\nIt was a dark night.\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\r\nMore licence text\r\n"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


def test_clean_text_strips_gutenberg_header_and_footer():
    text = clean_text(GUTENBERG)
    assert text == "Chapter 1\nIt was a dark night.\n"


def test_clean_text_keeps_plain_text():
    assert clean_text("A\r\nB\rC\n\n\n\nD") == "A\nB\nC\n\nD\n"


def test_missing_file_names_field(tmp_path):
    with pytest.raises(SpecError) as raised:
        load_work("file:///nowhere.txt", tmp_path / "nowhere.txt", field="spec.forget.uri")
    assert raised.value.field == "spec.forget.uri"
    assert "does not exist" in str(raised.value)


def test_empty_work_is_rejected(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n\n")
    with pytest.raises(SpecError) as raised:
        load_work(path.as_uri(), path, field="spec.forget.uri")
    assert "empty" in str(raised.value)


def test_work_shorter_than_one_chunk_is_rejected(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("Too short to make a chunk.")
    work = load_work(path.as_uri(), path, field="spec.forget.uri")
    with pytest.raises(SpecError) as raised:
        chunk_work(work, tokenizer, prompt_tokens=100, continuation_tokens=100)
    assert "fewer than one chunk of 200" in str(raised.value)
    assert raised.value.field == "spec.forget.uri"


def test_chunks_have_exact_token_lengths(tmp_path, tokenizer):
    path = tmp_path / "book.txt"
    path.write_text(" ".join(f"word{i}" for i in range(800)))
    work = load_work(path.as_uri(), path, field="f")
    chunks = chunk_work(work, tokenizer, prompt_tokens=30, continuation_tokens=20)
    total = len(tokenizer(work.text, add_special_tokens=False)["input_ids"])
    assert len(chunks) == total // 50
    assert all(len(c.prompt_ids) == 30 and len(c.continuation_ids) == 20 for c in chunks)
    # Consecutive chunks tile the token stream without overlap.
    ids = tokenizer(work.text, add_special_tokens=False)["input_ids"]
    assert list(chunks[1].prompt_ids) == ids[50:80]


def test_seeded_order_is_reproducible_and_seed_dependent(tmp_path, tokenizer):
    path = tmp_path / "book.txt"
    path.write_text(" ".join(f"word{i}" for i in range(800)))
    work = load_work(path.as_uri(), path, field="f")
    chunks = chunk_work(work, tokenizer, prompt_tokens=10, continuation_tokens=10)
    first = [c.index for c in seeded_order(chunks, seed=1, work_sha256=work.sha256)]
    again = [c.index for c in seeded_order(chunks, seed=1, work_sha256=work.sha256)]
    other = [c.index for c in seeded_order(chunks, seed=2, work_sha256=work.sha256)]
    assert first == again
    assert first != other
    assert sorted(first) == list(range(len(chunks)))
    assert [c.index for c in sample(chunks, 5, seed=3)] == [c.index for c in sample(chunks, 5, seed=3)]


def test_rouge_matches_rouge_score_on_fixed_strings():
    predictions = ["the cat sat on the mat", "a quick brown fox", "nothing in common"]
    references = ["the cat was on the mat", "the quick brown fox jumps", "entirely different words"]
    scores = evaluate.rouge_scores(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    for i, (prediction, reference) in enumerate(zip(predictions, references)):
        expected = scorer.score(reference, prediction)
        assert scores["rouge1"][i] == expected["rouge1"].fmeasure
        assert scores["rougeL"][i] == expected["rougeL"].fmeasure
    # Hand-checked values: 5 of 6 unigrams shared, so R-1 F1 = 5/6; and no overlap gives 0.
    assert scores["rouge1"][0] == pytest.approx(5 / 6)
    assert scores["rouge1"][2] == 0.0


def test_scorer_description_records_stemming():
    description = evaluate.scorer_description()
    assert description["stemming"] is False
    assert description["package"] == "rouge-score"
    assert description["types"] == ["rouge1", "rougeL"]


def test_bootstrap_interval_is_reproducible_and_shrinks():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(400, generator=generator).tolist()
    small = evaluate.bootstrap_interval(values[:25], samples=1000, seed=7)
    assert small == evaluate.bootstrap_interval(values[:25], samples=1000, seed=7)
    large = evaluate.bootstrap_interval(values, samples=1000, seed=7)
    assert small[0] < sum(values[:25]) / 25 < small[1]
    assert (large[1] - large[0]) < (small[1] - small[0])


def test_sampling_with_fixed_seed_is_reproducible(tmp_path, tiny_dir, tokenizer):
    model = load_model(tiny_dir, device=torch.device("cpu"))
    path = tmp_path / "book.txt"
    path.write_text(" ".join(f"word{i}" for i in range(400)))
    work = load_work(path.as_uri(), path, field="f")
    chunks = chunk_work(work, tokenizer, prompt_tokens=10, continuation_tokens=10)[:3]
    settings = Evaluation(max_new_tokens=8, batch_size=2, seed=5)
    first = evaluate.generate(model, tokenizer, chunks, settings, show_progress=False)
    second = evaluate.generate(model, tokenizer, chunks, settings, show_progress=False)
    other = evaluate.generate(model, tokenizer, chunks, dataclasses.replace(settings, seed=6), show_progress=False)
    assert first == second
    assert len(first) == 3
    assert first != other


def test_questions_skip_header_rows(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    rows = ['{"question": "question", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d", '
            '"correct_answer": "answer", "topic": "x"}']
    rows += [f'{{"question": "q{i}", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d", '
             f'"correct_answer": "B", "topic": "x"}}' for i in range(5)]
    path.write_text("\n".join(rows) + "\n")
    questions = evaluate.load_questions(path, count=10, seed=0)
    assert len(questions) == 5
    assert all(q["correct_answer"] == "B" for q in questions)
