"""A user's own data through Hugging Face `datasets` (`--dataset NAME=PATH`): an image folder with metadata, a JSONL
of rows with image paths and text rows, a folder of text files, a saved datasets folder; streaming reads the same
data; training runs on it; bad data is named by file or row."""

import argparse
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from test_training import assets, flags, log_of  # noqa: F401 - the tiny tokenizer and VAE fixture

from training import train as train_script
from training.datasets import DataError, build_sources, source_names
from training.datasets.base import add_dataset_arguments

COLOURS = {"red": (220, 40, 40), "blue": (50, 90, 230), "green": (40, 200, 60)}


def options(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return parser.parse_args(list(argv))


def image_folder(root, n=6, metadata="jsonl", sizes=((40, 24), (32, 32), (17, 50))):
    """`n` solid-colour images of several sizes and modes with a metadata file of captions."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % 3]
        image = PIL.Image.new("RGB", sizes[i % len(sizes)], COLOURS[name])
        (image.convert("L") if i == 4 else image).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {name} square {i}"})
    if metadata == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = "".join(f"{r['file_name']},{r['text']}\n" for r in rows)
        (root / "metadata.csv").write_text("file_name,text\n" + lines)
    return root


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_an_image_folder_gives_its_captions_and_fitted_pixels(tmp_path, metadata):
    root = image_folder(tmp_path / "mine", metadata=metadata)
    source = build_sources(options("--dataset", f"mine={root}"), ["mine"])["mine"]
    assert source.modality == "image" and len(source) == 6
    assert source.captions(6) == [f"a {list(COLOURS)[i % 3]} square {i}" for i in range(6)]
    pixels = torch.cat(list(source.pixels(6, chunk=4)))
    assert pixels.shape == (6, 3, 32, 32) and -1 <= pixels.min() and pixels.max() <= 1
    centre = ((pixels[:, :, 16, 16] + 1) * 127.5).round()
    assert centre[1].tolist() == list(COLOURS["blue"])  # a 32×32 image is taken as it is
    assert centre[0].tolist() == list(COLOURS["red"])  # a wide image padded square keeps its middle
    assert (pixels[0, :, 0, 16] == -1).all()  # … and its padding is the black background
    grey = pixels[4]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])  # an L image becomes grey RGB


def test_crop_fills_the_square_instead_of_padding(tmp_path):
    root = image_folder(tmp_path / "mine")
    source = build_sources(options("--dataset", f"mine={root}", "--image-fit", "crop"), ["mine"])["mine"]
    pixels = torch.cat(list(source.pixels(1)))
    assert ((pixels[0, :, 0, 16] + 1) * 127.5).round().tolist() == list(COLOURS["red"])  # no padding row


def test_jsonl_rows_with_image_paths_and_text_rows(tmp_path):
    images = image_folder(tmp_path / "pictures", n=3)
    data = tmp_path / "rows.jsonl"
    rows = [{"caption": f"picture {i}", "picture": f"pictures/{i}.png"} for i in range(3)]
    rows.insert(1, {"caption": "a line of text", "picture": None})
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = options("--dataset", str(data), "--caption-column", "caption", "--image-column", "picture")
    assert source_names(args)[-2:] == ["rows", "rows_text"]  # named after the file's stem
    source = build_sources(args, ["rows"])["rows"]
    assert source.captions(3) == ["picture 0", "picture 1", "picture 2"]
    assert torch.cat(list(source.pixels(3))).shape == (3, 3, 32, 32)
    assert images.is_dir()
    text = build_sources(args, ["rows_text"])["rows_text"]  # the rows without an image
    assert text.modality == "text" and text.texts() == ["a line of text"]


def test_captions_beside_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative PATH, as on a command line
    root = Path("pairs")
    root.mkdir()
    for i, name in enumerate(COLOURS):
        PIL.Image.new("RGB", (32, 32), COLOURS[name]).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a {name} square\n")
    source = build_sources(options("--dataset", str(root)), ["pairs"])["pairs"]
    assert source.captions(3) == ["a red square", "a blue square", "a green square"]
    centre = ((torch.cat(list(source.pixels(3)))[:, :, 16, 16] + 1) * 127.5).round()
    assert centre.tolist() == [list(c) for c in COLOURS.values()]
    (root / "1.txt").unlink()
    with pytest.raises(DataError, match=r"the images \['1.png'\] have no caption file beside them"):
        build_sources(options("--dataset", str(root)), ["pairs"])


def test_a_text_folder_is_a_text_source(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("first line of text\n\nsecond line of text\n")
    source = build_sources(options("--dataset", f"notes={tmp_path / 'notes'}"), ["notes"])["notes"]
    assert source.modality == "text" and source.texts() == ["first line of text", "second line of text"]


def test_a_saved_datasets_folder_and_streaming_read_the_same_rows(tmp_path):
    import datasets

    root = image_folder(tmp_path / "mine")
    datasets.load_dataset("imagefolder", data_dir=str(root), split="train").save_to_disk(str(tmp_path / "saved"))
    direct = build_sources(options("--dataset", f"a={root}"), ["a"])["a"]
    saved = build_sources(options("--dataset", f"b={tmp_path / 'saved'}"), ["b"])["b"]
    streamed = build_sources(options("--dataset", f"c={root}", "--streaming"), ["c"])["c"]
    want = torch.cat(list(direct.pixels(6)))
    for other in (saved, streamed):
        assert other.captions(6) == direct.captions(6) and len(other) == 6
        assert torch.equal(torch.cat(list(other.pixels(6))), want)


def test_the_cache_tag_follows_the_files(tmp_path):
    root = image_folder(tmp_path / "mine")
    tag = build_sources(options("--dataset", f"mine={root}"), ["mine"])["mine"].cache_tag
    assert build_sources(options("--dataset", f"mine={root}"), ["mine"])["mine"].cache_tag == tag
    PIL.Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "0.png")
    assert build_sources(options("--dataset", f"mine={root}"), ["mine"])["mine"].cache_tag != tag


@pytest.mark.parametrize(
    "make, argv, message",
    [
        (lambda r: image_folder(r / "d"), ["--caption-column", "caption"],
         r"d has no caption column 'caption' \(its columns: \['image', 'text'\]\); "
         r"name the column .* --caption-column"),
        (lambda r: (image_folder(r / "d"), (r / "d" / "2.png").write_bytes(b"not a png")), [],
         r"d row 2: the image .*2.png cannot be read"),
        (lambda r: (r / "d.jsonl").write_text(""), [], r"d.jsonl (holds no rows|cannot be read as a dataset)"),
        (lambda r: (r / "d.jsonl").write_text('{"text": "a", "image": "missing.png"}\n'), [],
         r"d.jsonl row 0: the image .*missing.png cannot be read"),
        (lambda r: (r / "d.jsonl").write_text('{"text": 5}\n{"text": "b"}\n'), [],
         r"d.jsonl (row 0: column 'text' holds 5, not a non-empty string|cannot be read as a dataset)"),
        (lambda r: image_folder(r / "d"), ["--resolution", "64"], r"--resolution 64: this model takes 32×32 images"),
        (lambda r: (r / "d.xlsx").write_text("x"), [],
         r"d.xlsx: a data file is one of \['.csv', '.json', '.jsonl', '.parquet', '.txt'\]"),
    ],
)
def test_bad_data_is_named_by_file_or_row(tmp_path, make, argv, message):
    make(tmp_path)
    path = next(p for p in tmp_path.iterdir() if p.stem == "d")
    with pytest.raises(DataError, match=message):
        source = build_sources(options("--dataset", f"d={path}", *argv), ["d"])["d"]
        list(source.captions(len(source)) if source.modality == "image" else source.texts())
        list(source.pixels(len(source)))


def test_bad_dataset_specs(tmp_path):
    with pytest.raises(DataError, match=r"nowhere does not exist"):
        source_names(options("--dataset", str(tmp_path / "nowhere")))
    root = image_folder(tmp_path / "fashion")
    with pytest.raises(DataError, match=r"the name 'fashion' is taken; give another as NAME=PATH"):
        build_sources(options("--dataset", str(root)), ["fashion"])


def test_training_runs_on_an_image_folder_and_a_text_file(assets, tmp_path):  # noqa: F811
    root = image_folder(tmp_path / "mine", n=8)
    (tmp_path / "notes.txt").write_text("".join(f"note number {i} about squares\n" for i in range(10)))
    out = tmp_path / "run"
    train_script.main(flags(assets, out, "--dataset", f"mine={root}", "--dataset", str(tmp_path / "notes.txt"),
                            "--mix", "mine=0.7,notes=0.3", "--max-steps", "2", "--save-every", "0",
                            "--sample-every", "2"))  # fmt: skip
    log = log_of(out)
    assert (out / "loss.png").stat().st_size and (out / "samples" / "step-2.png").stat().st_size
    from training.monitor import sample_prompts

    prompts = sample_prompts({"mine": [f"a red square {i}" for i in range(3)]})
    assert prompts == ("a red square 0", "a red square 1", "a red square 2")
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    assert list((assets / "latents").glob("latents-mine-n8-u*.safetensors"))  # encoded once, keyed by content
    with pytest.raises(SystemExit):
        train_script.main(flags(assets, tmp_path / "bad", "--mix", "mine=1"))  # a name no --dataset gives


def interleaved_file(tmp_path, rows=None):
    image_folder(tmp_path / "pictures", n=3)
    rows = rows or [
        [{"type": "text", "text": "a red square"}, {"type": "image", "image": "pictures/0.png"},
         {"type": "text", "text": "then a blue one"}, {"type": "image", "image": "pictures/1.png"}],
        [{"type": "image", "image": "pictures/2.png"}, {"type": "text", "text": "a green square"}],
    ]  # fmt: skip
    path = tmp_path / "story.jsonl"
    path.write_text("".join(json.dumps({"content": row}) + "\n" for row in rows))
    return path


def test_interleaved_rows_keep_their_order_and_every_image(tmp_path, processor):
    from training.collate import MixtureDataset, TransfusionCollator

    source = build_sources(options("--dataset", str(interleaved_file(tmp_path))), ["story"])["story"]
    assert source.modality == "interleaved" and len(source) == 2 and len(source.images) == 3
    pixels = torch.cat(list(source.images.pixels(3)))
    centre = ((pixels[:, :, 16, 16] + 1) * 127.5).round().tolist()
    assert centre == [list(COLOURS["red"]), list(COLOURS["blue"]), list(COLOURS["green"])]  # in reading order
    latents = torch.randn(3, 4, 8, 8)
    rows = source.rows(latents)
    assert rows[0][0] == "a red square" and rows[0][2] == "then a blue one" and rows[1][1] == "a green square"
    placed = ((rows[0][1], latents[0]), (rows[0][3], latents[1]), (rows[1][0], latents[2]))
    assert all(torch.equal(a, b) for a, b in placed)
    stream = MixtureDataset({}, {}, {"story": 1.0}, seed=0, interleaved={"story": rows})
    batch = TransfusionCollator(processor, split_text=False)([stream[i] for i in range(4)])
    (part,) = batch["parts"]
    for i, index in enumerate(batch["example_index"].tolist()):  # each row is the processor's layout of its items
        row = stream[index]["items"]
        want = processor([row], add_eos=True, images_as_latents=True)["input_ids"][0]
        assert part["input_ids"][i, : len(want)].tolist() == want.tolist()
    images = [[x for x in stream[i]["items"] if isinstance(x, torch.Tensor)] for i in range(4)]
    expected = torch.cat([torch.stack(row) for row in images])
    assert torch.equal(part["image_latents"], expected)  # every image of every row, in row-major order


@pytest.mark.parametrize(
    "rows, message",
    [
        ([[{"type": "video", "image": "x.mp4"}]], r"story.jsonl row 0: part 0 of 'content' is .*; each part is"),
        ([[{"type": "image", "image": "pictures/missing.png"}]],
         r"story.jsonl: image 0 \(.*missing.png\) cannot be read"),
    ],
)
def test_bad_interleaved_rows_are_named(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        source = build_sources(options("--dataset", str(interleaved_file(tmp_path, rows))), ["story"])["story"]
        list(source.images.pixels(len(source.images)))


def test_training_on_interleaved_rows(assets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    path = interleaved_file(tmp_path)
    train_script.main(flags(assets, out, "--dataset", str(path), "--mix", "story=0.8,text=0.2", "--max-steps", "2",
                            "--save-every", "0"))  # fmt: skip
    assert [r["step"] for r in log_of(out)] == [1, 2]
    long = [[{"type": "text", "text": "word " * 300}, {"type": "image", "image": "pictures/0.png"}]]
    (tmp_path / "long").mkdir()
    with pytest.raises(SystemExit, match=r"long row 0 is \d+ tokens long with its images; the model has 256 positions"):
        spec = f"long={interleaved_file(tmp_path / 'long', long)}"
        train_script.main(flags(assets, tmp_path / "bad", "--dataset", spec, "--mix", "long=1", "--max-steps", "1"))


def edits_file(tmp_path, rows=None):
    image_folder(tmp_path / "pictures", n=3)
    rows = rows or [
        [{"role": "user", "content": [{"type": "image", "image": "pictures/0.png"},
                                      {"type": "text", "text": "make it blue"}]},
         {"role": "assistant", "content": [{"type": "image", "image": "pictures/1.png"}]}],
        [{"role": "user", "content": "draw a green square"},
         {"role": "assistant", "content": [{"type": "image", "image": "pictures/2.png"}]}],
    ]  # fmt: skip
    path = tmp_path / "edits.jsonl"
    path.write_text("".join(json.dumps({"messages": row}) + "\n" for row in rows))
    return path


def test_conversation_rows_train_the_answer_on_the_clean_source(tmp_path, processor):
    """A user's own edits as `messages`: the source image is an input (clean, no loss), the answer is generated."""
    from training.collate import TransfusionCollator

    source = build_sources(options("--dataset", str(edits_file(tmp_path))), ["edits"])["edits"]
    assert source.modality == "interleaved" and len(source) == 2 and len(source.images) == 3
    latents = torch.randn(3, 4, 8, 8)
    rows = source.rows(latents)
    assert rows[1][0] == {"role": "user", "content": ["draw a green square"]}
    assert torch.equal(rows[0][0]["content"][0], latents[0]) and rows[0][0]["content"][1] == "make it blue"
    examples = [{"index": i, "kind": "interleaved", "items": row, "text": None, "latent": None, "window": 0.0}
                for i, row in enumerate(rows)]  # fmt: skip
    (part,) = TransfusionCollator(processor)(examples)["parts"]
    assert part["image_is_input"].tolist() == [True, False, False]
    assert torch.equal(part["image_latents"], latents)
    want = processor(rows[0], add_eos=True, images_as_latents=True)["input_ids"][0]
    assert part["input_ids"][0, : len(want)].tolist() == want.tolist()


def test_bad_messages_are_named(tmp_path):
    rows = [[{"role": "system", "content": "be nice"}]]
    with pytest.raises(DataError, match=r"edits.jsonl row 0: message 0 is .*; a message is"):
        build_sources(options("--dataset", str(edits_file(tmp_path, rows))), ["edits"])
