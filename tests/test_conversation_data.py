"""LLaVA conversation data (template, answer-only labels, image-safe truncation, errors) and synthetic shapes VQA."""

import json

import pytest
import torch
from PIL import Image

from mome.data.conversation import (
    IGNORE_INDEX,
    ConversationDataset,
    ConversationFormatError,
    collate_conversations,
    encode_conversation,
    encode_prompt,
)
from mome.data.shapes import ANSWERS, CHANCE_ACCURACY, QUESTION_TYPES, shapes_records, write_shapes_dataset
from mome.models.moe_llava import TINY_IMAGE_TOKEN_ID, moe_llava_tiny_tokenizer

IMG = TINY_IMAGE_TOKEN_ID
N = 4  # image tokens per image in these tests


@pytest.fixture(scope="module")
def tok():
    return moe_llava_tiny_tokenizer()


def red_square():
    return Image.new("RGB", (8, 8), (255, 0, 0))


def record(turns, image=None, record_id="r1"):
    out = {"id": record_id, "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        out["image"] = image
    return out


def dataset(records, tok, **kwargs):
    return ConversationDataset(records, tok, image_token_id=IMG, num_image_tokens=N, image_size=16, **kwargs)


def words(tok, ids):
    return [tok.convert_ids_to_tokens(i) for i in ids]


# -- template and labels ----------------------------------------------------------------------------------------
def test_template_labels_only_answers(tok):
    data = dataset([record([("human", "<image>\nWhat colour is the shape?"), ("gpt", "red")], red_square())], tok)
    sample = data[0]
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    expected = ["<s>", "user", ":"] + ["<image>"] * N + ["what", "colour", "is", "the", "shape", "?"]
    expected += ["assistant", ":", "red", "</s>"]
    assert words(tok, ids) == expected
    assert words(tok, [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]) == ["red", "</s>"]
    assert all(label == IGNORE_INDEX for i, label in zip(ids, labels) if i == IMG)
    assert sample["images"].shape == (1, 3, 16, 16) and sample["id"] == "r1"
    prompt = encode_prompt(tok, "<image>\nWhat colour is the shape?", image_token_id=IMG, num_image_tokens=N)
    assert prompt[0].tolist() == ids[: ids.index(tok.convert_tokens_to_ids("red"))]


def test_multi_turn_multi_image_and_system(tok):
    rec = record(
        [("human", "<image>\nWhat shape?"), ("gpt", "circle"), ("human", "And <image> here?"), ("gpt", "square")],
        [red_square(), red_square()],
    )
    sample = dataset([rec], tok, system="answer with one word.")[0]
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    assert words(tok, ids[:6]) == ["<s>", "answer", "with", "one", "word", "."]
    assert ids.count(IMG) == 2 * N and sample["images"].shape[0] == 2
    answered = words(tok, [i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert answered == ["circle", "</s>", "square", "</s>"]


def test_single_image_without_placeholder_goes_first(tok):
    sample = dataset([record([("human", "Which shape is shown?"), ("gpt", "circle")], red_square())], tok)[0]
    assert words(tok, sample["input_ids"][:4].tolist()) == ["<s>", "user", ":", "<image>"]


# -- truncation ----------------------------------------------------------------------------------------------------
TWO_ROUNDS = [("human", "<image>\nWhat shape?"), ("gpt", "circle"), ("human", "And <image> here?"), ("gpt", "square")]


def test_truncation_cuts_text_after_images_only(tok):
    rec = record(TWO_ROUNDS, [red_square(), red_square()])
    full = dataset([rec], tok)[0]["input_ids"].tolist()
    first_round = full.index(tok.eos_token_id) + 1
    second_image_end = first_round + 3 + N  # "user : and" then the image
    # The cut falls after the second image: text is cut, both images kept.
    cut = dataset([rec], tok, max_length=second_image_end + 2)[0]
    assert cut["input_ids"].tolist() == full[: second_image_end + 2] and cut["images"].shape[0] == 2
    # The cut would split the second image: the whole second round (and its image) is dropped.
    for length in (second_image_end - 1, first_round + 4):
        dropped = dataset([rec], tok, max_length=length)[0]
        assert dropped["input_ids"].tolist() == full[:first_round] and dropped["images"].shape[0] == 1
        assert dropped["input_ids"].tolist().count(IMG) == N
    # The first round's image cannot fit: a typed error naming the record.
    with pytest.raises(ConversationFormatError, match="record 'r1'.*first round"):
        dataset([rec], tok, max_length=5)[0]


def test_truncation_without_any_answer_is_an_error(tok):
    rec = record([("human", "<image>\nWhat colour is the shape?"), ("gpt", "red")], red_square())
    with pytest.raises(ConversationFormatError, match="no answer token"):
        dataset([rec], tok, max_length=3 + N + 2)[0]


def test_encode_conversation_without_bos(tok):
    class NoBos:
        bos_token_id, eos_token_id = None, tok.eos_token_id

        def __call__(self, text, add_special_tokens=False):
            return tok(text, add_special_tokens=add_special_tokens)

    turns = [{"from": "human", "value": "how many?"}, {"from": "gpt", "value": "two"}]
    ids, labels, images, _, _ = encode_conversation(turns, NoBos(), image_token_id=IMG, num_image_tokens=N)
    assert words(tok, ids)[0] == "user" and images == 0 and labels[-2:] == ids[-2:]


# -- errors ----------------------------------------------------------------------------------------------------------
def turns(*pairs):
    return [{"from": f, "value": v} if v is not None else {"from": f} for f, v in pairs]


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"id": "x", "image": None}, "conversations"),
        ({"id": "x", "conversations": []}, "conversations"),
        ({"id": "x", "conversations": turns(("human", "hi"))}, "conversations"),
        ({"id": "x", "conversations": turns(("gpt", "a"), ("human", "b"))}, "conversations[0].from"),
        ({"id": "x", "conversations": turns(("human", "a"), ("human", "b"))}, "conversations[1].from"),
        ({"id": "x", "conversations": turns(("human", None), ("gpt", "b"))}, "conversations[0].value"),
        ({"id": "x", "conversations": turns(("human", "a"), ("gpt", "<image>"))}, "conversations[1].value"),
        ({"id": "x", "image": "nope.png", "conversations": turns(("human", "a"), ("gpt", "b"))}, "image"),
        ({"id": "x", "image": ["a.png", "b.png"], "conversations": turns(("human", "<image>"), ("gpt", "b"))}, "image"),
    ],
)
def test_malformed_records_name_id_and_field(tok, tmp_path, bad, field):
    with pytest.raises(ConversationFormatError) as info:
        dataset([bad], tok, image_root=tmp_path)
    assert info.value.record_id == "x" and info.value.field == field
    assert "'x'" in str(info.value) and field in str(info.value)


def test_missing_file_and_bad_json_are_data_errors(tok, tmp_path):
    from mome.data.base import DataConfigError

    with pytest.raises(DataConfigError, match="does not exist"):
        dataset(tmp_path / "missing.json", tok)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataConfigError, match="not valid JSON"):
        dataset(tmp_path / "bad.json", tok)


# -- collate ---------------------------------------------------------------------------------------------------------
def test_collate_pads_and_concatenates_images(tok):
    records = [
        record([("human", "<image>\nWhat colour is the shape?"), ("gpt", "red")], red_square(), "a"),
        record([("human", "how many?"), ("gpt", "two")], None, "b"),
        record(TWO_ROUNDS, [red_square(), red_square()], "c"),
    ]
    data = dataset(records, tok)
    samples = [data[i] for i in range(3)]
    batch = collate_conversations(samples, tok.pad_token_id)
    lengths = [s["input_ids"].shape[0] for s in samples]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    assert batch["images"].shape == (3, 3, 16, 16)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
    text_only = collate_conversations([samples[1]], tok.pad_token_id)
    assert text_only["images"].shape == (0, 3, 16, 16)


# -- shapes ----------------------------------------------------------------------------------------------------
def test_shapes_records_are_deterministic_and_consistent():
    first = list(shapes_records(50, seed=3, turns=3))
    second = list(shapes_records(50, seed=3, turns=3))
    other = list(shapes_records(50, seed=4, turns=3))
    assert [r["conversations"] for r in first] == [r["conversations"] for r in second]
    assert all(a["image"].tobytes() == b["image"].tobytes() for a, b in zip(first, second))
    assert [r["conversations"] for r in first] != [r["conversations"] for r in other]
    for rec in first:
        meta, turns = rec["meta"], rec["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and rec["image"].size == (32, 32)
        assert [t["value"] for t in turns[1::2]] == meta["answers"]
        for kind, answer in zip(meta["question_types"], meta["answers"]):
            assert answer in ANSWERS[kind]
        if "position" in meta["question_types"]:
            assert meta["count"] == 1
        # The drawn colour is in the image.
        assert rec["image"].getcolors(32 * 32) is not None
    assert CHANCE_ACCURACY == {"colour": 0.25, "shape": 1 / 3, "count": 1 / 3, "position": 1 / 3}
    assert set(CHANCE_ACCURACY) == set(QUESTION_TYPES)
    with pytest.raises(ValueError, match="question_types"):
        next(shapes_records(1, question_types=("size",)))


def test_write_shapes_dataset_round_trips(tok, tmp_path):
    paths = write_shapes_dataset(tmp_path / "a", {"train": 12, "val": 4, "test": 4}, seed=1, turns=2)
    again = write_shapes_dataset(tmp_path / "b", {"train": 12, "val": 4, "test": 4}, seed=1, turns=2)
    assert set(paths) == {"train", "val", "test"}
    assert paths["train"].read_text() == again["train"].read_text()
    train = json.loads(paths["train"].read_text())
    assert len(train) == 12 and train[0]["image"].startswith("images/train/")
    assert (tmp_path / "a" / train[0]["image"]).read_bytes() == (tmp_path / "b" / train[0]["image"]).read_bytes()
    assert json.loads(paths["val"].read_text())[0]["conversations"] != train[0]["conversations"]
    data = dataset(paths["train"], tok)  # image paths relative to the JSON's folder
    sample = data[0]
    assert sample["images"].shape == (1, 3, 16, 16) and sample["input_ids"].tolist().count(IMG) == N
    assert tok.unk_token_id not in sample["input_ids"].tolist()
    assert torch.isfinite(sample["images"]).all()
